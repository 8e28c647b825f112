"""Vision-language inputs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the manual encoding route and M-RoPE positions.

The decode loop and scoring that use them are in copd.backends.local.vl_decoding; what
differs between the families is in copd.multimodal.families.

The manual route (`encode_manual`) works without torchvision (the Qwen Processor and video
processor classes need it): images go through the PIL image processor; video frames are
resized as the family's video processor sizes them and patchified from the same
processor's per-frame output; each placeholder is expanded as the family's processor
expands it (Qwen3-VL: one timestamped block per temporal step); the chat template lives on
the tokenizer.

How positions work, and what a manual decode loop has to pass
-------------------------------------------------------------
The Qwen-VL models use M-RoPE: `position_ids` has shape [3, B, L] (temporal, height, width). Text
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
second_per_grid_ts (seconds per temporal grid step of a video), which both routes compute
and `rope_positions` passes. Qwen3-VL's get_rope_index splits a video's grid into one grid
per temporal step, each matched to its own run of video tokens: the timestamp text between
the steps is what separates the runs.

Scoring (`vl_completion_logits`) runs the prompt with its pixel inputs once, then the
completion tokens on that cache, with the same positions as sampling. A single forward
over prompt + completion fails whenever a sampled completion contains the image or video
pad id (a tiny random model samples it): the model takes every such id for a placeholder
and checks their count against the vision features.

As in copd.backends.local.sampling, a prompt's G rows share one prefill: the prompt inputs hold
each distinct prompt once with its pixels, and the prefill's cache, last logits and
rope_deltas are repeated `rows_per_prompt` times (rows are grouped by prompt).
"""

from __future__ import annotations

import math

import torch
from transformers.image_utils import PILImageResampling

from copd.multimodal.families import IMAGE_PAD, VIDEO_PAD, VideoLayout, VLFamily
from copd.multimodal.media import Video

# What the model's forward takes of the pixel inputs; M-RoPE (get_rope_index) also reads second_per_grid_ts.
FORWARD_PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
PIXEL_KEYS = (*FORWARD_PIXEL_KEYS, "second_per_grid_ts")


