"""Where a prompt's images and videos go: inline `<image>` / `<video>` markers, or before the text.

A prompt may mark the place of each image and video in its text with `<image>` and
`<video>` (the convention of LLaVA-style datasets and TRL): the k-th `<image>` is the
sample's k-th image. Then the markers must match the media one for one, checked when the
data loads. A prompt without any marker gets its images, then its videos, before the text.
"""

from __future__ import annotations

import re

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


def placeholder_problem(text: str, images: int, videos: int) -> str | None:
    """Why the markers of `text` do not fit `images` images and `videos` videos, or None when they do."""
    marked_images, marked_videos = text.count(IMAGE_MARKER), text.count(VIDEO_MARKER)
    if not marked_images and not marked_videos:
        return None
    for marked, given, what in ((marked_images, images, "image"), (marked_videos, videos, "video")):
        if marked != given:
            return (f"the prompt has {marked} {what} marker{'s' * (marked != 1)} (<{what}>) "
                    f"for {given} {what}{'s' * (given != 1)}")
    return None


def content_items(text: str, images: int, videos: int) -> list[dict]:
    """Chat-template content items of a prompt: {"type": "image"}, {"type": "video"} and text, in order."""
    problem = placeholder_problem(text, images, videos)
    if problem:
        raise ValueError(problem)
    if IMAGE_MARKER not in text and VIDEO_MARKER not in text:
        return [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    items = []
    for part in _MARKERS.split(text):
        if part in (IMAGE_MARKER, VIDEO_MARKER):
            items.append({"type": part[1:-1]})
        elif part:
            items.append({"type": "text", "text": part})
    return items


def plain_text(items: list[dict], image_block: str, video_block: str) -> str:
    """The prompt without a chat template: each image or video item becomes its placeholder block."""
    blocks = {"image": image_block, "video": video_block}
    return "".join(blocks.get(item["type"]) or item.get("text", "") for item in items)
