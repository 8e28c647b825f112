"""Vision-language (Qwen2-VL, Qwen2.5-VL) models: tiny local builds, input encoding, KV-cache sampling.

Everything here works without torchvision (the Qwen Processor and video processor classes
need it): images go through the PIL image processor, videos are patchified from the same
processor's per-frame output, and the chat template lives on the tokenizer.

How positions work, and what a manual decode loop has to pass
-------------------------------------------------------------
Qwen2-VL uses M-RoPE: `position_ids` has shape [3, B, L] (temporal, height, width). Text
tokens carry the same index in all three rows; the tokens of an image or video carry its
grid coordinates, offset by the text position where it starts; the text after a vision
block resumes at (start + max(grid_h, grid_w) / merge_size), so a row's largest position
is smaller than its token count. `model.model.get_rope_index(input_ids, mm_token_type_ids,
image_grid_thw, video_grid_thw, attention_mask)` returns (positions [3, B, L], rope_deltas
[B, 1]) where rope_deltas = max position + 1 - number of real tokens (0 for a text-only
row). It skips masked (left-padding) tokens, so it is correct under left padding; padded
slots get position 0. mm_token_type_ids (0 text, 1 image, 2 video) is what marks the
vision blocks; rows without images and batches without any grid work too.

- Prefill: pass `position_ids=get_rope_index(...)[0]` together with pixel_values,
  image_grid_thw, pixel_values_videos, video_grid_thw and the attention mask.
- Decode step: the new token's position, the same in all three rows, is
  (number of real tokens before it) + rope_deltas, i.e.
  `(attention_mask.cumsum(-1) - 1)[:, -1:] + rope_deltas`, expanded to [3, B, 1]. Pixel
  inputs are not passed again (their keys and values are in the cache).
- No `cache_position`: this model's forward in transformers 5.23 has no such argument; the
  cache knows its length and the causal mask comes from attention_mask.

With position_ids=None the model computes positions itself, but statefully. The prefill
calls get_rope_index (and raises if grids are given without mm_token_type_ids) and stores
rope_deltas on `model.model.rope_deltas`; a later cached step adds that stored delta to
`attention_mask.cumsum(-1) - 1` taken over the whole mask, i.e. positions for every slot
rather than the one new token, which fails with a shape error in 5.23. Without an
attention mask the step uses arange(past, past + 1) + delta, right only without padding.
A text-only batch with no grids gets plain arange positions that count the left padding.
`model.generate` avoids all this by building [4, B, L] position ids itself (a text row plus
the three M-RoPE rows). So the loop here always passes explicit positions and never reads
`model.model.rope_deltas` (stale from whichever batch ran last).

Qwen2.5-VL takes the same path: its get_rope_index has one more argument,
second_per_grid_ts (seconds per temporal grid step of a video), which defaults to 1.

Scoring (`vl_completion_logits`) runs the prompt with its pixel inputs once, then the
completion tokens on that cache, with the same positions as sampling. A single forward
over prompt + completion fails whenever a sampled completion contains the image or video
pad id (a tiny random model samples it): the model takes every such id for a placeholder
and checks their count against the vision features. Unlike copd.policy.sampling, the
prefill here runs every row, identical prompts included.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, PreTrainedTokenizerFast
from transformers import Qwen2VLImageProcessorPil

from copd.models import own_memory
from copd.policy.base import SamplingParams
from copd.policy.sampling import next_tokens

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

# Qwen's ChatML layout; an image or video content item becomes its placeholder block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_PLACEHOLDER +
    "{% elif item['type'] == 'video' %}" + VIDEO_PLACEHOLDER +
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_vl_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one token per byte, so any text encodes) plus Qwen's special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=CHAT_TOKENS + VISION_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """[t, h, w] rotary frequency split summing to head_dim / 2, in Qwen's 2:3:3 proportion."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _vl_config(arch: str, tokenizer, hidden: int, layers: int, heads: int, vision_dim: int, vision_layers: int,
               init_std: float):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(hidden // heads)},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    vision = dict(depth=vision_layers, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=init_std)
    if arch == "qwen2_vl":
        vision.update(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen2_5_vl":
        vision.update(hidden_size=vision_dim, intermediate_size=2 * vision_dim, out_hidden_size=hidden,
                      window_size=56, fullatt_block_indexes=[vision_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown vision-language architecture {arch!r}; expected 'qwen2_vl' or 'qwen2_5_vl'")


def build_tiny_vl(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, vision_dim: int = 32,
                  vision_layers: int = 1, arch: str = "qwen2_vl", min_pixels: int = 28 * 28, max_pixels: int = 56 * 56,
                  init_std: float = 0.02):
    """(model, tokenizer, image_processor): a tiny random Qwen2-VL (or Qwen2.5-VL) built from config.

    max_pixels = 56*56 caps an image at a 4x4 patch grid, i.e. 4 tokens after the 2x2 merge.
    A larger init_std than the usual 0.02 gives a random model whose greedy output varies
    with its input, which tests of positions and caching need.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tokenizer = build_vl_tokenizer()
    config = _vl_config(arch, tokenizer, hidden, layers, heads, vision_dim, vision_layers, init_std)
    model_cls = Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return model, tokenizer, image_processor


def save_vl(folder: str | Path, model, tokenizer, image_processor) -> None:
    """One folder that `load_vl` (and AutoModelForImageTextToText / AutoTokenizer) reads back."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def load_vl(folder: str | Path):
    """(model, tokenizer, image_processor); without torchvision the PIL image processor is picked."""
    model = own_memory(AutoModelForImageTextToText.from_pretrained(folder))
    return model, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def video_patches(frames: list, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches [t*h*w, C*tp*p*p], grid [t, h, w]) of one video, in the video processor's layout.

    The image processor fills each patch's temporal slots with copies of one frame; here the
    frames are processed alone and consecutive groups of temporal_patch_size frames fill
    those slots instead (the last frame is repeated to complete a group, as the video
    processor does). All frames must have the same size.
    """
    tp, p = image_processor.temporal_patch_size, image_processor.patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % tp)
    out = image_processor(images=frames, return_tensors="pt")
    grids = out["image_grid_thw"]
    if not (grids == grids[0]).all():
        raise ValueError("all frames of a video must have the same size")
    n = int(grids[0, 1] * grids[0, 2])
    channels = out["pixel_values"].shape[-1] // (tp * p * p)
    # [frame, patch, C, tp, p, p]: keep one temporal copy per frame, then regroup frames into slots.
    single = out["pixel_values"].view(len(frames), n, channels, tp, p, p)[:, :, :, 0]
    grouped = single.view(len(frames) // tp, tp, n, channels, p, p).permute(0, 2, 3, 1, 4, 5)
    grid = torch.tensor([len(frames) // tp, int(grids[0, 1]), int(grids[0, 2])])
    return grouped.reshape(-1, channels * tp * p * p), grid


def _expand_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """Replace the k-th `pad_id` in ids with counts[k] copies of it."""
    if ids.count(pad_id) != len(counts):
        raise ValueError(f"text has {ids.count(pad_id)} placeholders for {len(counts)} images/videos")
    out, k = [], 0
    for token in ids:
        if token == pad_id:
            out.extend([pad_id] * counts[k])
            k += 1
        else:
            out.append(token)
    return out


def _pixels(images, videos, image_processor) -> dict:
    """Pixel tensors and grids of all images (then all videos), in row order."""
    feats = {}
    flat_images = [im for row in images for im in row]
    if flat_images:
        out = image_processor(images=flat_images, return_tensors="pt")
        feats["pixel_values"], feats["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
    flat_videos = [video for row in videos for video in row]
    if flat_videos:
        parts = [video_patches(video, image_processor) for video in flat_videos]
        feats["pixel_values_videos"] = torch.cat([patches for patches, _ in parts])
        feats["video_grid_thw"] = torch.stack([grid for _, grid in parts])
    return feats


def encode_vl(texts: list[str], images: list[list] | None, videos: list[list[list]] | None, tokenizer,
              image_processor) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for texts that hold one placeholder block per image and video.

    images[i] / videos[i] are row i's images and videos (a video is a list of PIL frames), in
    the order their placeholders appear. Returns input_ids, attention_mask, mm_token_type_ids
    (0 text, 1 image, 2 video; M-RoPE needs it) and, when present, pixel_values +
    image_grid_thw and pixel_values_videos + video_grid_thw.
    """
    images = images or [[] for _ in texts]
    videos = videos or [[] for _ in texts]
    feats = _pixels(images, videos, image_processor)
    per_token = image_processor.merge_size ** 2
    image_counts = iter((feats.get("image_grid_thw", torch.zeros(0, 3)).prod(-1) // per_token).tolist())
    video_counts = iter((feats.get("video_grid_thw", torch.zeros(0, 3)).prod(-1) // per_token).tolist())
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    rows = []
    for text, row_images, row_videos in zip(texts, images, videos, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = _expand_pads(ids, image_id, [next(image_counts) for _ in row_images])
        rows.append(_expand_pads(ids, video_id, [next(video_counts) for _ in row_videos]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    types = (input_ids == image_id).int() + 2 * (input_ids == video_id).int()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types, **feats}


def rope_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(M-RoPE position ids [3, B, L], rope_deltas [B, 1]) of left-padded prompts (see module doc)."""
    return model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"])


def decode_positions(attention_mask_B_L: torch.Tensor, rope_deltas_B_1: torch.Tensor, start: int) -> torch.Tensor:
    """M-RoPE positions [3, B, L - start] of text tokens at slots start.. of the mask."""
    text_B_L = (attention_mask_B_L.long().cumsum(-1) - 1).clamp(min=0)[:, start:] + rope_deltas_B_1
    return text_B_L.unsqueeze(0).expand(3, -1, -1)


def _prefill(model, inputs: dict):
    """(cache, logits [B, 1, V] at the last prompt slot, rope_deltas) of the prompts with their pixels."""
    positions, deltas = rope_positions(model, inputs)
    pixels = {k: inputs[k] for k in PIXEL_KEYS if inputs.get(k) is not None}
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions,
                use_cache=True, logits_to_keep=1, **pixels)
    return out.past_key_values, out.logits, deltas


@torch.no_grad()
def vl_sample(model, inputs: dict, max_new_tokens: int, temperature: float, generator: torch.Generator | None,
              eos_id: int, pad_id: int, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_ids [B, T], completion_mask [B, T]) sampled with a KV cache; temperature <= 0 is greedy.

    The mask is 1 on generated tokens up to and including EOS; finished rows are padded with pad_id.
    """
    mask = inputs["attention_mask"]
    cache, logits, deltas = _prefill(model, inputs)
    logits = logits[:, -1]
    finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    params = SamplingParams(temperature=temperature, top_p=top_p, greedy=temperature <= 0)
    tokens, alive = [], []
    for step in range(max_new_tokens):
        token = next_tokens(logits, params, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        alive.append(~finished)
        finished = finished | (token == eos_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # A finished row's pad token is masked out, so it never shifts that row's positions.
        mask = torch.cat([mask, (~finished | (token == eos_id)).long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=decode_positions(mask, deltas, -1),
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(alive, 1).float()


def with_completions(inputs: dict, completion_ids_B_T: torch.Tensor, completion_mask_B_T: torch.Tensor) -> dict:
    """The prompt inputs with the completions appended (the layout `vl_completion_logits` reads)."""
    joined = dict(inputs)
    joined["input_ids"] = torch.cat([inputs["input_ids"], completion_ids_B_T], dim=1)
    mask = inputs["attention_mask"]
    joined["attention_mask"] = torch.cat([mask, completion_mask_B_T.to(mask.dtype)], dim=1)
    # Completion tokens are text for M-RoPE, even a sampled image pad id (it has no vision feature).
    types = inputs["mm_token_type_ids"]
    joined["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(completion_ids_B_T, dtype=types.dtype)], dim=1)
    return joined


def vl_completion_logits(model, inputs_with_completions: dict, prompt_len: int) -> torch.Tensor:
    """Logits [B, T, V] predicting each completion token (slots prompt_len .. L-1); differentiable.

    The prompt runs with its pixel inputs (so gradients reach the vision tower), then the
    completion tokens but the last run on its cache with the positions sampling used.
    """
    inputs = inputs_with_completions
    prompt = {k: (v[:, :prompt_len] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
              for k, v in inputs.items()}
    cache, first_B_1_V, deltas = _prefill(model, prompt)
    if inputs["input_ids"].shape[1] - prompt_len < 2:
        return first_B_1_V
    mask = inputs["attention_mask"]
    positions = decode_positions(mask[:, :-1], deltas, prompt_len)
    out = model(input_ids=inputs["input_ids"][:, prompt_len:-1], attention_mask=mask[:, :-1], position_ids=positions,
                past_key_values=cache, use_cache=True)
    return torch.cat([first_B_1_V, out.logits], dim=1)
