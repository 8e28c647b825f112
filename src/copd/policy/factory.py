"""One constructor for every policy of a run: the model's processing decides text or vision-language."""

from __future__ import annotations

from copd.policy.hf import HFPolicy
from copd.policy.vl import VLPolicy
from copd.vl import VLProcessor

# Options (ModelConfig.policy_options) that only a vision-language policy reads.
VISION_OPTIONS = ("video_frames", "video_fps", "min_pixels", "max_pixels")


def make_policy(name: str, model, processing, *args, **kwargs) -> HFPolicy:
    """A VLPolicy when `processing` is a VLProcessor, else an HFPolicy with a tokenizer."""
    vision = {k: kwargs.pop(k) for k in VISION_OPTIONS if k in kwargs}
    if isinstance(processing, VLProcessor):
        return VLPolicy(name, model, processing, *args, **vision, **kwargs)
    return HFPolicy(name, model, processing, *args, **kwargs)
