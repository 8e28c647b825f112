"""Reading the images and videos that samples point to, and checking them before training.

A video is any of
  - a folder of frame images (png, jpg, jpeg, webp, bmp, gif), in natural file-name order
    (frame2 before frame10); a folder has no timing and plays at a stated rate
    (VideoSampling.folder_fps, model.vision.folder_fps in a config);
  - an animated image Pillow reads (GIF, animated WebP or PNG), timed by its frame durations;
  - any other video file (mp4, webm, avi, mov, mkv, ...), read with PyAV (pip install copd[video]),
    timed by its packets.

A loaded video is a `Video`: the sampled frames (RGB PIL images of one size) with their
source frame indices and the source's fps, from which a Qwen3-VL prompt's timestamps follow.
Every problem is a one-line CopdError that names the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
from PIL import Image, ImageSequence

from copd.errors import CopdError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Video files with these suffixes are read by Pillow (frame by frame); the rest need PyAV.
ANIMATED_SUFFIXES = (".gif", ".webp", ".png", ".apng")
# Longest exception text kept in an error, so a message stays one short line.
REASON_LIMIT = 200


def load_image(path: str) -> Image.Image:
    """The image at `path`, converted to RGB."""
    _require(path, "image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:  # Pillow raises many types for broken or foreign files
        raise CopdError(f"cannot read image {path}: {_reason(exc)}") from None


def check_image(path: str) -> None:
    """Cheap validation before training: the file exists and Pillow can open and verify it."""
    _require(path, "image")
    _verify(path, "image")


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video a model sees (Qwen's convention: 2 per second, 4 to 768, an even count).

    The frame count is (source frames / source fps * fps), or `num_frames` when set, clamped
    to [min_frames, max_frames] and to the source's frame count, then rounded down to a
    multiple of `frame_factor` (the temporal patch: two frames make one visual step); the
    frames are spread evenly from the first to the last. A folder of frames has no timing
    and plays at `folder_fps`.
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    num_frames: int | None = None
    folder_fps: float = 2.0
    frame_factor: int = 2

    def __post_init__(self) -> None:
        for name in ("fps", "folder_fps"):
            if not getattr(self, name) > 0:
                raise CopdError(f"video {name} must be > 0, got {getattr(self, name)}")
        if not self.frame_factor <= self.min_frames <= self.max_frames:
            raise CopdError(f"video frames: need {self.frame_factor} <= min_frames ({self.min_frames}) "
                            f"<= max_frames ({self.max_frames})")
        if self.num_frames is not None and self.num_frames < self.frame_factor:
            raise CopdError(f"video num_frames must be >= {self.frame_factor}, got {self.num_frames}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> VideoSampling:
        """From the keys of model.vision (video_fps, video_min_frames, ...); absent keys keep their defaults."""
        names = {"video_fps": "fps", "video_min_frames": "min_frames", "video_max_frames": "max_frames",
                 "video_frames": "num_frames", "folder_fps": "folder_fps"}
        return cls(**{field: options[key] for key, field in names.items() if key in options})

    def indices(self, total: int, source_fps: float, path: str = "") -> list[int]:
        """Source indices of the sampled frames of a video of `total` frames at `source_fps`."""
        if total < self.min_frames:
            raise CopdError(f"video {path} has {total} frame{'s' * (total != 1)}; the model needs at least "
                            f"{self.min_frames} (model.vision.video_min_frames)")
        wanted = self.num_frames if self.num_frames is not None else total / source_fps * self.fps
        count = min(max(wanted, self.min_frames), self.max_frames, total)
        count = int(count // self.frame_factor * self.frame_factor)
        return [round(i) for i in numpy.linspace(0, total - 1, count)]


@dataclass
class Video:
    """The sampled frames of a video with where they came from: what the prompt's timestamps need."""

    frames: list[Image.Image]
    indices: list[int]  # source frame index of each frame
    fps: float  # the source's frame rate
    total_frames: int

    def metadata(self) -> dict[str, Any]:
        """transformers' video metadata (fps, frames_indices, total_num_frames)."""
        return {"fps": self.fps, "frames_indices": list(self.indices), "total_num_frames": self.total_frames}

    def seconds(self) -> list[float]:
        """The time of each frame in the source, in seconds."""
        return [i / self.fps for i in self.indices]


def load_video(path: str, sampling: VideoSampling = VideoSampling()) -> Video:
    """The frames of a video (see the module docstring) that `sampling` picks, all RGB and of the first frame's size."""
    _require(path, "video")
    if Path(path).is_dir():
        files = frame_files(path)
        indices = sampling.indices(len(files), sampling.folder_fps, path)
        video = Video([load_image(str(files[i])) for i in indices], indices, sampling.folder_fps, len(files))
    elif Path(path).suffix.lower() in ANIMATED_SUFFIXES:
        video = _animated_video(path, sampling)
    else:
        video = _pyav_video(path, sampling)
    video.frames = _same_size(video.frames)
    return video


def check_video(path: str, sampling: VideoSampling = VideoSampling()) -> None:
    """Validation before training: every frame readable (all of a folder's), and enough of them."""
    _require(path, "video")
    if Path(path).is_dir():
        files = frame_files(path)
        for file in files:
            check_image(str(file))
        total = len(files)
    elif Path(path).suffix.lower() in ANIMATED_SUFFIXES:
        _verify(path, "video")
        total, _ = _animated_timing(path)
    else:
        total = _pyav_frame_count(path)
    sampling.indices(total, sampling.folder_fps, path)


