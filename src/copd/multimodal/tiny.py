"""Tiny vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) built from config: nothing downloaded.

A tiny model has the architecture of its family (Qwen3-VL: patch 16, deepstack mergers, an
explicit head_dim, interleaved M-RoPE, a learned position embedding on a square grid) at a
width that trains on a laptop CPU. Its tokenizer is byte-level (any text encodes) with
Qwen's special tokens and ChatML template; its image processor is the PIL one, and its
video settings are those of the family's video processor, so the manual route and (with
torchvision) the family's own processor read the same saved folder.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

from copd.multimodal.families import IMAGE_PAD, IMAGE_PLACEHOLDER, VIDEO_PAD, VIDEO_PLACEHOLDER, VISION_END, VISION_START, family
from copd.multimodal.processor import VLProcessor

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"]
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen's ChatML layout, no default system prompt; an image or video content item becomes its placeholder block.
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
ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
        ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END)]}
    head_dim = hidden // heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        rope_parameters=rope, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std,
    )
    vision = dict(depth=vision_layers, num_heads=2, patch_size=family(arch).patch_size, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=init_std)
    if arch == "qwen2_vl":
        vision.update(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen2_5_vl":
        vision.update(hidden_size=vision_dim, intermediate_size=2 * vision_dim, out_hidden_size=hidden,
                      window_size=56, fullatt_block_indexes=[vision_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # Qwen3-VL: explicit head_dim, interleaved M-RoPE, a square grid of learned position
    # embeddings (16 = 4x4 patches, interpolated to other sizes) and one deepstack merger
    # feeding the first decoder layer.
    text.update(head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True})
    vision.update(hidden_size=vision_dim, intermediate_size=2 * vision_dim, out_hidden_size=hidden,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build_tiny_vl(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, vision_dim: int = 32,
                  vision_layers: int = 1, arch: str = "qwen3_vl", min_pixels: int | None = None,
                  max_pixels: int | None = None, init_std: float = 0.02, intermediate: int | None = None):
    """(model, VLProcessor): a tiny random vision-language model of family `arch`, built from config.

    The default pixel range caps an image at a 4x4 patch grid, 4 tokens after the 2x2 merge
    (56x56 pixels at patch 14, 64x64 at patch 16), and a video's frames at the same size. A
    larger init_std than the usual 0.02 gives a random model whose greedy output varies
    with its input, which tests of positions and caching need.
    """
    fam = family(arch)
    side = 4 * fam.patch_size
    min_pixels, max_pixels = min_pixels or (side // 2) ** 2, max_pixels or side ** 2
    tokenizer = build_vl_tokenizer()
    config = _vl_config(arch, tokenizer, hidden, layers, heads, vision_dim, vision_layers, init_std, intermediate)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=fam.patch_size, merge_size=2, temporal_patch_size=2,
        image_mean=list(fam.image_mean), image_std=list(fam.image_std))
    video_settings = {
        "video_processor_type": fam.video_processor_type, "patch_size": fam.patch_size, "merge_size": 2,
        "temporal_patch_size": 2, "image_mean": list(fam.image_mean), "image_std": list(fam.image_std),
        # Qwen3-VL's budget covers all frames of a video; Qwen2/2.5-VL's covers one frame.
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels * (8 if arch == "qwen3_vl" else 1)},
        "do_sample_frames": False, "resample": 3,
    }
    return model, VLProcessor.manual(arch, tokenizer, image_processor, video_settings)
