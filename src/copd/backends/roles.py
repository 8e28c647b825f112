"""What a branch is: the Policy interface and the plain data that crosses it.

Everything in and out is a tensor, a string or a dataclass of them, so a remote worker
(a Ray actor, say) can hold a Policy unchanged and the driver never sees a model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False

    @classmethod
    def from_config(cls, sampling) -> SamplingParams:
        """From a run's `sampling` section (any object with temperature, top_p, max_new_tokens)."""
        return cls(sampling.temperature, sampling.top_p, sampling.max_new_tokens)


@dataclass(frozen=True)
class Prompt:
    """A prompt with what may come with it: its own system message, images, videos (paths).

    `generate` takes plain strings too; a string is a Prompt with only text.
    """

    text: str
    system: str | None = None
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()

    @classmethod
    def of(cls, sample) -> Prompt:
        """What a policy is asked for a capability's sample: its text with its system message and media."""
        return cls(sample.prompt, sample.system, sample.images, sample.videos)


@dataclass
class VisionInputs:
    """Pixel inputs of a batch's distinct prompts, made once when the batch is sampled.

    Whoever scores or trains on the rollouts (the student's update, every teacher) reuses
    these tensors, so images and video frames are decoded once per batch: all branches
    share the base model's processor. `tensors` holds pixel_values + image_grid_thw and/or
    pixel_values_videos + video_grid_thw, concatenated over prompts in order; prompt i owns
    images_per_prompt[i] images and videos_per_prompt[i] videos, and rows
    [i*rows_per_prompt, (i+1)*rows_per_prompt) of the rollouts are its samples.
    """

    tensors: dict[str, torch.Tensor]
    images_per_prompt: list[int]
    videos_per_prompt: list[int]
    rows_per_prompt: int

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
        return VisionInputs(
            tensors,
            [self.images_per_prompt[i] for i in keep],
            [self.videos_per_prompt[i] for i in keep],
            self.rows_per_prompt,
        )


@dataclass
class Rollouts:
    """Sampled sequences: left-padded prompts followed by right-padded completions.

    Rows are grouped by prompt: rows [i*n, (i+1)*n) are the n samples of prompt i.
    A vision-language policy's rollouts also carry the prompts' pixel inputs (`vision`).
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_len: int
    completion_mask_B_T: torch.Tensor  # float, 1 on generated tokens (EOS included)
    completions: list[str]
    vision: VisionInputs | None = None

    @property
    def completion_ids_B_T(self) -> torch.Tensor:
        return self.input_ids_B_L[:, self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_B_T.sum().item())

    def select(self, rows: torch.Tensor) -> Rollouts:
        """Keep the given row indices (used to drop zero-signal groups)."""
        keep = rows.tolist()
        return Rollouts(
            self.input_ids_B_L[rows],
            self.attention_mask_B_L[rows],
            self.prompt_len,
            self.completion_mask_B_T[rows],
            [self.completions[i] for i in keep],
            None if self.vision is None else self.vision.select_prompts(_whole_groups(keep, self.vision.rows_per_prompt)),
        )


def _whole_groups(rows: list[int], n: int) -> list[int]:
    """The prompt index of each group in `rows`, which must be whole groups of n rows in order."""
    prompts = rows[::n]
    if len(rows) % n or rows != [p + i for p in prompts for i in range(n)] or any(p % n for p in prompts):
        raise ValueError(f"rollouts with pixel inputs can only keep whole groups of {n} rows, got rows {rows}")
    return [p // n for p in prompts]


@dataclass
class Scores:
    """A policy's view of given rollouts (no gradient): per-token and full log-probs."""

    token_logprobs_B_T: torch.Tensor
    dist_logprobs_B_T_V: torch.Tensor | None = None


@dataclass
class RLPart:
    """Rollouts with per-token advantages, trained with the clipped policy gradient."""

    rollouts: Rollouts
    advantages_B_T: torch.Tensor


@dataclass
class OPDPart:
    """Student rollouts on a teacher's prompts with the teacher's scores (one edge)."""

    rollouts: Rollouts
    teacher: Scores
    beta: float
    edge: str


@dataclass
class LossSpec:
    """How a branch turns parts into one loss: the core functions to use and their settings."""

    aggregation: str = "token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    opd_estimator: str = "sampled"
    overlap_k: int = 4
    epochs: int = 1
    grad_clip: float = 1.0


@dataclass
class UpdateResult:
    """Metrics of one optimizer update; `skipped` when the loss was not finite."""

    metrics: dict[str, float] = field(default_factory=dict)
    edge_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: bool = False


class Policy(Protocol):
    """A trainable branch. Implementations: HFPolicy (transformers), fakes in tests."""

    name: str

    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        """n samples per prompt, reproducible from `seed`."""

    def score(self, rollouts: Rollouts, full: bool = True) -> Scores:
        """Log-probabilities of the rollouts' completion tokens under this policy."""

    def update(self, rl: list[RLPart], opd: list[OPDPart], spec: LossSpec) -> UpdateResult:
        """One policy-gradient update on RL and OPD parts together (Algorithm 1, Phase II)."""

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the parameters (for merging and snapshots)."""

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def save_checkpoint(self, folder: Path) -> None:
        """Weights and optimizer state, enough to resume exactly."""

    def load_checkpoint(self, folder: Path) -> None: ...

    def save_pretrained(self, folder: Path) -> None:
        """A standard transformers folder."""
