"""Vision-language inputs (Qwen2-VL, Qwen2.5-VL): encoding and M-RoPE positions.

The decode loop and scoring that use them are in copd.backends.local.vl_decoding.

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
and checks their count against the vision features.

As in copd.backends.local.sampling, a prompt's G rows share one prefill: the prompt inputs hold
each distinct prompt once with its pixels, and the prefill's cache, last logits and
rope_deltas are repeated `rows_per_prompt` times (rows are grouped by prompt).
"""

from __future__ import annotations

import torch


PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


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


def _pixels(images, videos, image_processor, video_processor=None) -> dict:
    """Pixel tensors and grids of all images (then all videos), in row order.

    Videos go through transformers' video processor when there is one (it needs
    torchvision), keeping every given frame; otherwise through `video_patches`, which gives
    the same layout from the image processor.
    """
    feats = {}
    flat_images = [im for row in images for im in row]
    if flat_images:
        out = image_processor(images=flat_images, return_tensors="pt")
        feats["pixel_values"], feats["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
    flat_videos = [video for row in videos for video in row]
    if flat_videos and video_processor is not None:
        out = video_processor(videos=flat_videos, return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
        feats["pixel_values_videos"], feats["video_grid_thw"] = out["pixel_values_videos"], out["video_grid_thw"]
    elif flat_videos:
        parts = [video_patches(video, image_processor) for video in flat_videos]
        feats["pixel_values_videos"] = torch.cat([patches for patches, _ in parts])
        feats["video_grid_thw"] = torch.stack([grid for _, grid in parts])
    return feats


def encode_vl(texts: list[str], images: list[list] | None, videos: list[list[list]] | None, tokenizer,
              image_processor, video_processor=None) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for texts that hold one placeholder block per image and video.

    images[i] / videos[i] are row i's images and videos (a video is a list of PIL frames), in
    the order their placeholders appear. Returns input_ids, attention_mask, mm_token_type_ids
    (0 text, 1 image, 2 video; M-RoPE needs it) and, when present, pixel_values +
    image_grid_thw and pixel_values_videos + video_grid_thw.
    """
    images = images or [[] for _ in texts]
    videos = videos or [[] for _ in texts]
    feats = _pixels(images, videos, image_processor, video_processor)
    per_token = image_processor.merge_size ** 2
    image_counts = iter((feats.get("image_grid_thw", torch.zeros(0, 3)).prod(-1) // per_token).tolist())
    video_counts = iter((feats.get("video_grid_thw", torch.zeros(0, 3)).prod(-1) // per_token).tolist())
    image_id, video_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD), tokenizer.convert_tokens_to_ids(VIDEO_PAD)
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
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_token_type_ids": token_types(input_ids, image_id, video_id), **feats}


def token_types(input_ids: torch.Tensor, image_id: int, video_id: int) -> torch.Tensor:
    """mm_token_type_ids: 0 text, 1 image, 2 video (what marks the vision blocks for M-RoPE)."""
    return (input_ids == image_id).int() + 2 * (input_ids == video_id).int()


def rope_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(M-RoPE position ids [3, B, L], rope_deltas [B, 1]) of left-padded prompts (see module doc)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT adapters
    return plain.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"])


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