def video_patches(video: Video, image_processor, settings: dict, fam: VLFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches [t*h*w, C*tp*p*p], grid [t, h, w]) of one video, in the family's video processor layout.

    The frames are resized as the family's video processor sizes them (`VLFamily.video_size`),
    then normalised with the video settings by the image processor, which fills each patch's
    temporal slots with copies of one frame; here consecutive groups of temporal_patch_size
    frames fill those slots instead (the last frame is repeated to complete a group, as the
    video processor does).
    """
    tp, p = settings["temporal_patch_size"], settings["patch_size"]
    frames = list(video.frames)
    width, height = frames[0].size
    new_h, new_w = fam.video_size(len(frames), height, width, settings)
    resample = PILImageResampling(settings.get("resample", PILImageResampling.BICUBIC))
    frames = [f if f.size == (new_w, new_h) else f.resize((new_w, new_h), resample) for f in frames]
    frames += [frames[-1]] * (-len(frames) % tp)
    out = image_processor(images=frames, do_resize=False, image_mean=settings["image_mean"],
                          image_std=settings["image_std"], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    n = int(grid[1] * grid[2])
    channels = out["pixel_values"].shape[-1] // (tp * p * p)
    # [frame, patch, C, tp, p, p]: keep one temporal copy per frame, then regroup frames into slots.
    single = out["pixel_values"].view(len(frames), n, channels, tp, p, p)[:, :, :, 0]
    grouped = single.view(len(frames) // tp, tp, n, channels, p, p).permute(0, 2, 3, 1, 4, 5)
    return grouped.reshape(-1, channels * tp * p * p), torch.tensor([len(frames) // tp, int(grid[1]), int(grid[2])])


def check_placeholders(text: str, pad: str, count: int, what: str) -> None:
    """A ValueError unless `text` holds exactly `count` placeholders `pad` (one per image or video)."""
    if text.count(pad) != count:
        raise ValueError(f"text has {text.count(pad)} {what} placeholders for {count} {what}s")


def expand_placeholders(text: str, pad: str, expansions: list[str], what: str) -> str:
    """`text` with its k-th `pad` replaced by expansions[k]; a count mismatch is a ValueError."""
    check_placeholders(text, pad, len(expansions), what)
    parts = text.split(pad)
    return "".join(part + expansion for part, expansion in zip(parts, expansions + [""], strict=True))


def _image_features(images: list, image_processor) -> dict:
    if not images:
        return {}
    out = image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _video_features(videos: list[Video], image_processor, settings: dict, fam: VLFamily) -> dict:
    if not videos:
        return {}
    parts = [video_patches(video, image_processor, settings, fam) for video in videos]
    feats = {"pixel_values_videos": torch.cat([patches for patches, _ in parts]),
             "video_grid_thw": torch.stack([grid for _, grid in parts])}
    if fam.seconds_per_step:  # seconds per temporal step at the sampled frame rate
        tp = settings["temporal_patch_size"]
        feats["second_per_grid_ts"] = torch.tensor(
            [tp * v.total_frames / (len(v.indices) * v.fps) for v in videos])
    return feats


def encode_manual(texts: list[str], images: list[list], videos: list[list[Video]], tokenizer, image_processor,
                  video_settings: dict, fam: VLFamily) -> dict[str, torch.Tensor]:
    """Left-padded model inputs built as the family's processor builds them, without torchvision.

    texts[i] holds one `<|image_pad|>` per image and one `<|video_pad|>` per video of row i
    (as the chat template writes them); each is expanded to the tokens of its grid (and, for
    Qwen3-VL, the video's timestamps), then the texts are tokenized together. Returns
    input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video; M-RoPE needs
    it) and the pixel tensors and grids present.
    """
    merge = image_processor.merge_size
    feats = {**_image_features([im for row in images for im in row], image_processor),
             **_video_features([v for row in videos for v in row], image_processor, video_settings, fam)}
    image_grids = iter(feats.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)).tolist())
    video_grids = iter(feats.get("video_grid_thw", torch.zeros(0, 3, dtype=torch.long)).tolist())
    expanded = []
    for text, row_images, row_videos in zip(texts, images, videos, strict=True):
        image_text = [IMAGE_PAD * (math.prod(next(image_grids)) // merge ** 2) for _ in row_images]
        video_text = [fam.video_text(VideoLayout(tuple(next(video_grids)), merge, video_settings["temporal_patch_size"],
                                                 video.indices, video.fps)) for video in row_videos]
        text = expand_placeholders(text, IMAGE_PAD, image_text, "image")
        expanded.append(expand_placeholders(text, VIDEO_PAD, video_text, "video"))
    tokens = tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
    image_id, video_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD), tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "mm_token_type_ids": token_types(tokens["input_ids"], image_id, video_id), **feats}


def token_types(input_ids: torch.Tensor, image_id: int, video_id: int) -> torch.Tensor:
    """mm_token_type_ids: 0 text, 1 image, 2 video (what marks the vision blocks for M-RoPE)."""
    return (input_ids == image_id).int() + 2 * (input_ids == video_id).int()


def rope_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(M-RoPE position ids [3, B, L], rope_deltas [B, 1]) of left-padded prompts (see module doc)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT adapters
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    return plain.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"], **extra)


def decode_positions(attention_mask_B_L: torch.Tensor, rope_deltas_B_1: torch.Tensor, start: int) -> torch.Tensor:
    """M-RoPE positions [3, B, L - start] of text tokens at slots start.. of the mask."""
    text_B_L = (attention_mask_B_L.long().cumsum(-1) - 1).clamp(min=0)[:, start:] + rope_deltas_B_1
    return text_B_L.unsqueeze(0).expand(3, -1, -1)


def prompt_inputs(input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, prompt_len: int, pixels: dict,
                  rows_per_prompt: int, image_id: int, video_id: int) -> dict:
    """The distinct prompts of grouped rows, with their pixels and token types (0 text, 1 image, 2 video)."""
    ids = input_ids_B_L[::rows_per_prompt, :prompt_len]
    return {"input_ids": ids, "attention_mask": attention_mask_B_L[::rows_per_prompt, :prompt_len],
            "mm_token_type_ids": token_types(ids, image_id, video_id), **pixels}
