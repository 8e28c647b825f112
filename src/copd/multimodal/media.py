"""Reading the images and videos that samples point to, and checking them before training.

A video is any of
  - a folder of frame images (png, jpg, jpeg, webp, bmp, gif), in natural file-name order
    (frame2 before frame10); a folder has no timing, so `fps` is ignored for it;
  - an animated image Pillow reads (GIF, animated WebP or PNG), timed by its frame durations;
  - any other video file (mp4, webm, avi, mov, mkv, ...), read with PyAV (pip install copd[video]).

Frames come back as RGB PIL images of one size. Every problem is a one-line CopdError that
names the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def load_video(
    path: str, num_frames: int | None = None, fps: float | None = None
) -> list[Image.Image]:
    """The frames of a video (see the module docstring), all RGB and of the first frame's size.

    With `fps`, the frames shown at times 0, 1/fps, 2/fps, ... are kept (each source frame at
    most once, so an fps above the source's rate keeps every frame); then, with `num_frames`,
    that many uniformly spaced frames including the first and the last (num_frames=1 keeps
    the first).
    """
    if num_frames is not None and num_frames < 1:
        raise CopdError(f"num_frames must be >= 1, got {num_frames} (reading {path})")
    if fps is not None and not fps > 0:
        raise CopdError(f"fps must be > 0, got {fps} (reading {path})")
    _require(path, "video")
    if Path(path).is_dir():
        files = frame_files(path)
        frames = [load_image(str(files[i])) for i in _uniform(len(files), num_frames)]
    elif Path(path).suffix.lower() in ANIMATED_SUFFIXES:
        frames = _animated_frames(path, num_frames, fps)
    else:
        frames = _pyav_frames(path, num_frames, fps)
    return _same_size(frames)


def check_video(path: str) -> None:
    """Cheap validation before training: a readable first frame, or a file that opens."""
    _require(path, "video")
    if Path(path).is_dir():
        check_image(str(frame_files(path)[0]))
    elif Path(path).suffix.lower() in ANIMATED_SUFFIXES:
        _verify(path, "video")
    else:
        with _open_video(_import_av(path), path):
            pass


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


def _uniform(count: int, num_frames: int | None) -> list[int]:
    """Indices of `num_frames` evenly spaced items of `count`, first and last included."""
    if num_frames is None or count <= num_frames:
        return list(range(count))
    if num_frames == 1:
        return [0]
    return [round(j * (count - 1) / (num_frames - 1)) for j in range(num_frames)]


def select_frames(
    starts: list[float], end: float | None, num_frames: int | None, fps: float | None
) -> list[int]:
    """Indices of the frames to keep, given each frame's start time and the video's end.

    Frame i is shown during [starts[i], starts[i + 1]); it is kept at `fps` when some
    k / fps falls in that span. Without timing (end None, or not after the first start)
    `fps` is ignored.
    """
    picked = list(range(len(starts)))
    first = starts[0] if starts else 0.0
    if fps is not None and end is not None and end > first:
        bounds = [t - first for t in starts[1:]] + [end - first]
        picked = []
        for i, t in enumerate(starts):
            # Rounded so that 0.25 s * 4 fps lands on 1, not 0.9999999.
            k = math.ceil(round((t - first) * fps, 6))
            if k < round(bounds[i] * fps, 6):
                picked.append(i)
    return [picked[j] for j in _uniform(len(picked), num_frames)]


def _animated_frames(path: str, num_frames: int | None, fps: float | None) -> list[Image.Image]:
    try:
        with Image.open(path) as image:
            ms = [f.info.get("duration") or 0 for f in ImageSequence.Iterator(image)]
            starts = [sum(ms[:i]) / 1000 for i in range(len(ms))]
            wanted = set(select_frames(starts, sum(ms) / 1000, num_frames, fps))
            # A second pass, as GIF frames only decode in order; only kept frames are copied.
            frames = ImageSequence.Iterator(image)
            return [f.convert("RGB") for i, f in enumerate(frames) if i in wanted]
    except Exception as exc:  # Pillow raises many types for broken or foreign files
        raise CopdError(f"cannot read video {path}: {_reason(exc)}") from None


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


def _pyav_frames(path: str, num_frames: int | None, fps: float | None) -> list[Image.Image]:
    av = _import_av(path)
    try:
        with _open_video(av, path) as (container, stream):
            starts, end = _packet_times(container, stream)
        with _open_video(av, path) as (container, stream):
            if not starts:
                # No packet times (say a raw stream): decode everything, select by count.
                frames = [f.to_image() for f in container.decode(stream)]
                return [frames[i].convert("RGB") for i in _uniform(len(frames), num_frames)]
            wanted = select_frames(starts, end, num_frames, fps)
            return [f.to_image().convert("RGB") for f in _decoded(container, stream, wanted)]
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
