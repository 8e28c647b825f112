"""Reading images and videos (copd.multimodal.media) and the media checks done when data is loaded."""

import json
import sys

import pytest
from PIL import Image

from copd.errors import CopdError
from copd.multimodal.media import check_image, check_video, load_image, load_video, select_frames
from copd.capabilities import load_capability

# Durations (ms) of the test GIF: frames start at 0, .1, .2, .4, .5 and .8 s; it ends at 1 s.
DURATIONS = [100, 100, 200, 100, 300, 200]


def _shade(i):
    return (40 * i, 255 - 40 * i, 7)


def _gif(path, durations=DURATIONS, size=(16, 12)):
    frames = [Image.new("RGB", size, _shade(i)) for i in range(len(durations))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, optimize=False)
    return str(path)


def _indices(frames):
    """Which _shade(i) each frame shows (its red channel is 40 * i)."""
    return [f.getpixel((0, 0))[0] // 40 for f in frames]


def _error(call, *args, **kwargs):
    with pytest.raises(CopdError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_image_is_rgb(tmp_path):
    Image.new("RGBA", (5, 4), (10, 20, 30, 255)).save(tmp_path / "a.png")
    Image.new("L", (3, 3), 200).save(tmp_path / "b.jpg")
    a, b = load_image(str(tmp_path / "a.png")), load_image(str(tmp_path / "b.jpg"))
    assert (a.mode, a.size, a.getpixel((0, 0))) == ("RGB", (5, 4), (10, 20, 30))
    assert b.mode == "RGB" and b.size == (3, 3)
    check_image(str(tmp_path / "a.png"))


def test_image_errors_name_the_file(tmp_path):
    missing, junk = str(tmp_path / "x/a.png"), tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    for call in (load_image, check_image):
        assert _error(call, missing) == f"image not found: {missing}"
        assert _error(call, str(junk)).startswith(f"cannot read image {junk}: ")
        assert _error(call, str(tmp_path)) == f"cannot read image {tmp_path}: it is a folder"


def test_folder_frames_in_natural_order(tmp_path):
    # Plain string order would put frame10 before frame2.
    for shade, name in enumerate(["frame1.png", "frame2.png", "frame10.png"]):
        Image.new("RGB", (8, 8), _shade(shade)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    Image.new("RGB", (8, 8), _shade(5)).save(tmp_path / ".hidden.png")
    assert _indices(load_video(str(tmp_path))) == [0, 1, 2]
    check_video(str(tmp_path))


def test_folder_ignores_fps_and_takes_uniform_frames(tmp_path):
    for i in range(5):
        Image.new("RGB", (8, 8), _shade(i)).save(tmp_path / f"f{i}.jpg", quality=100)
    assert len(load_video(str(tmp_path), fps=0.001)) == 5  # a folder has no timing
    assert [round(f.getpixel((4, 4))[0] / 40) for f in load_video(str(tmp_path), num_frames=3)] == [0, 2, 4]


def test_frames_take_the_first_frame_size(tmp_path):
    Image.new("RGB", (8, 6), "red").save(tmp_path / "1.png")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "2.png")
    frames = load_video(str(tmp_path))
    assert [f.size for f in frames] == [(8, 6), (8, 6)] and frames[1].getpixel((3, 3)) == (0, 0, 255)


def test_animated_gif_all_frames(tmp_path):
    frames = load_video(_gif(tmp_path / "v.gif"))
    assert _indices(frames) == [0, 1, 2, 3, 4, 5]
    assert frames[3].getpixel((5, 5)) == _shade(3) and frames[3].mode == "RGB"
    check_video(str(tmp_path / "v.gif"))


@pytest.mark.parametrize(
    ("num_frames", "fps", "expected"),
    [
        (None, 5, [0, 2, 3, 4, 5]),  # shown at 0, .2, .4, .6, .8 s
        (None, 10, [0, 1, 2, 3, 4, 5]),  # a frame shown twice is kept once
        (None, 1, [0]),
        (3, None, [0, 2, 5]),  # first and last included
        (1, None, [0]),
        (3, 5, [0, 3, 5]),  # fps first, then uniform over [0, 2, 3, 4, 5]
        (10, None, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_animated_gif_frame_selection(tmp_path, num_frames, fps, expected):
    assert _indices(load_video(_gif(tmp_path / "v.gif"), num_frames, fps)) == expected


def test_select_frames_without_timing_ignores_fps():
    assert select_frames([0.0, 0.0, 0.0], 0.0, None, 2.0) == [0, 1, 2]
    assert select_frames([0.0, 0.5, 1.0], None, 2, 100.0) == [0, 2]


def test_video_errors_name_the_file(tmp_path, monkeypatch):
    missing, junk, empty = tmp_path / "no.gif", tmp_path / "junk.gif", tmp_path / "empty"
    junk.write_bytes(b"GIF89a broken")
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    for call in (load_video, check_video):
        assert _error(call, str(missing)) == f"video not found: {missing}"
        assert _error(call, str(empty)).startswith("no frame images (png, jpg, jpeg, webp, bmp, gif)")
        assert _error(call, str(empty)).endswith(f"in video folder {empty}")
    assert _error(load_video, str(junk)).startswith(f"cannot read video {junk}: ")
    assert "num_frames must be >= 1" in _error(load_video, _gif(tmp_path / "v.gif"), 0)
    assert "fps must be > 0" in _error(load_video, str(tmp_path / "v.gif"), None, -1.0)


def test_other_videos_need_pyav(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 32)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    for call in (load_video, check_video):
        assert _error(call, str(clip)) == f"reading {clip} needs PyAV: pip install copd[video]"


def _mp4(path, count=10, rate=10):
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(count):
            pixels = np.full((32, 32, 3), (25 * i, 100, 100), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def _reds(frames):
    return [f.getpixel((16, 16))[0] for f in frames]


def test_pyav_video_frames_and_selection(tmp_path):
    path = _mp4(tmp_path / "clip.mp4")
    check_video(path)
    frames = load_video(path)
    assert len(frames) == 10 and frames[0].size == (32, 32) and frames[0].mode == "RGB"
    reds = _reds(frames)
    # Lossy codec: shades come back close to 25 * i, not exact.
    assert all(abs(red - 25 * i) <= 6 for i, red in enumerate(reds))
    assert _reds(load_video(path, fps=5)) == [reds[i] for i in (0, 2, 4, 6, 8)]
    assert _reds(load_video(path, num_frames=4)) == [reds[i] for i in (0, 3, 6, 9)]
    assert _reds(load_video(path, num_frames=2, fps=5)) == [reds[0], reds[8]]


def test_pyav_unreadable_video(tmp_path):
    pytest.importorskip("av")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video")
    for call in (load_video, check_video):
        assert _error(call, str(junk)).startswith(f"cannot read video {junk}: ")


# The media checks when a data file is loaded: a bad file fails before training.


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load_error(spec):
    with pytest.raises(CopdError) as info:
        load_capability({"name": "t", "test_ratio": 0.5, **spec})
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_image_names_file_and_line(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{i}.png")
    rows = [{"prompt": f"p{i}", "answer": "a", "image": f"img/{i}.png"} for i in (0, 1, 9)]
    path = _jsonl(tmp_path / "charts.jsonl", rows)
    message = _load_error({"path": str(path), "images_field": "image"})
    assert message.endswith(
        f'{path}:3: field "image": image not found: {tmp_path / "img" / "9.png"}'
    )


def test_unreadable_video_names_file_and_row(tmp_path):
    _gif(tmp_path / "ok.gif")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    rows = [{"prompt": "a", "answer": "x", "clip": "ok.gif"}, {"prompt": "b", "answer": "y", "clip": ["ok.gif", "bad.gif"]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    message = _load_error({"path": str(tmp_path / "data.json"), "videos_field": "clip"})
    assert f'data.json: row 2: field "clip": cannot read video {tmp_path / "bad.gif"}: ' in message


def test_urls_are_refused_when_the_data_loads(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "a", "image": f"https://example.com/{i}.png"} for i in range(4)]
    path = _jsonl(tmp_path / "web.jsonl", rows)
    with pytest.raises(CopdError, match=r"web\.jsonl:1: field \"image\": https://example.com/0.png is a URL"):
        load_capability({"name": "t", "path": str(path), "images_field": "image", "test_ratio": 0.5})
