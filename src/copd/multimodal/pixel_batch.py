"""Pixel inputs of a batch's prompts as they cross the seam with the rollouts (copd.backends.roles).

A vision-language policy decodes a batch's images and video frames once, when it samples;
whoever scores or trains on the rollouts reuses these tensors. Kept apart from roles.py
because selecting rows of them (whole prompt groups, or one prompt copy per row for a
micro-batch that splits groups) is bookkeeping of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionInputs:
    """Pixel inputs of a batch's distinct prompts, made once when the batch is sampled.

    Whoever scores or trains on the rollouts (the student's update, every teacher) reuses
    these tensors, so images and video frames are decoded once per batch: all branches
    share the base model's processor. `tensors` holds pixel_values + image_grid_thw and/or
    pixel_values_videos + video_grid_thw (+ second_per_grid_ts for Qwen2.5-VL), concatenated
    over prompts in order; prompt i owns
    images_per_prompt[i] images and videos_per_prompt[i] videos, and rows
    [i*rows_per_prompt, (i+1)*rows_per_prompt) of the rollouts are its samples.
    """

    tensors: dict[str, torch.Tensor]
    images_per_prompt: list[int]
    videos_per_prompt: list[int]
    rows_per_prompt: int

    def to(self, device) -> VisionInputs:
        return VisionInputs({k: v.to(device) for k, v in self.tensors.items()}, self.images_per_prompt,
                            self.videos_per_prompt, self.rows_per_prompt)

    def select_prompts(self, keep: list[int]) -> VisionInputs:
        """The inputs of the prompts `keep` (whole groups), in that order."""
        tensors = {}
        for kind, counts in (("", self.images_per_prompt), ("_videos", self.videos_per_prompt)):
            grid_key = "image_grid_thw" if kind == "" else "video_grid_thw"
            if grid_key not in self.tensors:
                continue
            grids, pixels = self.tensors[grid_key], self.tensors["pixel_values" + kind]
            item_start = [0, *torch.tensor(counts).cumsum(0).tolist()]
            patch_start = [0, *grids.prod(-1).cumsum(0).tolist()]
            items = [j for i in keep for j in range(item_start[i], item_start[i + 1])]
            if items:
                tensors[grid_key] = grids[items]
                tensors["pixel_values" + kind] = torch.cat([pixels[patch_start[j] : patch_start[j + 1]] for j in items])
                if kind and "second_per_grid_ts" in self.tensors:  # one per video (Qwen2.5-VL)
                    tensors["second_per_grid_ts"] = self.tensors["second_per_grid_ts"][items]
        return VisionInputs(
            tensors,
            [self.images_per_prompt[i] for i in keep],
            [self.videos_per_prompt[i] for i in keep],
            self.rows_per_prompt,
        )

    def select_rows(self, rows: list[int]) -> VisionInputs:
        """The inputs of rollout rows `rows`: shared per whole group kept in order, else one prompt copy per row
        (rows_per_prompt 1; a micro-batch of rows sorted by length, say)."""
        groups = _whole_groups(rows, self.rows_per_prompt)
        if groups is not None:
            return self.select_prompts(groups)
        per_row = self.select_prompts([r // self.rows_per_prompt for r in rows])
        per_row.rows_per_prompt = 1
        return per_row


def _whole_groups(rows: list[int], n: int) -> list[int] | None:
    """The prompt index of each group in `rows` when they are whole groups of n rows in order, else None."""
    prompts = rows[::n]
    if len(rows) % n or rows != [p + i for p in prompts for i in range(n)] or any(p % n for p in prompts):
        return None
    return [p // n for p in prompts]
