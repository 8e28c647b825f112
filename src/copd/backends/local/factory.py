"""One constructor for every policy of a run: the model's processing decides text or vision-language."""

from __future__ import annotations

from copd.backends.local.hf import HFPolicy
from copd.backends.local.lora import LoraPolicy
from copd.backends.local.vl import VISION_OPTIONS, VLLoraPolicy, VLPolicy
from copd.multimodal.processor import VLProcessor


def make_policy(name: str, model, processing, *args, **kwargs) -> HFPolicy:
    """A VLPolicy when `processing` is a VLProcessor, else an HFPolicy with a tokenizer."""
    return _pick(processing, VLPolicy, HFPolicy, kwargs)(name, model, processing, *args, **kwargs)


def make_lora_policy(name: str, shared, processing, *args, **kwargs) -> LoraPolicy:
    """A LoRA branch (or the base view) of a SharedBase, text or vision-language like make_policy."""
    return _pick(processing, VLLoraPolicy, LoraPolicy, kwargs)(name, shared, processing, *args, **kwargs)


def _pick(processing, vision_cls, text_cls, kwargs: dict):
    if isinstance(processing, VLProcessor):
        return vision_cls
    for key in VISION_OPTIONS:  # a text model has no images to read
        kwargs.pop(key, None)
    return text_cls
