"""What differs between the vision-language model families copd drives: one small entry each.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share the tokens (`<|vision_start|>`, `<|image_pad|>`,
`<|video_pad|>`, `<|vision_end|>`), the patch layout and the M-RoPE call. They differ in
  - the processor classes a checkpoint names (what `AutoProcessor` builds with torchvision);
  - how a video's frames are resized: Qwen2/2.5-VL size each frame alone, Qwen3-VL spends one
    pixel budget on all frames together (`size.longest_edge` counts T x H x W);
  - how a video's placeholder expands: Qwen2/2.5-VL repeat `<|video_pad|>` once per merged
    patch of the whole video; Qwen3-VL writes one block per temporal step (two frames),
    each after its timestamp text, `<t seconds><|vision_start|>pads<|vision_end|>`. Its
    M-RoPE gives every step its own grid and carries time only in that text, so without the
    timestamps the positions do not line up;
  - Qwen2.5-VL's M-RoPE also takes the seconds per temporal step (`second_per_grid_ts`).
Each expansion here builds the same text the family's own processor builds (tested against
it where torchvision is installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from copd.errors import CopdError

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# What a chat template writes for an image or video content item, before expansion.
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END


@dataclass(frozen=True)
class VideoLayout:
    """What expanding one video's placeholder needs: its grid and where its frames came from."""

    grid_thw: tuple[int, int, int]
    merge_size: int
    temporal_patch_size: int
    indices: list[int]
    fps: float


def per_frame_size(frames: int, height: int, width: int, settings: dict) -> tuple[int, int]:
    """Qwen2/2.5-VL: each frame resized alone to a multiple of patch x merge within the pixel range."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size, factor = settings["size"], settings["patch_size"] * settings["merge_size"]
    return smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


def whole_video_size(frames: int, height: int, width: int, settings: dict) -> tuple[int, int]:
    """Qwen3-VL: one pixel budget for all frames together (factor 32 at patch 16)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    size = settings["size"]
    return smart_resize(frames, height, width, temporal_factor=settings["temporal_patch_size"],
                        factor=settings["patch_size"] * settings["merge_size"], min_pixels=size["shortest_edge"],
                        max_pixels=size["longest_edge"])


def repeated_pads(video: VideoLayout) -> str:
    """Qwen2/2.5-VL: one `<|video_pad|>` per merged patch of the whole video."""
    t, h, w = video.grid_thw
    return VIDEO_PAD * (t * h * w // video.merge_size ** 2)


def step_timestamps(indices: list[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal step: the mean time of its first and last frame.

    The last frame is repeated to fill the final step, as the patches repeat it.
    """
    padded = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [i / fps for i in padded]
    return [(seconds[k] + seconds[k + temporal_patch_size - 1]) / 2 for k in range(0, len(seconds), temporal_patch_size)]


def timestamped_steps(video: VideoLayout) -> str:
    """Qwen3-VL: `<t seconds><|vision_start|>pads<|vision_end|>` for each temporal step."""
    t, h, w = video.grid_thw
    pads = VIDEO_PAD * (h * w // video.merge_size ** 2)
    times = step_timestamps(video.indices, video.fps, video.temporal_patch_size)
    if len(times) != t:
        raise ValueError(f"a video of {len(video.indices)} frames has {len(times)} steps, its grid {t}")
    return "".join(f"<{time:.1f} seconds>{VISION_START}{pads}{VISION_END}" for time in times)


@dataclass(frozen=True)
class VLFamily:
    model_type: str
    model_class: str  # the transformers class of the whole model (vision tower + language model)
    processor_class: str
    video_processor_type: str
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    video_size: Callable[[int, int, int, dict], tuple[int, int]]
    video_text: Callable[[VideoLayout], str]
    # M-RoPE takes the seconds of each temporal step (Qwen2.5-VL's second_per_grid_ts).
    seconds_per_step: bool = False
    # Keyword arguments of the family's video processor call that pin copd's conventions.
    video_call: dict[str, Any] = field(default_factory=dict)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Both routes spend a video's pixel budget without a per-frame cap (cap_pixels_per_frame False).
NO_FRAME_CAP = {"cap_pixels_per_frame": False}

FAMILIES: dict[str, VLFamily] = {
    "qwen2_vl": VLFamily(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14,
        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, per_frame_size, repeated_pads, video_call=NO_FRAME_CAP),
    "qwen2_5_vl": VLFamily(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14,
        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, per_frame_size, repeated_pads, seconds_per_step=True, video_call=NO_FRAME_CAP),
    "qwen3_vl": VLFamily(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16,
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), whole_video_size, timestamped_steps, video_call=NO_FRAME_CAP),
}


def family(model_type: str | None) -> VLFamily:
    """The family of a config's model_type; an unknown one is a one-line error."""
    if model_type not in FAMILIES:
        raise CopdError(f"vision-language model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
