"""Tiny Qwen3-VL / Qwen2-VL / Qwen2.5-VL: local build, save/reload, input encoding, KV-cache sampling, scoring.

These run the manual route (no torchvision); test_processor_parity.py checks it against
the checkpoint's own processor where torchvision is installed.
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

from copd.backends.local.sampling import RowNoise
from copd.backends.local.vl_decoding import vl_completion_logits, vl_sample
from copd.backends.roles import SamplingParams
from copd.models.sources import load_pretrained
from copd.multimodal.families import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from copd.multimodal.inputs import rope_positions, video_patches
from copd.multimodal.media import Video
from copd.multimodal.processor import VLProcessor
from copd.multimodal.tiny import ARCHITECTURES, build_tiny_vl


def picture(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request):
    # init_std 0.3: a random model whose greedy output depends on its input (and on positions).
    model, processor = build_tiny_vl(seed=0, arch=request.param, init_std=0.3)
    return model.eval(), processor.tokenizer, processor


def encode(processor, texts, images=None, videos=None):
    """The manual route's inputs; videos are lists of frames, read as 2 fps from frame 0."""
    videos = [[Video(frames, list(range(len(frames))), 2.0, len(frames)) for frames in row] for row in videos or
              [[] for _ in texts]]
    return processor.encode(texts, images or [[] for _ in texts], videos)


def sample(model, tokenizer, inputs, max_new_tokens, temperature=0.0, seed=None, rows_per_prompt=1):
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, greedy=temperature <= 0)
    noise = None if seed is None else RowNoise(seed, torch.arange(inputs["input_ids"].shape[0] * rows_per_prompt))
    return vl_sample(model, inputs, params, noise, tokenizer.eos_token_id, tokenizer.pad_token_id, rows_per_prompt)[:2]


def with_completions(inputs, ids, mask):
    return torch.cat([inputs["input_ids"], ids], 1), torch.cat([inputs["attention_mask"], mask.long()], 1)


def mixed_batch(processor):
    """Row 0 has an image, row 1 is text only and longer, so row 0 is left-padded."""
    texts = [chat(f"{IMAGE_PLACEHOLDER}what is it?"), chat("a text-only row that is much longer than the other one")]
    return encode(processor, texts, [[picture(1)], []])


def generate_reference(model, tokenizer, inputs, max_new_tokens):
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[:, inputs["input_ids"].shape[1]:]


def test_tokenizer_chat_template_and_config_ids(tiny):
    model, tokenizer, _ = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat(IMAGE_PLACEHOLDER + VIDEO_PLACEHOLDER + "hi")
    for name, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert getattr(model.config, name) == tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(IMAGE_PLACEHOLDER + "é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + 2 and tokenizer.decode(ids) == IMAGE_PLACEHOLDER + "é"  # specials whole, bytes otherwise
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}) == 3


