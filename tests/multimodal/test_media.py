"""Reading images and videos (copd.multimodal.media) and the media checks done when data is loaded."""

import json
import sys

import pytest
from PIL import Image

from copd.capabilities import load_capability
from copd.errors import CopdError
from copd.multimodal.media import VideoSampling, check_image, check_video, load_image, load_video
from tests.extras import require

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


def _folder(path, count, size=(8, 8)):
    path.mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, _shade(i)).save(path / f"f{i}.png")
    return str(path)


def test_folder_frames_in_natural_order(tmp_path):
    # Plain string order would put frame10 before frame2.
    for shade, name in enumerate(["frame1.png", "frame2.png", "frame10.png", "frame11.png"]):
        Image.new("RGB", (8, 8), _shade(shade)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    Image.new("RGB", (8, 8), _shade(5)).save(tmp_path / ".hidden.png")
    video = load_video(str(tmp_path))
    assert _indices(video.frames) == [0, 1, 2, 3] and video.indices == [0, 1, 2, 3]
    check_video(str(tmp_path))


@pytest.mark.parametrize(
    ("total", "source_fps", "sampling", "expected"),
    [
        (4, 4.0, VideoSampling(), [0, 1, 2, 3]),  # 2 fps of a 1 s clip is 2 frames: raised to the minimum 4
        (10, 10.0, VideoSampling(), [0, 3, 6, 9]),
        (40, 10.0, VideoSampling(), [0, 6, 11, 17, 22, 28, 33, 39]),  # 4 s at 2 fps: 8 frames
        (5, 2.0, VideoSampling(), [0, 1, 3, 4]),  # 5 frames at 2 fps would be 5: rounded down to even
        (100, 10.0, VideoSampling(max_frames=6), [0, 20, 40, 59, 79, 99]),
        (10, 1.0, VideoSampling(num_frames=7), [0, 2, 4, 5, 7, 9]),  # 7 rounded down to 6
        (9, 1.0, VideoSampling(fps=0.5, min_frames=2), [0, 3, 5, 8]),  # 9 s at 0.5 fps: 4.5 frames, so 4
    ],
)
def test_frame_sampling_follows_the_convention(total, source_fps, sampling, expected):
    assert sampling.indices(total, source_fps) == expected


def test_a_video_shorter_than_the_minimum_is_an_error(tmp_path):
    short = _folder(tmp_path / "short", 3)
    for call in (load_video, check_video):
        assert _error(call, short) == (f"video {short} has 3 frames; the model needs at least 4 "
                                       "(model.vision.video_min_frames)")
    assert len(load_video(short, VideoSampling(min_frames=2)).frames) == 2


def test_folder_plays_at_the_stated_fps(tmp_path):
    folder = _folder(tmp_path / "v", 12)
    video = load_video(folder)  # 12 frames at 2 fps last 6 s: all 12 are sampled
    assert (video.fps, video.total_frames, video.indices) == (2.0, 12, list(range(12)))
    slow = load_video(folder, VideoSampling(folder_fps=6.0))  # the same frames in 2 s: 4 of them
    assert slow.indices == [0, 4, 7, 11] and _indices(slow.frames[:2]) == [0, 4]
    assert [round(t, 3) for t in slow.seconds()] == [0.0, 0.667, 1.167, 1.833]
    assert slow.metadata() == {"fps": 6.0, "frames_indices": [0, 4, 7, 11], "total_num_frames": 12}


def test_every_frame_of_a_folder_is_checked(tmp_path):
    folder = _folder(tmp_path / "v", 6)
    (tmp_path / "v" / "f4.png").write_bytes(b"not a png")
    assert _error(check_video, folder).startswith(f"cannot read image {tmp_path / 'v' / 'f4.png'}: ")


def test_frames_take_the_first_frame_size(tmp_path):
    for i, (size, colour) in enumerate([((8, 6), "red")] + [((20, 20), "blue")] * 3):
        Image.new("RGB", size, colour).save(tmp_path / f"{i}.png")
    frames = load_video(str(tmp_path)).frames
    assert [f.size for f in frames] == [(8, 6)] * 4 and frames[1].getpixel((3, 3)) == (0, 0, 255)


def test_animated_gif_is_timed_by_its_durations(tmp_path):
    video = load_video(_gif(tmp_path / "v.gif"))  # 6 frames over 1 s: 6 fps, 2 s of frames at 2 fps -> minimum 4
    assert (video.total_frames, video.fps, video.indices) == (6, 6.0, [0, 2, 3, 5])
    assert _indices(video.frames) == [0, 2, 3, 5]
    assert video.frames[1].getpixel((5, 5)) == _shade(2) and video.frames[1].mode == "RGB"
    check_video(str(tmp_path / "v.gif"))
    assert load_video(str(tmp_path / "v.gif"), VideoSampling(num_frames=6)).indices == list(range(6))


def test_video_errors_name_the_file(tmp_path, monkeypatch):
    missing, junk, empty = tmp_path / "no.gif", tmp_path / "junk.gif", tmp_path / "empty"
    junk.write_bytes(b"GIF89a broken")
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    for call in (load_video, check_video):
        assert _error(call, str(missing)) == f"video not found: {missing}"
        assert _error(call, str(empty)).startswith("no frame images (png, jpg, jpeg, webp, bmp, gif)")
        assert _error(call, str(empty)).endswith(f"in video folder {empty}")
        assert _error(call, str(junk)).startswith(f"cannot read video {junk}: ")
    assert "num_frames must be >= 2" in _error(VideoSampling, num_frames=1)
    assert "fps must be > 0" in _error(VideoSampling, fps=-1.0)
    assert "min_frames (8) <= max_frames (4)" in _error(VideoSampling, min_frames=8, max_frames=4)


def test_other_videos_need_pyav(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 32)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    for call in (load_video, check_video):
        assert _error(call, str(clip)) == f"reading {clip} needs PyAV: pip install copd[video]"


def _mp4(path, count=10, rate=10):
    av = require("av")
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
    path = _mp4(tmp_path / "clip.mp4")  # 10 frames at 10 fps
    check_video(path)
    video = load_video(path)  # 1 s at 2 fps is 2 frames: raised to the minimum 4
    assert (video.total_frames, video.fps, video.indices) == (10, 10.0, [0, 3, 6, 9])
    assert video.frames[0].size == (32, 32) and video.frames[0].mode == "RGB"
    every = load_video(path, VideoSampling(num_frames=10)).frames
    reds = _reds(every)
    # Lossy codec: shades come back close to 25 * i, not exact.
    assert all(abs(red - 25 * i) <= 6 for i, red in enumerate(reds))
    assert _reds(video.frames) == [reds[i] for i in (0, 3, 6, 9)]
    assert _reds(load_video(path, VideoSampling(fps=6)).frames) == [reds[i] for i in (0, 2, 4, 5, 7, 9)]
    assert _error(check_video, path, VideoSampling(min_frames=12)).startswith(f"video {path} has 10 frames")


def test_pyav_unreadable_video(tmp_path):
    require("av")
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


def test_placeholder_markers_must_match_the_media(tmp_path):
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    rows = [{"prompt": "Compare <image> with <image>.", "answer": "a", "image": ["0.png", "1.png"]},
            {"prompt": "Is <image> red?", "answer": "b", "image": "0.png"},
            {"prompt": "No marker: the image goes first.", "answer": "c", "image": "1.png"},
            {"prompt": "<image> then <image>?", "answer": "d", "image": "1.png"}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    assert _load_error({"path": str(path), "images_field": "image"}).endswith(
        f'{path}:4: field "prompt": the prompt has 2 image markers (<image>) for 1 image')
    path = _jsonl(tmp_path / "pairs.jsonl", rows[:3])
    load_capability({"name": "t", "path": str(path), "images_field": "image", "test_ratio": 0.5})  # markers that fit
