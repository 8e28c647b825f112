"""The seam: the roles a branch plays, and the plain data that crosses between them.

A branch plays three roles (docs/method.md §2):
- sampling (`Sampler.generate`): rollouts of prompts, reproducible from a seed;
- scoring (`Scorer.score`): its log-probs on someone's rollouts, sparse (see Scores);
- learning (`Learner`): one update on RL and OPD parts, weights, checkpoints, folders.
One object may play all three (the local backend's policies do); the driver holds a
`BranchRoles` per branch and talks to roles, never to a model class, so a rollout engine
can take sampling and a remote worker any role.

Everything that crosses is a CPU tensor, a string or a dataclass of them: an
implementation moves what it receives onto its own device and returns CPU results, so a
branch on a GPU (or in another process) is a drop-in for one on the CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from copd.multimodal.pixel_batch import VisionInputs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False
    # Also return the sampler's top-k ids at every generated position (Rollouts.topk_ids_B_T_K),
    # the student's half of a sparse teacher-score support; 0: none.
    record_topk: int = 0

    def recording(self, topk: int | None) -> SamplingParams:
        """The same sampling, also recording the sampler's top-`topk` ids: the student half of a
        top-k support. A whole-vocabulary support (topk None) needs none."""
        return self if topk is None else dataclasses.replace(self, record_topk=topk)

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
    topk_ids_B_T_K: torch.Tensor | None = None  # the sampler's top-k ids per position, when asked
    # A rollout engine's log-probs of the sampled tokens (copd.core.correction); None when the learner sampled.
    sampler_logprobs_B_T: torch.Tensor | None = None

    def to(self, device) -> Rollouts:
        """The same rollouts with every tensor on `device` (a no-op copy on the same device)."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Rollouts(self.input_ids_B_L.to(device), self.attention_mask_B_L.to(device), self.prompt_len,
                        self.completion_mask_B_T.to(device), self.completions,
                        None if self.vision is None else self.vision.to(device), move(self.topk_ids_B_T_K),
                        move(self.sampler_logprobs_B_T))

    @property
    def completion_ids_B_T(self) -> torch.Tensor:
        return self.input_ids_B_L[:, self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_B_T.sum().item())

    @property
    def nbytes(self) -> int:
        """Bytes of the rollouts' tensors (what a remote sampler keeps in the object store)."""
        tensors = [self.input_ids_B_L, self.attention_mask_B_L, self.completion_mask_B_T, self.topk_ids_B_T_K,
                   self.sampler_logprobs_B_T]
        tensors += list(self.vision.tensors.values()) if self.vision is not None else []
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def select(self, rows: torch.Tensor) -> Rollouts:
        """Keep the given row indices (used to drop zero-signal groups)."""
        keep = rows.tolist()
        return Rollouts(
            self.input_ids_B_L[rows],
            self.attention_mask_B_L[rows],
            self.prompt_len,
            self.completion_mask_B_T[rows],
            [self.completions[i] for i in keep],
            None if self.vision is None else self.vision.select_rows(keep),
            None if self.topk_ids_B_T_K is None else self.topk_ids_B_T_K[rows],
            None if self.sampler_logprobs_B_T is None else self.sampler_logprobs_B_T[rows],
        )

    def trimmed(self, width: int) -> Rollouts:
        """The first `width` completion slots only (the padding past a micro-batch's longest completion dropped)."""
        end = self.prompt_len + width
        cut = lambda x: None if x is None else x[:, :width]  # noqa: E731
        return Rollouts(self.input_ids_B_L[:, :end], self.attention_mask_B_L[:, :end], self.prompt_len,
                        self.completion_mask_B_T[:, :width], self.completions, self.vision,
                        cut(self.topk_ids_B_T_K), cut(self.sampler_logprobs_B_T))

    def micro(self, rows: torch.Tensor, width: int) -> Rollouts:
        """Rows `rows` trimmed to `width` completion slots: one micro-batch."""
        return self.select(rows).trimmed(width)


