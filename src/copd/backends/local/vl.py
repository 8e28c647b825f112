"""A Policy backed by a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): prompts with images and videos.

The same branch as HFPolicy (optimizer, update, checkpoints, the clipped objective); what
changes is how prompts become model inputs. A prompt's images and video frames are read
and turned into pixel tensors once, when its batch is sampled; the rollouts carry those
tensors (`Rollouts.vision`), so this branch's update and every teacher that scores the
rollouts use them without decoding anything again. Text-only prompts go through the same
model with no pixels.
"""

from __future__ import annotations

import torch

from copd.backends.local.hf import HFPolicy
from copd.backends.local.lora import LoraPolicy
from copd.backends.local.sampling import RowNoise, repeat_rows
from copd.backends.local.vl_decoding import vl_completion_hidden, vl_completion_logits, vl_sample
from copd.backends.roles import Prompt, Rollouts, SamplingParams, VisionInputs
from copd.config.schema import VisionConfig
from copd.multimodal.families import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from copd.multimodal.inputs import PIXEL_KEYS, prompt_inputs
from copd.multimodal.media import VideoSampling
from copd.multimodal.prompts import content_items, plain_text


class VisionLanguageInputs:
    """What a policy on a vision-language model does differently; mixed into HFPolicy and LoraPolicy.

    `self.tokenizer` is the model's copd.multimodal.processor.VLProcessor.
    """

    def init_vision(self, min_pixels: int | None = None, max_pixels: int | None = None,
                    video_min_pixels: int | None = None, video_max_pixels: int | None = None, **sampling) -> None:
        """`sampling`: the frame keys of model.vision (video_fps, video_min_frames, ...; copd.multimodal.media)."""
        self.video_sampling = VideoSampling.from_options(sampling)
        # The resolution this run reads images and videos at; saved with the processor.
        self.tokenizer.set_pixels((min_pixels, max_pixels), (video_min_pixels, video_max_pixels))

    # ---- prompts --------------------------------------------------------------------
    def format_prompt(self, prompt: str | Prompt) -> str:
        """The text the model sees: a placeholder block per image and video, at its `<image>` /
        `<video>` marker or (without markers) before the text (copd.multimodal.prompts)."""
        prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
        content = content_items(prompt.text, len(prompt.images), len(prompt.videos))
        if not self.use_chat:
            return plain_text(content, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
        system_text = prompt.system or self.system_prompt
        system = [{"role": "system", "content": system_text}] if system_text else []
        turns = [*system, {"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, prompts: list[str | Prompt], rows_per_prompt: int) -> tuple[dict, VisionInputs]:
        """(inputs of the distinct prompts on this device, their pixel inputs): media read and decoded here, once."""
        from copd.multimodal.media import load_image, load_video

        prompts = [Prompt(p) if isinstance(p, str) else p for p in prompts]
        images = [[load_image(path) for path in p.images] for p in prompts]
        videos = [[load_video(path, self.video_sampling) for path in p.videos] for p in prompts]
        encoded = self.tokenizer.encode([self.format_prompt(p) for p in prompts], images, videos)
        vision = VisionInputs(
            {k: encoded[k] for k in PIXEL_KEYS if k in encoded},
            [len(p.images) for p in prompts],
            [len(p.videos) for p in prompts],
            rows_per_prompt,
        )
        return {k: v.to(self.device) for k, v in encoded.items()}, vision

    def _prompt_inputs(self, rollouts: Rollouts) -> dict:
        vision = rollouts.vision
        if vision is None:
            raise ValueError(f"policy {self.name!r}: rollouts without pixel inputs did not come from a vision-language policy")
        pixels = {k: v.to(self.device) for k, v in vision.tensors.items()}
        return prompt_inputs(rollouts.input_ids_B_L.to(self.device), rollouts.attention_mask_B_L.to(self.device),
                             rollouts.prompt_len, pixels, vision.rows_per_prompt, self.tokenizer.image_token_id,
                             self.tokenizer.video_token_id)

    # ---- sampling and scoring -------------------------------------------------------
    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        self.activate()
        inputs, vision = self.encode_prompts(prompts, n)
        noise = RowNoise(seed, torch.arange(len(prompts) * n))
        self.model.eval()
        with self._compute():
            sampled = vl_sample(self.model, inputs, params, noise, self.tokenizer.eos_token_id,
                                            self.tokenizer.pad_token_id, rows_per_prompt=n)
        ids, mask = repeat_rows(inputs["input_ids"], n), repeat_rows(inputs["attention_mask"], n)
        return self._rollouts(ids, mask, sampled, vision)

    def _dist(self, rollouts: Rollouts) -> torch.Tensor:
        prompts = self._prompt_inputs(rollouts)
        with self._compute():
            logits = vl_completion_logits(self.model, prompts, rollouts.input_ids_B_L.to(self.device),
                                          rollouts.attention_mask_B_L.to(self.device), rollouts.prompt_len,
                                          rollouts.vision.rows_per_prompt)
        return logits.float().log_softmax(-1)

    def _hidden(self, rollouts: Rollouts) -> torch.Tensor:
        prompts = self._prompt_inputs(rollouts)
        return vl_completion_hidden(self.model, prompts, rollouts.input_ids_B_L.to(self.device),
                                    rollouts.attention_mask_B_L.to(self.device), rollouts.prompt_len,
                                    rollouts.vision.rows_per_prompt)

    # ---- supervised warm start --------------------------------------------------------
    def supervised_loss(self, prompts: list[Prompt], answers: list[str]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens (and EOS) after each prompt, pixels included."""
        inputs, _ = self.encode_prompts(prompts, 1)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = [self.tokenizer.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
        width = max(map(len, rows))
        answer_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        answer_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        ids = torch.cat([inputs["input_ids"], answer_ids], 1)
        mask = torch.cat([inputs["attention_mask"], answer_mask], 1)
        with self._compute():
            logits = vl_completion_logits(self.model, inputs, ids, mask, inputs["input_ids"].shape[1])
        logprobs = logits.float().log_softmax(-1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        return -(logprobs * answer_mask).sum() / answer_mask.sum()


# Options (ModelConfig.policy_options) that only a vision-language policy reads: init_vision's arguments.
VISION_OPTIONS = tuple(VisionConfig.model_fields)


def _split_vision_options(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in VISION_OPTIONS if k in kwargs}


class VLPolicy(VisionLanguageInputs, HFPolicy):
    """One branch on a vision-language model, all weights trained (a full copy per branch)."""

    def __init__(self, name: str, model, processor, *args, **kwargs):
        vision = _split_vision_options(kwargs)
        HFPolicy.__init__(self, name, model, processor, *args, **kwargs)
        self.init_vision(**vision)


class VLLoraPolicy(VisionLanguageInputs, LoraPolicy):
    """One LoRA branch on a shared frozen vision-language base (adapters in the vision tower too)."""

    def __init__(self, name: str, shared, processor, *args, **kwargs):
        vision = _split_vision_options(kwargs)
        LoraPolicy.__init__(self, name, shared, processor, *args, **kwargs)
        self.init_vision(**vision)
