"""The two routes to a vision-language model's inputs agree: the checkpoint's own processor
(AutoProcessor, which needs torchvision) and copd's manual route (which does not).

Runs wherever torchvision imports; CI runs it in a second environment that has it
(`make test-torchvision`). Ids, attention masks, token types and grids must be equal;
pixels may differ by float rounding and resampling alone: within ROUNDING (the two
normalise in a different order) where an image or frame keeps its size, within
PIXEL_TOLERANCE (normalised units; one grey level is 2/255 = 0.0078 at std 0.5) where it
is resized, since torchvision's bicubic and PIL's round differently.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from copd.multimodal.media import Video
from copd.multimodal.processor import VLProcessor
from copd.multimodal.tiny import ARCHITECTURES, build_tiny_vl

pytest.importorskip("torchvision", reason="the checkpoint's own processor needs torchvision")

ROUNDING = 1e-6  # images and frames kept at their size
PIXEL_TOLERANCE = 0.05  # normalised units, on resized images and frames


def _picture(seed, height, width):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _video(seed, frames, height, width, fps=2.0, step=1):
    indices = [i * step for i in range(frames)]
    return Video([_picture(seed + i, height, width) for i in range(frames)], indices, fps, indices[-1] + 1)


def _chat(processor, images, videos, text="what is shown?"):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def routes(request, tmp_path_factory):
    """(manual, processor) routes read from one saved tiny model folder of each family."""
    folder = tmp_path_factory.mktemp(request.param)
    model, processor = build_tiny_vl(arch=request.param)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    manual, own = VLProcessor.from_pretrained(folder, "manual"), VLProcessor.from_pretrained(folder, "processor")
    assert (manual.route, own.route) == ("manual", "processor")
    return manual, own


def _compare(manual, own, texts, images, videos, exact_pixels):
    a, b = manual.encode(texts, images, videos), own.encode(texts, images, videos)
    assert sorted(a) == sorted(b)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in a:
            assert torch.equal(a[key], b[key]), key
    for key in ("pixel_values", "pixel_values_videos"):
        if key in a:
            gap = (a[key] - b[key]).abs().max().item()
            assert gap < (ROUNDING if exact_pixels else PIXEL_TOLERANCE), (key, gap)
    if "second_per_grid_ts" in a:
        assert torch.allclose(a["second_per_grid_ts"].float(), torch.as_tensor(b["second_per_grid_ts"]).float())
    return a


def test_images_at_their_size_are_identical(routes):
    manual, own = routes
    side = 4 * manual.family.patch_size  # the largest image kept at its size
    texts = [_chat(manual, 2, 0), _chat(manual, 0, 0, "text only"), _chat(manual, 1, 0)]
    images = [[_picture(1, side, side), _picture(2, side // 2, side)], [], [_picture(3, side, side // 2)]]
    _compare(manual, own, texts, images, [[], [], []], exact_pixels=True)


def test_resized_images_agree_within_tolerance(routes):
    manual, own = routes
    texts = [_chat(manual, 1, 0), _chat(manual, 1, 0)]
    _compare(manual, own, texts, [[_picture(4, 50, 70)], [_picture(5, 90, 33)]], [[], []], exact_pixels=False)


@pytest.mark.parametrize("frames", [4, 5, 8, 12])
def test_videos_of_several_lengths(routes, frames):
    manual, own = routes
    side = 4 * manual.family.patch_size
    texts = [_chat(manual, 0, 1), _chat(manual, 1, 1, "both")]
    videos = [[_video(10, frames, side, side, fps=3.0, step=2)], [_video(40, 4, side // 2, side)]]
    # Qwen3-VL's pixel budget covers all frames: a long video is resized even at this size.
    kept = manual.family.video_size(frames, side, side, manual.video_settings) == (side, side)
    out = _compare(manual, own, texts, [[], [_picture(6, side, side)]], videos, exact_pixels=kept)
    assert out["video_grid_thw"][0, 0].item() == (frames + 1) // 2


def test_resized_videos_agree_within_tolerance(routes):
    manual, own = routes
    _compare(manual, own, [_chat(manual, 0, 1)], [[]], [[_video(70, 6, 45, 77, fps=24.0, step=5)]], exact_pixels=False)


def test_a_folder_saved_by_the_processor_reads_the_same(routes, tmp_path):
    manual, own = routes
    own.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(routes_config(manual))
    texts, images = [_chat(manual, 1, 1)], [[_picture(8, 40, 40)]]
    videos = [[_video(80, 5, 40, 40)]]
    again = VLProcessor.from_pretrained(tmp_path, "manual")
    _compare(again, own, texts, images, videos, exact_pixels=False)
    assert torch.equal(again.encode(texts, images, videos)["input_ids"], manual.encode(texts, images, videos)["input_ids"])


def routes_config(processor) -> str:
    """A config.json naming the processor's family (all from_pretrained reads of it)."""
    return f'{{"model_type": "{processor.family.model_type}"}}'


def test_pixel_ranges_apply_to_both_routes(routes):
    manual, own = routes
    side = 4 * manual.family.patch_size
    for processor in (manual, own):
        processor.set_pixels((None, (side // 2) ** 2), (None, None))
    try:
        out = _compare(manual, own, [_chat(manual, 1, 0)], [[_picture(9, side, side)]], [[]], exact_pixels=False)
        assert out["image_grid_thw"].tolist() == [[1, 2, 2]]  # halved on each side
    finally:
        for processor in (manual, own):
            processor.set_pixels((None, side ** 2), (None, None))