@dataclass(frozen=True)
class ScoreRequest:
    """What a scorer sends beyond the sampled tokens' log-probs (docs/method.md §4, sparse scores).

    topk: its own top-k ids per position and its log-probs there (0: none).
    ids_B_T_J: further ids whose log-probs are wanted.
    student_topk: also the ids the sampler recorded in the rollouts (Rollouts.topk_ids_B_T_K),
        so the asker needs nothing of the rollouts' tensors.
    """

    topk: int = 0
    ids_B_T_J: torch.Tensor | None = None
    student_topk: bool = False

    @classmethod
    def support(cls, topk: int | None) -> ScoreRequest:
        """A teacher's request: its top-k (the whole vocabulary when topk is None) and the student's recorded top-k."""
        return cls(sys.maxsize if topk is None else topk, student_topk=True)

    @property
    def wants_support(self) -> bool:
        return self.topk > 0 or self.ids_B_T_J is not None or self.student_topk


@dataclass
class Scores:
    """A policy's log-probs on given rollouts (no gradient): always the sampled tokens', and a sparse support when asked.

    support_ids_B_T_S holds the scorer's own top-k ids first (descending), then the
    requested ids; support_logprobs_B_T_S are its log-probs there. Never [B, T, V].
    """

    token_logprobs_B_T: torch.Tensor
    support_ids_B_T_S: torch.Tensor | None = None  # int32
    support_logprobs_B_T_S: torch.Tensor | None = None
    topk: int = 0  # how many leading support ids are the scorer's own top-k

    @property
    def topk_ids_B_T_K(self) -> torch.Tensor | None:
        return None if self.support_ids_B_T_S is None else self.support_ids_B_T_S[..., : self.topk]

    @property
    def nbytes(self) -> int:
        """Bytes of tensors that cross the seam (what a remote teacher would send)."""
        tensors = (self.token_logprobs_B_T, self.support_ids_B_T_S, self.support_logprobs_B_T_S)
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)

    def micro(self, rows: torch.Tensor, width: int) -> Scores:
        """The scores of rows `rows`, first `width` completion slots (one micro-batch)."""
        cut = lambda x: None if x is None else x[rows, :width]  # noqa: E731
        return Scores(cut(self.token_logprobs_B_T), cut(self.support_ids_B_T_S), cut(self.support_logprobs_B_T_S), self.topk)

    def to(self, device) -> Scores:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Scores(self.token_logprobs_B_T.to(device), move(self.support_ids_B_T_S), move(self.support_logprobs_B_T_S), self.topk)


@dataclass
class RLPart:
    """Rollouts with their advantages, trained with the clipped policy gradient.

    `advantages` are per token [B, T], or per rollout [B] (every token of a sequence shares
    its advantage, as in GRPO). With `rows`, only those rows of the rollouts are trained on
    (e.g. zero-signal groups dropped) and `advantages` belong to them. The learner applies
    both (`resolved`), so whoever builds a part needs the rollouts' texts only, never their
    tensors: rollouts can stay where they were sampled (another process, say).
    """

    rollouts: Rollouts
    advantages: torch.Tensor
    rows: torch.Tensor | None = None

    def resolved(self) -> RLPart:
        """The same part with the rows applied and one advantage per token."""
        kept = self.rollouts if self.rows is None else self.rollouts.select(self.rows)
        per_token = self.advantages.dim() == 2
        return RLPart(kept, self.advantages if per_token else self.advantages[:, None] * kept.completion_mask_B_T)

    def micro(self, rows: torch.Tensor, width: int) -> RLPart:
        """Rows `rows` of a resolved part, first `width` completion slots (one micro-batch)."""
        return RLPart(self.rollouts.micro(rows, width), self.advantages[rows, :width])

    @property
    def advantages_B_T(self) -> torch.Tensor:
        return self.resolved().advantages

    def to(self, device) -> RLPart:
        rows = None if self.rows is None else self.rows.to(device)
        return RLPart(self.rollouts.to(device), self.advantages.to(device), rows)


