"""How far the manual route's pixels are from the checkpoint's own processor's (needs torchvision).

For each tiny family (Qwen3-VL, Qwen2-VL, Qwen2.5-VL), saved to a folder and read back by
both routes: whether token ids, token types and grids are equal, and the largest pixel
difference for an image and a video kept at their size and for ones that are resized.

    .venv-torchvision/bin/python benchmarks/processor_parity.py    # after `make test-torchvision`
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from PIL import Image

from copd.multimodal.media import Video
from copd.multimodal.processor import VLProcessor
from copd.multimodal.tiny import ARCHITECTURES, build_tiny_vl

KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw")


def picture(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def video(seed: int, frames: int, height: int, width: int, fps: float, step: int) -> Video:
    indices = [i * step for i in range(frames)]
    return Video([picture(seed + i, height, width) for i in range(frames)], indices, fps, indices[-1] + 1)


def main() -> None:
    print(f"{'family':<12}{'case':<9}{'ids, types, grids':>19}{'image gap':>12}{'video gap':>12}")
    for arch in ARCHITECTURES:
        folder = tempfile.mkdtemp()
        model, processor = build_tiny_vl(arch=arch)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        manual, own = VLProcessor.from_pretrained(folder, "manual"), VLProcessor.from_pretrained(folder, "processor")
        side = 4 * manual.family.patch_size
        content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what is shown?"}]
        text = [manual.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)]
        cases = {"kept": ([[picture(1, side, side)]], [[video(3, 4, side, side, 2.0, 1)]]),
                 "resized": ([[picture(4, 50, 70)]], [[video(70, 6, 45, 77, 24.0, 5)]])}
        for name, (images, videos) in cases.items():
            a, b = manual.encode(text, images, videos), own.encode(text, images, videos)
            equal = all(torch.equal(a[k], b[k]) for k in KEYS)
            gaps = [(a[k] - b[k]).abs().max().item() for k in ("pixel_values", "pixel_values_videos")]
            print(f"{arch:<12}{name:<9}{equal!s:>19}{gaps[0]:>12.2e}{gaps[1]:>12.2e}")


if __name__ == "__main__":
    main()
