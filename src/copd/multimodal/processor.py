"""Vision-language models (Qwen2-VL, Qwen2.5-VL): tiny local builds, their processor, save and load.

The tiny model is built from config with a byte-level tokenizer carrying Qwen's special
tokens and chat template, and the PIL image processor, so nothing needs torchvision or a
download. `VLProcessor` is what a vision-language policy holds where a text policy holds
its tokenizer (as a transformers processor is a trainer's `processing_class`): the
tokenizer plus the image processor, saved to and loaded from one model folder.
Encoding and positions live in copd.multimodal.inputs, sampling in copd.backends.local.vl_decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available
from transformers import Qwen2VLImageProcessorPil

from copd.multimodal.inputs import IMAGE_PAD, VIDEO_PAD, encode_vl

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

# Qwen's ChatML layout; an image or video content item becomes its placeholder block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_PLACEHOLDER +
    "{% elif item['type'] == 'video' %}" + VIDEO_PLACEHOLDER +
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_vl_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one token per byte, so any text encodes) plus Qwen's special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=CHAT_TOKENS + VISION_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """[t, h, w] rotary frequency split summing to head_dim / 2, in Qwen's 2:3:3 proportion."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _vl_config(arch: str, tokenizer, hidden: int, layers: int, heads: int, vision_dim: int, vision_layers: int,
               init_std: float, intermediate: int | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(hidden // heads)},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    vision = dict(depth=vision_layers, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=init_std)
    if arch == "qwen2_vl":
        vision.update(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen2_5_vl":
        vision.update(hidden_size=vision_dim, intermediate_size=2 * vision_dim, out_hidden_size=hidden,
                      window_size=56, fullatt_block_indexes=[vision_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown vision-language architecture {arch!r}; expected 'qwen2_vl' or 'qwen2_5_vl'")


def build_tiny_vl(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, vision_dim: int = 32,
                  vision_layers: int = 1, arch: str = "qwen2_vl", min_pixels: int = 28 * 28, max_pixels: int = 56 * 56,
                  init_std: float = 0.02, intermediate: int | None = None):
    """(model, VLProcessor): a tiny random Qwen2-VL (or Qwen2.5-VL) built from config.

    max_pixels = 56*56 caps an image at a 4x4 patch grid, i.e. 4 tokens after the 2x2 merge.
    A larger init_std than the usual 0.02 gives a random model whose greedy output varies
    with its input, which tests of positions and caching need.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tokenizer = build_vl_tokenizer()
    config = _vl_config(arch, tokenizer, hidden, layers, heads, vision_dim, vision_layers, init_std, intermediate)
    model_cls = Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor_cls = Qwen2VLImageProcessorPil
    if is_torchvision_available():  # importing the torchvision class without torchvision only warns and falls back
        from transformers import Qwen2VLImageProcessor as image_processor_cls
    image_processor = image_processor_cls(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return model, VLProcessor(tokenizer, image_processor, _video_processor(image_processor))


def _video_processor(image_processor):
    """With torchvision: transformers' video processor at the image processor's resolution (its own
    defaults would upscale small frames), so a fresh build matches a reloaded folder."""
    if not is_torchvision_available():
        return None
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"],
        patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
        merge_size=image_processor.merge_size, do_sample_frames=False)


# model_type values of the vision-language architectures copd drives (their M-RoPE and inputs).
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def is_vision_language(config) -> bool:
    """Whether a transformers config is a vision-language model this module handles."""
    return getattr(config, "model_type", None) in VL_MODEL_TYPES


class VLProcessor:
    """A vision-language model's tokenizer, image processor and (with torchvision) video processor.

    Used where a policy holds a tokenizer. With torchvision installed, transformers' own
    image and video processors are used; without it, the PIL image processor, and videos
    are patchified from its per-frame output (copd.multimodal.inputs.video_patches).
    """

    def __init__(self, tokenizer, image_processor, video_processor=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_processor = video_processor

    # what a policy reads of a tokenizer
    eos_token_id = property(lambda self: self.tokenizer.eos_token_id)
    pad_token_id = property(lambda self: self.tokenizer.pad_token_id)
    chat_template = property(lambda self: self.tokenizer.chat_template)
    image_token_id = property(lambda self: self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
    video_token_id = property(lambda self: self.tokenizer.convert_tokens_to_ids(VIDEO_PAD))

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self.tokenizer.padding_side = side

    def __len__(self) -> int:
        return len(self.tokenizer)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def encode(self, texts: list[str], images: list[list], videos: list[list[list]]) -> dict:
        """Model inputs of texts with placeholder blocks and their PIL images / video frames."""
        return encode_vl(texts, images, videos, self.tokenizer, self.image_processor, self.video_processor)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VLProcessor:
        """AutoImageProcessor picks the torchvision image processor when torchvision imports, else the PIL one."""
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        video_processor = None
        if is_torchvision_available():
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(folder)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(folder), video_processor)
