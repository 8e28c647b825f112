"""Built-in image (shapes) and video (motion) capabilities: files, answers, splits, options."""

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from copd.capabilities import BUILTIN_CAPABILITIES, load_capability
from copd.capabilities.prompt_sources import split_key
from copd.capabilities.visual import COLOUR_PROMPT, COUNT_PROMPT, MOTION_PROMPT, PALETTE
from copd.errors import CopdError
from copd.multimodal.media import VideoSampling, check_image, check_video, load_image, load_video


def _cap(builtin, tmp_path, **options):
    return load_capability({"name": "v", "builtin": builtin, "media_dir": str(tmp_path), **options})


def _draw(cap, n=40, seed=0):
    return cap.train_sampler(seed).draw(n)


def _pixels(image):
    return np.asarray(image, dtype=np.int64)


def _components(mask):
    """Number of 4-connected regions of True pixels."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def test_shape_centre_has_the_named_colour(tmp_path):
    samples = _draw(_cap("shapes", tmp_path, shape="any"))
    assert {s.answer for s in samples} == {"red", "green", "blue", "yellow"}
    for s in samples:
        assert (s.prompt, s.videos, len(s.images)) == (COLOUR_PROMPT, (), 1)
        pixels = _pixels(load_image(s.images[0]))
        assert pixels.shape == (56, 56, 3)
        shape = (pixels != PALETTE["white"]).any(-1)
        ys, xs = np.nonzero(shape)
        centre = pixels[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]
        assert tuple(centre) == PALETTE[s.answer]
        # Nothing but background and the named colour: no anti-aliased edges.
        assert {tuple(p) for p in pixels[shape]} == {PALETTE[s.answer]}


def test_shapes_options_change_the_picture(tmp_path):
    cap = _cap("shapes", tmp_path, size=28, colours="cyan,black", background="gray", shape="circle")
    for s in _draw(cap, 10):
        pixels = _pixels(load_image(s.images[0]))
        assert pixels.shape == (28, 28, 3) and tuple(pixels[0, 0]) in {PALETTE["gray"], PALETTE[s.answer]}
        assert s.answer in ("cyan", "black")


def test_count_task_answers_the_number_of_shapes(tmp_path):
    samples = _draw(_cap("shapes", tmp_path, task="count", shape="any", background="black"), 30)
    assert {s.answer for s in samples} == {"1", "2", "3"}
    for s in samples:
        assert s.prompt == COUNT_PROMPT
        shapes = (_pixels(load_image(s.images[0])) != PALETTE["black"]).any(-1)
        assert _components(shapes) == int(s.answer)


def _centroid(frame):
    ys, xs = np.nonzero((_pixels(frame) == 0).all(-1))
    return xs.mean(), ys.mean()


MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@pytest.mark.parametrize(("frames", "dot"), [(4, 20), (6, 10)])
def test_dot_moves_in_the_named_direction(tmp_path, frames, dot):
    samples = _draw(_cap("motion", tmp_path, frames=frames, dot_size=dot), 30)
    assert {s.answer for s in samples} == set(MOVES)
    for s in samples:
        assert (s.prompt, s.images, len(s.videos)) == (MOTION_PROMPT, (), 1)
        video = load_video(s.videos[0], VideoSampling(num_frames=frames)).frames
        assert len(video) == frames and {f.size for f in video} == {(56, 56)}
        for frame in video:
            pixels = _pixels(frame)
            dark = (pixels == 0).all(-1)
            # Exact colours after the GIF round trip: a dot x dot black square on white.
            assert ((pixels == 255).all(-1) | dark).all() and dark.sum() == dot * dot
        dx, dy = MOVES[s.answer]
        for a, b in itertools.pairwise(video):
            (xa, ya), (xb, yb) = _centroid(a), _centroid(b)
            moved = (xb - xa, yb - ya)
            # A third to a half of the dot's width along the direction, nothing across it.
            along, across = moved[0] * dx + moved[1] * dy, moved[0] * dy + moved[1] * dx
            assert dot // 3 <= along <= dot // 2 and across == 0


def test_video_frames_are_timed(tmp_path):
    (s,) = _draw(_cap("motion", tmp_path), 1)
    video = load_video(s.videos[0])  # 250 ms per frame: 4 fps
    assert (video.fps, video.total_frames, video.indices) == (4.0, 4, [0, 1, 2, 3])
    first, last = load_video(s.videos[0], VideoSampling(min_frames=2)).frames  # 1 s at 2 fps
    assert (_centroid(first), _centroid(last)) == (_centroid(video.frames[0]), _centroid(video.frames[3]))


def test_same_seed_same_files_anywhere(tmp_path):
    a = _draw(_cap("motion", tmp_path / "a"), 20, seed=3)
    b = _draw(_cap("motion", tmp_path / "b"), 20, seed=3)
    again = _draw(_cap("motion", tmp_path / "a"), 20, seed=3)
    assert a == again
    for x, y in zip(a, b, strict=True):
        (px,), (py,) = x.videos, y.videos
        assert Path(px).is_absolute() and Path(px).parent == tmp_path / "a" / "motion"
        assert Path(px).name == Path(py).name and Path(px).read_bytes() == Path(py).read_bytes()
    assert _draw(_cap("motion", tmp_path / "a"), 20, seed=4) != a


def test_existing_files_are_not_rewritten(tmp_path):
    cap = _cap("shapes", tmp_path)
    paths = [Path(s.images[0]) for s in _draw(cap, 20)]
    for path in paths:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert [Path(s.images[0]) for s in _draw(cap, 20)] == paths
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in paths)
    # Nothing half-written is left behind.
    assert not [p for p in (tmp_path / "shapes").iterdir() if p.suffix != ".png"]


@pytest.mark.parametrize(("builtin", "options"), [("shapes", {}), ("shapes", {"task": "count"}), ("motion", {})])
def test_split_by_prompt_and_file_names(tmp_path, builtin, options):
    cap = _cap(builtin, tmp_path, test_size=30, **options)
    test = cap.test_set()
    assert len(test) == 30 and len({s.prompt for s in test}) == 1
    train = {split_key(s) for s in _draw(cap, 400)}
    assert len(train) > 200 and not train & {split_key(s) for s in test}
    # The split depends on file names only, not on where the media folder is.
    moved = _cap(builtin, tmp_path / "elsewhere", test_size=30, **options).test_set()
    assert [split_key(s) for s in moved] == [split_key(s) for s in test]
    assert [(s.prompt, s.answer) for s in moved] == [(s.prompt, s.answer) for s in test]


def test_split_key_of_text_is_the_prompt(tmp_path):
    (s,) = BUILTIN_CAPABILITIES["addition"]().train_sampler(0).draw(1)
    assert split_key(s) == s.prompt
    (v,) = _draw(_cap("shapes", tmp_path), 1)
    assert split_key(v) == f"{COLOUR_PROMPT}\nimage {Path(v.images[0]).name}"


@pytest.mark.parametrize("builtin", ["shapes", "motion"])
def test_answers_score_one_and_files_pass_the_checks(tmp_path, builtin):
    cap = _cap(builtin, tmp_path)
    for s in _draw(cap, 20):
        assert cap.score(f" {s.answer}\n", s) == 1.0 and cap.score(s.answer + "s", s) == 0.0
        for path in s.images:
            check_image(path)
        for path in s.videos:
            check_video(path)


@pytest.mark.parametrize(
    ("builtin", "options", "fragment"),
    [
        ("shapes", {"colors": "red"}, "unknown option 'colors' (did you mean 'colours'?)"),
        ("motion", {"frame": 3}, "unknown option 'frame' (did you mean 'frames'?)"),
        ("shapes", {"size": "56"}, "option 'size' must be of type int"),
        ("shapes", {"size": 8}, "option 'size' must be >= 16"),
        ("shapes", {"task": "colours"}, "option 'task' must be colour or count"),
        ("shapes", {"shape": "triangle"}, "option 'shape' must be square, circle or any"),
        ("shapes", {"colours": "red,pink"}, "option 'colours' must be distinct comma-separated names"),
        ("shapes", {"colours": "red,red"}, "option 'colours' must be distinct"),
        ("shapes", {"colours": "red,white"}, "option 'background' must be a colour of"),
        ("motion", {"directions": "left,north"}, "option 'directions' must be distinct"),
        ("motion", {"frames": 1}, "option 'frames' must be >= 2"),
        ("motion", {"dot_size": 54}, "option 'dot_size' must leave room"),
        ("motion", {"test_size": 0}, "option 'test_size' must be >= 1"),
        ("motion", {"media_dir": " "}, "option 'media_dir' must not be empty"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, builtin, options, fragment):
    with pytest.raises(CopdError) as info:
        _cap(builtin, tmp_path, **options)
    message = str(info.value)
    assert "\n" not in message and f"capability 'v' (builtin '{builtin}')" in message
    assert fragment in message


def test_unwritable_media_dir(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cap = _cap("shapes", tmp_path / "file")
    with pytest.raises(CopdError, match="cannot write media file .*/file/shapes/"):
        _draw(cap, 1)