def test_save_and_reload_round_trip(tiny, tmp_path):
    from transformers import AutoImageProcessor

    model, tokenizer, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, auto = load_pretrained(tmp_path)
    assert type(model2) is type(model) and auto.family == processor.family
    assert auto.route == ("processor" if is_torchvision_available() else "manual")
    loaded = VLProcessor.from_pretrained(tmp_path, "manual")
    image_processor = processor.image_processor
    assert type(loaded.image_processor) is type(image_processor)  # the PIL class
    assert AutoImageProcessor.from_pretrained(tmp_path).to_dict() == image_processor.to_dict()
    assert loaded.video_settings["size"] == processor.video_settings["size"]
    tokenizer2 = loaded.tokenizer
    assert tokenizer2.get_vocab() == tokenizer.get_vocab() and tokenizer2.chat_template == tokenizer.chat_template
    assert (tokenizer2.eos_token, tokenizer2.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    inputs, again = mixed_batch(processor), mixed_batch(loaded)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        torch.testing.assert_close(model2.eval()(**again).logits, model(**inputs).logits)


def test_encode_left_pads_and_expands_image_pads(tiny):
    model, tokenizer, processor = tiny
    texts = [chat(f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}two"), chat("none"), chat(f"x{IMAGE_PLACEHOLDER}")]
    images = [[picture(1), picture(2, 40, 70)], [], [picture(3, 30, 30)]]
    inputs = encode(processor, texts, images)
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4], [1, 4, 2], [1, 2, 2]]  # (t, h, w); picture 2 is 70 high
    patch = processor.family.patch_size
    assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * patch * patch)
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [4 + 2, 0, 1]
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).int())
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask.diff(dim=-1) >= 0).all()  # left padding
    assert (inputs["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
    with pytest.raises(ValueError, match="placeholders"):
        encode(processor, [chat("no placeholder")], [[picture(1)]])


def test_video_patches_follow_the_video_layout(tiny):
    _, _, processor = tiny
    image_processor, settings, fam = processor.image_processor, processor.video_settings, processor.family
    side, p = 4 * fam.patch_size, fam.patch_size
    a, b, c = picture(1, side, side), picture(2, side, side), picture(3, side, side)

    def normalised(frames):
        return image_processor(images=frames, image_mean=settings["image_mean"], image_std=settings["image_std"],
                               return_tensors="pt")["pixel_values"]

    still, grid = video_patches(Video([a, a], [0, 1], 2.0, 2), image_processor, settings, fam)
    # A still video is an image: the image processor fills both temporal slots with the frame.
    assert grid.tolist() == [1, 4, 4] and torch.equal(still, normalised([a]))
    patches, grid = video_patches(Video([a, b, c], [0, 1, 2], 2.0, 3), image_processor, settings, fam)
    assert grid.tolist() == [2, 4, 4]  # odd count: c is repeated to fill a pair
    slots = patches.view(2, 16, 3, 2, p, p)  # [t, patch, C, temporal slot, p, p]
    for t, slot, frame in [(0, 0, a), (0, 1, b), (1, 0, c), (1, 1, c)]:
        assert torch.equal(slots[t, :, :, slot], normalised([frame]).view(16, 3, 2, p, p)[:, :, 0])


def test_video_image_and_text_rows_greedy_matches_generate(tiny):
    model, tokenizer, processor = tiny
    texts = [chat(f"{VIDEO_PLACEHOLDER}and {IMAGE_PLACEHOLDER}?"), chat("hi"), chat(f"{IMAGE_PLACEHOLDER}x")]
    frames = [picture(4), picture(5), picture(6)]
    inputs = encode(processor, texts, [[picture(1, 40, 70)], [], [picture(2)]], [[frames], [], []])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert (inputs["mm_token_type_ids"] == 2).sum() == 2 * 4 * 4 // 4
    ids, _ = sample(model, tokenizer, inputs, 8)
    assert torch.equal(ids, generate_reference(model, tokenizer, inputs, 8))


def test_greedy_sample_matches_generate_under_left_padding(tiny):
    model, tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    assert inputs["attention_mask"][0, 0] == 0  # the image row is padded
    ids, mask = sample(model, tokenizer, inputs, 12)
    assert torch.equal(ids, generate_reference(model, tokenizer, inputs, 12))
    assert len(set(ids[0].tolist())) > 1 and mask.shape == ids.shape
    text_only = encode(processor, [chat("short"), chat("a longer text-only prompt")])
    ids, _ = sample(model, tokenizer, text_only, 8)
    assert torch.equal(ids, generate_reference(model, tokenizer, text_only, 8))


def test_image_row_positions_use_the_grid_and_rope_deltas(tiny):
    model, _tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    positions, deltas = rope_positions(model, inputs)
    # Row 0: 4 image tokens (a 2x2 merged grid) span 2 positions, so its deltas is 2 - 4.
    assert deltas.squeeze(-1).tolist() == [-2, 0]
    real = inputs["attention_mask"][0].bool()
    assert positions[:, 0, real].max() + 1 == real.sum() + deltas[0, 0]


def test_sampling_is_reproducible_and_masks_after_eos(tiny):
    model, tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    runs = [sample(model, tokenizer, inputs, 10, 1.0, 5) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for row, mask in zip(*runs[0]):
        hits = (row == eos).nonzero()
        end = int(hits[0, 0]) + 1 if len(hits) else len(row)
        assert mask[:end].all() and not mask[end:].any() and (row[end:] == pad).all()


def test_completion_logits_agree_with_greedy_tokens_and_a_full_forward(tiny):
    model, tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    ids, mask = sample(model, tokenizer, inputs, 10)
    joined_ids, joined_mask = with_completions(inputs, ids, mask)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = vl_completion_logits(model, inputs, joined_ids, joined_mask, prompt_len)
        assert logits.shape == (*ids.shape, len(tokenizer))
        assert (logits.argmax(-1) == ids)[mask.bool()].all()
        joined = {**inputs, "input_ids": joined_ids, "attention_mask": joined_mask,
                  "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids, dtype=torch.int)], 1)}
        full = single_forward(model, joined, prompt_len)[:, prompt_len - 1:-1]
    torch.testing.assert_close(full[mask.bool()], logits[mask.bool()], atol=1e-4, rtol=1e-4)


def single_forward(model, joined, prompt_len):
    """Logits of one uncached forward over prompt + completion.

    The image features are scattered into the prompt's placeholders only: a sampled
    completion may hold the image pad id too, which model(**joined) would count as one more
    placeholder and reject. Qwen3-VL's deepstack features go to the same slots.
    """
    embeds = model.get_input_embeddings()(joined["input_ids"])
    vision = model.model.get_image_features(joined["pixel_values"], joined["image_grid_thw"])
    slots = joined["input_ids"] == model.config.image_token_id
    slots[:, prompt_len:] = False
    embeds = embeds.masked_scatter(slots.unsqueeze(-1), torch.cat(vision.pooler_output))
    positions = rope_positions(model, joined)[0]
    deepstack = getattr(vision, "deepstack_features", None)
    if deepstack is None:
        return model(inputs_embeds=embeds, attention_mask=joined["attention_mask"], position_ids=positions).logits
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=joined["attention_mask"], position_ids=positions, visual_pos_masks=slots,
        deepstack_visual_embeds=[torch.cat(features) for features in deepstack]).last_hidden_state
    return model.lm_head(hidden)


def test_completion_logits_accept_a_sampled_image_pad_id(tiny):
    model, _tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    ids = torch.full((2, 3), model.config.image_token_id)  # not a placeholder: no vision feature for it
    joined_ids, joined_mask = with_completions(inputs, ids, torch.ones_like(ids))
    with torch.no_grad():
        logits = vl_completion_logits(model, inputs, joined_ids, joined_mask, inputs["input_ids"].shape[1])
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_gradients_reach_the_vision_tower(tiny):
    model, tokenizer, processor = tiny
    inputs = mixed_batch(processor)
    ids, mask = sample(model, tokenizer, inputs, 6, 1.0, 0)
    model.zero_grad()
    logits = vl_completion_logits(model, inputs, *with_completions(inputs, ids, mask), inputs["input_ids"].shape[1])
    logprobs = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (logprobs * mask).sum().backward()
    vision = [p for name, p in model.named_parameters() if "visual" in name]
    assert vision and all(p.grad is not None for p in vision)
    assert sum(float(p.grad.abs().sum()) for p in vision) > 0
    model.zero_grad()
