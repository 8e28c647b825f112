"""Built-in image and video capabilities for vision-language models.

Procedural, seedable and exactly verifiable like the character tasks, and small enough for
a tiny Qwen2-VL (a 56x56 picture is a 4x4 patch grid, 4 tokens after the 2x2 merge):
  shapes  one filled square or circle on a plain background: "What colour is the shape?"
          (task: colour), or 1 to 3 shapes: "How many shapes are there?" (task: count)
  motion  a black square dot (20 pixels by default) moving a third to a half of its width
          per frame across a short white video: "Which way does the dot move?", answered
          left, right, up or down

Media are real files, so training exercises the same path as a user's data: pictures are
PNGs and videos animated GIFs, written under <media_dir>/<builtin>/ the first time a sample
needs them, named by a hash of what they show (the same sample always maps to the same file).
A relative media_dir is relative to the working directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageDraw

from copd.capabilities.capability import Capability, Sample, merge_options
from copd.capabilities.prompt_sources import ProceduralSource
from copd.capabilities.readings import READINGS
from copd.capabilities.verifiers import exact
from copd.errors import CopdError

DEFAULT_MEDIA_DIR = "~/.cache/copd/media"
# Part of every file's hash: bump it when rendering changes, so stale cached files are not reused.
RENDER_VERSION = 1
# Display time of each video frame: load_video(fps=4) keeps every frame.
FRAME_MS = 250

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 140, 0),
    "purple": (128, 0, 160),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("square", "circle")
DIRECTIONS = ("left", "right", "up", "down")
MAX_COUNT = 3

COLOUR_PROMPT = "What colour is the shape?"
COUNT_PROMPT = "How many shapes are there?"
MOTION_PROMPT = "Which way does the dot move?"

SHAPES_DEFAULTS: dict[str, Any] = {
    "size": 56,
    "shape": "square",
    "colours": "red,green,blue,yellow",
    "background": "white",
    "task": "colour",
    "media_dir": DEFAULT_MEDIA_DIR,
    "test_size": 200,
}
MOTION_DEFAULTS: dict[str, Any] = {
    "size": 56,
    "frames": 4,
    "dot_size": 20,
    "directions": "left,right,up,down",
    "media_dir": DEFAULT_MEDIA_DIR,
    "test_size": 200,
}


def _shapes(rng: random.Random, o: dict[str, Any]) -> Sample:
    size, colour = o["size"], rng.choice(o["colours"])
    count = 1 if o["task"] == "colour" else rng.randint(1, MAX_COUNT)
    # One big shape is easiest to see; counted shapes are smaller so three always fit.
    side = size * 3 // 8 if o["task"] == "colour" else size // 5
    boxes: list[tuple[int, int]] = []
    while len(boxes) < count:
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        # A gap of 2 pixels keeps neighbouring shapes from touching and reading as one.
        if all(abs(x - bx) >= side + 2 or abs(y - by) >= side + 2 for bx, by in boxes):
            boxes.append((x, y))
    shapes = [rng.choice(SHAPES) if o["shape"] == "any" else o["shape"] for _ in boxes]
    spec = {
        "builtin": "shapes", "version": RENDER_VERSION, "size": size, "side": side,
        "background": PALETTE[o["background"]], "colour": PALETTE[colour],
        "shapes": [[kind, x, y] for kind, (x, y) in zip(shapes, boxes, strict=True)],
    }
    path = media_file(o["media_dir"], spec, ".png", _draw_shapes)
    if o["task"] == "colour":
        return Sample(COLOUR_PROMPT, colour, images=(path,))
    return Sample(COUNT_PROMPT, str(count), images=(path,))


def _draw_shapes(spec: dict[str, Any], out: IO[bytes]) -> None:
    size, side, fill = spec["size"], spec["side"], tuple(spec["colour"])
    image = Image.new("RGB", (size, size), tuple(spec["background"]))
    draw = ImageDraw.Draw(image)
    for kind, x, y in spec["shapes"]:
        box = (x, y, x + side - 1, y + side - 1)
        # No anti-aliasing: every pixel is the background or the named colour.
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=fill)
    image.save(out, format="PNG")


def _motion(rng: random.Random, o: dict[str, Any]) -> Sample:
    size, dot, frames = o["size"], o["dot_size"], o["frames"]
    direction = rng.choice(o["directions"])
    step = rng.randint(*_step_range(size, dot, frames))
    start = rng.randint(0, size - dot - step * (frames - 1))
    across = rng.randint(0, size - dot)
    points = []
    for t in range(frames):
        along = start + t * step
        if direction in ("left", "up"):
            along = size - dot - along
        points.append([along, across] if direction in ("left", "right") else [across, along])
    spec = {
        "builtin": "motion", "version": RENDER_VERSION, "size": size, "dot": dot,
        "frame_ms": FRAME_MS, "points": points,
    }
    return Sample(MOTION_PROMPT, direction, videos=(media_file(o["media_dir"], spec, ".gif", _draw_motion),))


def _step_range(size: int, dot: int, frames: int) -> tuple[int, int]:
    """Pixels the dot moves per frame: from a third to a half of its width, if that fits.

    Overlapping positions keep both frames of a pair inside the same patches, where the
    patch embedding (a Conv3d over pairs of consecutive frames) sees the shift directly; a
    tiny Qwen2-VL did not learn the direction from a 10-pixel dot jumping its own width, nor
    from a 16-pixel one, but learns it from a 20-pixel dot moving 6 to 9 pixels.
    """
    longest = (size - dot) // (frames - 1)
    low = min(max(1, dot // 3), longest)
    return low, max(low, min((dot - 1) // 2, longest))


def _draw_motion(spec: dict[str, Any], out: IO[bytes]) -> None:
    size, dot = spec["size"], spec["dot"]
    frames = []
    for x, y in spec["points"]:
        # Palette images (0 white, 1 black) so GIF stores the exact colours, no quantising.
        frame = Image.new("P", (size, size), 0)
        frame.putpalette([*PALETTE["white"], *PALETTE["black"]])
        ImageDraw.Draw(frame).rectangle((x, y, x + dot - 1, y + dot - 1), fill=1)
        frames.append(frame)
    frames[0].save(
        out, format="GIF", save_all=True, append_images=frames[1:],
        duration=spec["frame_ms"], loop=0, optimize=False,
    )


def media_file(
    folder: Path, spec: dict[str, Any], suffix: str, draw: Callable[[dict[str, Any], IO[bytes]], None]
) -> str:
    """The absolute path of the file showing `spec`, drawn only when it does not exist yet.

    Written under a unique temporary name then renamed, so concurrent writers (say parallel
    runs sharing the cache) never expose a half-written file.
    """
    text = json.dumps(spec, sort_keys=True)
    name = hashlib.sha1(text.encode("utf-8")).hexdigest()[:20] + suffix
    target = folder / spec["builtin"] / name
    if target.exists():
        return str(target)
    temporary = target.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = temporary.open("xb")
    except OSError as exc:
        raise CopdError(f"cannot write media file {target}: {exc.strerror or exc}") from None
    try:
        with out:
            draw(spec, out)
        os.replace(temporary, target)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, say
            raise CopdError(f"cannot write media file {target}: {exc.strerror or exc}") from None
        raise
    return str(target)


def _names(option: str, value: str, choices: tuple[str, ...] | dict[str, Any]) -> list[str]:
    """A comma-separated option as a list of distinct names, each one of `choices`."""
    names = [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in choices]
    if not value.strip() or bad or len(set(names)) != len(names):
        raise CopdError(
            f"option {option!r} must be distinct comma-separated names from "
            f"{', '.join(choices)}, got {value!r}"
        )
    return names


def _check_common(o: dict[str, Any], min_size: int) -> dict[str, Any]:
    if o["test_size"] < 1:
        raise CopdError(f"option 'test_size' must be >= 1, got {o['test_size']}")
    if o["size"] < min_size:
        raise CopdError(f"option 'size' must be >= {min_size}, got {o['size']}")
    if not o["media_dir"].strip():
        raise CopdError("option 'media_dir' must not be empty")
    # Resolved once here, so a later change of working directory moves nothing.
    return {**o, "media_dir": Path(o["media_dir"]).expanduser().absolute()}


def _shapes_options(given: dict[str, Any]) -> dict[str, Any]:
    o = _check_common(merge_options(SHAPES_DEFAULTS, given), 16)
    if o["task"] not in ("colour", "count"):
        raise CopdError(f"option 'task' must be colour or count, got {o['task']!r}")
    if o["shape"] not in (*SHAPES, "any"):
        raise CopdError(f"option 'shape' must be square, circle or any, got {o['shape']!r}")
    colours = _names("colours", o["colours"], PALETTE)
    if o["background"] not in PALETTE or o["background"] in colours:
        raise CopdError(
            f"option 'background' must be a colour of {', '.join(PALETTE)} "
            f"that is not in 'colours', got {o['background']!r}"
        )
    return {**o, "colours": colours}


def _motion_options(given: dict[str, Any]) -> dict[str, Any]:
    o = _check_common(merge_options(MOTION_DEFAULTS, given), 8)
    if o["frames"] < 2:
        raise CopdError(f"option 'frames' must be >= 2, got {o['frames']}")
    if not 1 <= o["dot_size"] <= o["size"] - (o["frames"] - 1):
        raise CopdError(
            f"option 'dot_size' must leave room to move 1 pixel per frame: between 1 and "
            f"size - (frames - 1) = {o['size'] - o['frames'] + 1}, got {o['dot_size']}"
        )
    return {**o, "directions": _names("directions", o["directions"], DIRECTIONS)}


def _factory(
    name: str,
    generate: Callable[[random.Random, dict[str, Any]], Sample],
    options: Callable[[dict[str, Any]], dict[str, Any]],
) -> Callable[..., Capability]:
    def make(**given: Any) -> Capability:
        o = options(given)
        source = ProceduralSource(name, functools.partial(generate, o=o), o["test_size"])
        return Capability(name, exact, source, READINGS["exact"])

    make.__name__ = f"make_{name}"
    return make


VISUAL_CAPABILITIES: dict[str, Callable[..., Capability]] = {
    "shapes": _factory("shapes", _shapes, _shapes_options),
    "motion": _factory("motion", _motion, _motion_options),
}