def frame_files(folder: str) -> list[Path]:
    """The frame images of a video folder in natural name order; none is an error."""
    files = [
        p
        for p in Path(folder).iterdir()
        # Dot files are editor or OS leftovers (._frame1.png from macOS), not frames.
        if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")
    ]
    if not files:
        raise CopdError(
            f"no frame images ({', '.join(s[1:] for s in FRAME_SUFFIXES)}) in video folder {folder}"
        )
    return sorted(files, key=lambda p: (natural_key(p.name), p.name))


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort key reading digit runs as numbers: frame2 < frame10."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", name)
        if part
    ]


def _require(path: str, kind: str) -> None:
    if not Path(path).exists():
        raise CopdError(f"{kind} not found: {path}")
    if kind == "image" and Path(path).is_dir():
        raise CopdError(f"cannot read image {path}: it is a folder")


def _verify(path: str, kind: str) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # Pillow raises many types for broken or foreign files
        raise CopdError(f"cannot read {kind} {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def _source_fps(count: int, seconds: float, fallback: float) -> float:
    """Frames per second of `count` frames lasting `seconds`; without timing, the stated fallback."""
    return count / seconds if seconds > 0 else fallback


def _durations(image: Image.Image) -> list[int]:
    """Each frame's display time in milliseconds, from an open animated image."""
    return [f.info.get("duration") or 0 for f in ImageSequence.Iterator(image)]


def _animated_timing(path: str) -> tuple[int, float]:
    """(frame count, total seconds) of an animated image, from its frame durations."""
    try:
        with Image.open(path) as image:
            ms = _durations(image)
    except Exception as exc:  # Pillow raises many types for broken or foreign files
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None
    return len(ms), sum(ms) / 1000


def _animated_video(path: str, sampling: VideoSampling) -> Video:
    try:
        with Image.open(path) as image:
            ms = _durations(image)
            fps = _source_fps(len(ms), sum(ms) / 1000, sampling.folder_fps)
            indices = sampling.indices(len(ms), fps, path)
            wanted = set(indices)
            # A second pass over the frames, as GIF frames only decode in order; only kept frames are copied.
            frames = [f.convert("RGB") for i, f in enumerate(ImageSequence.Iterator(image)) if i in wanted]
    except CopdError:
        raise
    except Exception as exc:  # Pillow raises many types for broken or foreign files
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None
    return Video(frames, indices, fps, len(ms))


def _import_av(path: str) -> Any:
    try:
        import av
    except ImportError:
        raise CopdError(f"reading {path} needs PyAV: pip install copd[video]") from None
    return av


@contextmanager
def _open_video(av: Any, path: str) -> Iterator[tuple[Any, Any]]:
    """(container, first video stream) of av.open(path); any failure is a CopdError."""
    try:
        container = av.open(path)
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None
    try:
        if not container.streams.video:
            raise CopdError(f"cannot read video {path}: it has no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _pyav_video(path: str, sampling: VideoSampling) -> Video:
    av = _import_av(path)
    try:
        with _open_video(av, path) as (container, stream):
            starts, end = _packet_times(container, stream)
        with _open_video(av, path) as (container, stream):
            if not starts:
                # No packet times (say a raw stream): decode everything at the stream's stated rate.
                frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
                fps = float(stream.average_rate or sampling.folder_fps)
                indices = sampling.indices(len(frames), fps, path)
                return Video([frames[i] for i in indices], indices, fps, len(frames))
            fps = _source_fps(len(starts), (end or starts[0]) - starts[0], sampling.folder_fps)
            indices = sampling.indices(len(starts), fps, path)
            frames = [f.to_image().convert("RGB") for f in _decoded(container, stream, indices)]
            return Video(frames, indices, fps, len(starts))
    except CopdError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None


def _pyav_frame_count(path: str) -> int:
    """Frames of a PyAV video: its timed packets, or (without packet times) its decoded frames."""
    av = _import_av(path)
    try:
        with _open_video(av, path) as (container, stream):
            count = len(_packet_times(container, stream)[0])
        if count:
            return count
        with _open_video(av, path) as (container, stream):
            return sum(1 for _ in container.decode(stream))
    except CopdError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None


def _packet_times(container: Any, stream: Any) -> tuple[list[float], float | None]:
    """Frame start times (seconds) and the end time, from the packets alone: no decoding."""
    spans = sorted((p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None and p.size)
    if not spans or stream.time_base is None:
        return [], None
    base = float(stream.time_base)
    starts = [pts * base for pts, _ in spans]
    last_pts, last_duration = spans[-1]
    if not last_duration and stream.average_rate:
        return starts, starts[-1] + 1 / float(stream.average_rate)
    return starts, (last_pts + last_duration) * base


def _decoded(container: Any, stream: Any, wanted: list[int]) -> Iterator[Any]:
    """The decoded frames at positions `wanted` (ascending); decoding stops after the last.

    Decoders emit frames in presentation order, the order of the sorted packet times.
    """
    keep = set(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in keep:
            yield frame
        if index >= wanted[-1]:
            return


def _same_size(frames: list[Image.Image]) -> list[Image.Image]:
    if not frames:
        return frames
    size = frames[0].size
    return [f if f.size == size else f.resize(size, Image.Resampling.BILINEAR) for f in frames]
