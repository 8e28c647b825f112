"""Where a prompt's images and videos go (copd.multimodal.prompts)."""

import pytest

from copd.multimodal.prompts import content_items, placeholder_problem, plain_text


def test_markers_place_the_media_in_order():
    assert content_items("Compare <image> and <video>: same?", 1, 1) == [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "},
        {"type": "video"}, {"type": "text", "text": ": same?"}]
    assert content_items("<image><image>", 2, 0) == [{"type": "image"}, {"type": "image"}]


def test_without_markers_images_then_videos_go_first():
    assert content_items("what?", 2, 1) == [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                            {"type": "text", "text": "what?"}]
    assert plain_text(content_items("x <image> y", 1, 0), "[I]", "[V]") == "x [I] y"


def test_counts_must_match_once_a_marker_is_used():
    assert placeholder_problem("plain text", 3, 1) is None
    assert placeholder_problem("<image> and <image>", 1, 0) == "the prompt has 2 image markers (<image>) for 1 image"
    assert placeholder_problem("<video>", 0, 2) == "the prompt has 1 video marker (<video>) for 2 videos"
    # Once the text places media, every image and video must be placed.
    assert placeholder_problem("<image>", 1, 1) == "the prompt has 0 video markers (<video>) for 1 video"
    with pytest.raises(ValueError, match="2 image markers"):
        content_items("<image><image>", 1, 0)