@dataclass
class OPDPart:
    """Student rollouts on a teacher's prompts with the teacher's scores (one edge)."""

    rollouts: Rollouts
    teacher: Scores
    beta: float
    edge: str

    def micro(self, rows: torch.Tensor, width: int) -> OPDPart:
        """Rows `rows`, first `width` completion slots (one micro-batch)."""
        return OPDPart(self.rollouts.micro(rows, width), self.teacher.micro(rows, width), self.beta, self.edge)

    def to(self, device) -> OPDPart:
        return OPDPart(self.rollouts.to(device), self.teacher.to(device), self.beta, self.edge)


@dataclass
class LossSpec:
    """How a branch turns parts into one loss: the core functions to use and their settings."""

    aggregation: str = "token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    opd_estimator: str = "sampled"
    overlap_k: int = 4
    epochs: int = 1
    # Optimizer steps per batch: each part's rows cut into this many mini-batches of whole prompt
    # groups, one step each, every old log-prob taken before the first step.
    mini_batches: int = 1
    grad_clip: float = 1.0
    # Rollouts a rollout engine sampled: how each token's loss makes up for the engine/learner gap
    # (copd.core.correction.ROLLOUT_CORRECTIONS) and the cap of the importance ratio.
    correction: str = "tis"
    correction_cap: float = 2.0
    # Measure approx_kl, the k3 KL between the policy before and after the update: one more
    # forward pass over the update's rollouts (a fifth of an RL step on SmolLM2-135M).
    step_kl: bool = True


@dataclass
class UpdateResult:
    """Metrics of one optimizer update; `skipped` when the loss was not finite."""

    metrics: dict[str, float] = field(default_factory=dict)
    edge_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: bool = False


class Pending:
    """An answer still being computed elsewhere (a remote call); `settle` waits for it.

    A role may return one instead of a value, so that a driver can start every branch's
    work before waiting for any; an in-process role answers at once with the value itself.
    """

    def result(self):
        raise NotImplementedError


def settle(value):
    """The value itself, or the finished answer of a pending one."""
    return value.result() if isinstance(value, Pending) else value


class Sampler(Protocol):
    """Sampling: rollouts of prompts (a rollout engine can play this role)."""

    name: str

    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        """n samples per prompt, reproducible from `seed`; CPU tensors out."""


class Scorer(Protocol):
    """Scoring: log-probs of given rollouts under this branch, no gradient."""

    name: str

    def score(self, rollouts: Rollouts, request: ScoreRequest | None = None) -> Scores:
        """The sampled tokens' log-probs, plus the support `request` asks for; CPU tensors in and out."""


class Learner(Protocol):
    """Learning: updates, weights, checkpoints and saved folders of one branch."""

    name: str

    def update(self, rl: list[RLPart], opd: list[OPDPart], spec: LossSpec) -> UpdateResult:
        """One policy-gradient update on RL and OPD parts together (Algorithm 1, Phase II)."""

    def supervised_step(self, prompts: list[str | Prompt], answers: list[str]) -> float:
        """One cross-entropy step on the answers (the warm start); returns the loss."""

    def parameter_counts(self) -> tuple[int, int]:
        """(weights this branch trains, weights of the model it runs, adapters excluded)."""

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trained weights (for merging and snapshots)."""

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def save_checkpoint(self, folder: Path) -> None:
        """Weights and optimizer state, enough to resume exactly."""

    def load_checkpoint(self, folder: Path) -> None: ...

    def save_pretrained(self, folder: Path) -> None:
        """A standard transformers folder."""

    def export_weights(self, folder: Path) -> int:
        """The model's weights alone as safetensors in `folder`, for a rollout engine to reload; their bytes."""


class Policy(Sampler, Scorer, Learner, Protocol):
    """One object playing all three roles (the local backend's branches, fakes in tests)."""


@dataclass
class BranchRoles:
    """Who plays each role for one branch; the driver only ever calls these."""

    sampler: Sampler
    scorer: Scorer
    learner: Learner

    @classmethod
    def of(cls, policy: Policy) -> BranchRoles:
        return cls(policy, policy, policy)
