"""The single source of truth for configuration: typed models loaded from YAML.

Every key a user can set is a field below (the config reference, docs/config-reference.md, is generated
from these models). Unknown keys are errors that name the nearest valid key; command-line
overrides use `key.sub=value` with YAML-parsed values.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

# KeyProblem and unknown_name are imported from here too (copd.config.loader, copd.driver.compare).
from copd.config.fields import (  # noqa: F401
    TRACKER_NAMES,
    AdvantageName,
    EstimatorName,
    KeyProblem,
    LossAggregationName,
    MergeMethodName,
    PlanName,
    Section,
    TopologyName,
    unknown_name,
)
from copd.config.run import ResourcesConfig, RunConfig
from copd.config.sampling import SamplingConfig
from copd.core.merge import MERGE_METHODS


class TinyModelConfig(Section):
    """A small transformers model built from config with a locally made tokenizer."""

    architecture: Literal["llama", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = Field("llama", description="transformers architecture of the tiny model: llama or qwen2 (text, character tokenizer), qwen3_vl, qwen2_vl or qwen2_5_vl (vision-language, byte tokenizer with Qwen's chat template and image processor)")
    hidden_size: int = Field(128, gt=0, description="width of the residual stream")
    num_layers: int = Field(4, gt=0, description="number of decoder layers")
    num_heads: int = Field(4, gt=0, description="attention heads (key/value heads equal)")
    intermediate_size: int = Field(384, gt=0, description="MLP width")
    max_positions: int = Field(64, gt=0, description="maximum sequence length (text architectures)")
    vision_hidden_size: int = Field(32, gt=0, description="width of the vision tower (vision-language architectures)")
    vision_layers: int = Field(1, gt=0, description="vision tower blocks (vision-language architectures)")


class VisionConfig(Section):
    """How a vision-language model reads images and videos (ignored by text models).

    Frames are sampled by Qwen's convention: video_fps frames per second of the source,
    clamped to [video_min_frames, video_max_frames] and to the source's frames, an even count,
    spread evenly from the first frame to the last.
    """

    video_fps: float = Field(2.0, gt=0, description="frames sampled per second of video (Qwen's convention: 2)")
    video_min_frames: int = Field(4, ge=2, description="fewest frames a video is sampled to; a video with fewer frames is an error when the data loads")
    video_max_frames: int = Field(768, ge=2, description="most frames a video is sampled to")
    video_frames: int | None = Field(None, ge=2, description="a fixed number of frames per video instead of video_fps (rounded down to an even count)")
    folder_fps: float = Field(2.0, gt=0, description="frame rate of a video given as a folder of frames (it has no timing); the timestamps Qwen3-VL sees follow from it")
    min_pixels: int | None = Field(None, gt=0, description="smallest image area after resizing (null: the image processor's own)")
    max_pixels: int | None = Field(None, gt=0, description="largest image area after resizing (null: the image processor's own; a real Qwen-VL allows 12.8M, lower it on small GPUs)")
    video_min_pixels: int | None = Field(None, gt=0, description="smallest video area after resizing (null: the video processor's own); Qwen3-VL counts all frames together, Qwen2/2.5-VL one frame")
    video_max_pixels: int | None = Field(None, gt=0, description="largest video area after resizing (null: the video processor's own); Qwen3-VL counts all frames together, Qwen2/2.5-VL one frame")

    @model_validator(mode="after")
    def _frame_range(self) -> VisionConfig:
        if self.video_min_frames > self.video_max_frames:
            raise ValueError(f"video_min_frames ({self.video_min_frames}) is above video_max_frames ({self.video_max_frames})")
        return self


class ModelConfig(Section):
    path: str | None = Field(None, description="a transformers model folder or a hub id (loaded when the hub is reachable); when neither this nor gguf_file is set, a tiny model is built from `tiny`")
    gguf_file: str | None = Field(None, description="a GGUF checkpoint (relative to `path` when both are set), dequantised once into a safetensors folder under cache_dir")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the model built when `path` is unset")
    dtype: Literal["float32", "bfloat16", "auto"] = Field("float32", description="weights dtype of a model loaded from `path` (tiny models train in float32); bfloat16 weights suit a frozen LoRA base, while full fine-tuning in bfloat16 rounds small AdamW updates away (use compute_dtype); auto: bfloat16 for a LoRA base where bf16 matmuls are measured faster than float32 on this device, else float32")
    compute_dtype: Literal["float32", "bfloat16", "auto"] = Field("float32", description="dtype of forward passes (torch.autocast); weights and optimizer state keep `dtype`, so bfloat16 here is mixed precision; auto: bfloat16 where bf16 matmuls are measured faster than float32 on this device (CPUs without AVX-512 BF16 or AMX emulate bf16, 10x+ slower), else float32; an explicit bfloat16 that is slower gets a warning with the measured factor")
    cache_dir: str = Field("~/.cache/copd", description="where built and warm-started base models are cached")
    chat_template: Literal["auto", "on", "off"] = Field("auto", description="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    system_prompt: str | None = Field(None, description="system message placed before every prompt when the chat template is used")
    vision: VisionConfig = Field(default_factory=VisionConfig, description="image and video reading of vision-language models")
    micro_batch_tokens: int = Field(16384, gt=0, strict=True, description="most tokens (rows x padded prompt + completion length) in one forward and backward pass: updates, teacher scores, old log-probs and the step KL cut their rows into micro-batches of at most this many, longest rows together, and a text model samples (rollouts, evaluation) that many prompt + max_new_tokens slots at a time; the loss is normalised over the whole batch, so the update does not depend on it (up to float rounding); must hold one row, the longest prompt plus sampling.max_new_tokens")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing (transformers' gradient checkpointing): keep only each decoder layer's input in the forward pass and recompute the rest in the backward pass, about a third more compute for activations a layer count smaller")

    def policy_options(self) -> dict:
        """How every policy of a run formats prompts and computes, so training and evaluation agree."""
        return {"chat_template": self.chat_template, "system_prompt": self.system_prompt, "compute_dtype": self.compute_dtype,
                "micro_batch_tokens": self.micro_batch_tokens, "gradient_checkpointing": self.gradient_checkpointing,
                **self.vision.model_dump()}


class LoraSettings(Section):
    """LoRA branches (PEFT): one frozen base in memory and one adapter per branch."""

    enabled: bool = Field(False, description="train each branch as a LoRA adapter on one shared frozen base instead of a full copy")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the delta is B A * alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (0 keeps rollout and update log-probs consistent)")
    target_modules: str | list[str] = Field("all-linear", description="modules that get adapters: all-linear, or a list of module names such as [q_proj, v_proj]")


class WarmupConfig(Section):
    """Supervised warm start so that every capability's SAMPLED pass rate is neither 0 nor 1."""

    enabled: bool = Field(True, description="run the supervised warm start before CoPD (built tiny models only)")
    max_steps: int = Field(2000, ge=0, description="upper bound on supervised steps")
    batch_size: int = Field(64, gt=0, description="samples per supervised step (balanced over capabilities)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the warm start (gradient norm clipped at 1)")
    check_every: int = Field(25, gt=0, description="measure sampled pass rates every this many steps")
    check_samples: int = Field(64, gt=0, description="training prompts per capability sampled at each check")
    min_pass_rate: float = Field(0.2, ge=0, le=1, description="stop once every RL-trained capability's sampled pass rate reaches this")
    per_capability: bool = Field(False, description="a capability leaves the supervised mixture at the first check where its sampled pass rate reaches min_pass_rate, so one that learns fast stays below saturation while the others catch up")


# A verifier is called as verifier(completion, answer, **fields): columns with these names would collide.
RESERVED_FIELDS = ("completion", "answer")
# Keys of a data capability (`path` or `dataset`); the last three only apply to a `dataset`.
DATASET_KEYS = ("dataset_config", "split", "test_split")
DATA_KEYS = ("test_path", "test_ratio", "split_seed", "verifier", "prompt_field", "answer_field", "system_field",
             "images_field", "videos_field", "fields", *DATASET_KEYS)


class CapabilityConfig(Section):
    """A capability: built-in generator, or a user data file or `datasets` source with a verifier."""

    # The one schema of a capability: run configs hold these, and copd.capabilities.load_capability
    # reads them (a plain dict is validated through this model first).

    name: str = Field(description="name used by branches and reports")
    builtin: str | None = Field(None, description="built-in generator: addition, reversal, sort, count (character tasks); word_problems, unit_conversion, comparisons (natural language); shapes (image), motion (video)")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the built-in generator")
    path: str | None = Field(None, description="data file: .jsonl, .json (a list of objects or JSON lines), .parquet or .csv (parquet and csv need copd[data])")
    dataset: str | None = Field(None, description="instead of `path`: anything `datasets.load_dataset` reads, a local dataset folder (also one written by save_to_disk) or a hub id (needs copd[data])")
    dataset_config: str | None = Field(None, description="config name of `dataset`")
    split: str = Field("train", description="split of `dataset` used for training")
    test_path: str | None = Field(None, description="test file (any format of `path`); otherwise `test_split` or `test_ratio`")
    test_split: str | None = Field(None, description="split of `dataset` used for testing, e.g. test")
    test_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the distinct prompts held out for testing when neither `test_path` nor `test_split` is set (0: no test split)")
    split_seed: int = Field(0, description="seed of the train/test split by ratio")
    verifier: str = Field("exact", description="data files: a registered verifier or module:function (the module from sys.path, else the config file's folder, else the working directory), either with +format[:W] for a final-answer format reward (a built-in has its own)")
    prompt_field: str = Field("prompt", description="column holding the prompt")
    answer_field: str = Field("answer", description="column holding the reference answer (numbers become strings)")
    system_field: str | None = Field(None, description="column holding a per-sample system prompt (empty or null: none)")
    images_field: str | None = Field(None, description="column holding an image path or a list of them; relative paths are resolved against the data file's folder (or the local dataset folder)")
    videos_field: str | None = Field(None, description="column holding a video path or a list of them; relative paths are resolved against the data file's folder (or the local dataset folder)")
    fields: list[str] | None = Field(None, description="columns passed to the verifier as keyword arguments; unset: every column not mapped above (completion and answer are reserved)")

    @field_validator("name", "builtin", "path", "dataset", "dataset_config", "split", "test_path", "test_split", "verifier",
                     "prompt_field", "answer_field", "system_field", "images_field", "videos_field")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("must not be empty")
        return value

    @field_validator("split_seed", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        return value

    @field_validator("fields")
    @classmethod
    def _column_names(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if not item:
                raise ValueError("must be a list of column names, got an empty one")
            if item in RESERVED_FIELDS:
                raise ValueError(f"{item!r} is reserved (the verifier is called as verifier(completion, answer, **fields))")
        return value

    def changed(self, keys: Iterable[str]) -> list[str]:
        """Which of `keys` differ from their defaults (not model_fields_set: a run's saved config.yaml lists every key)."""
        fields = type(self).model_fields
        return [k for k in keys if getattr(self, k) != fields[k].get_default(call_default_factory=True)]

    @model_validator(mode="after")
    def _one_source(self) -> CapabilityConfig:
        if [self.builtin, self.path, self.dataset].count(None) != 2:
            raise ValueError(f"capability {self.name!r} needs exactly one of `builtin`, `path` or `dataset`")
        if self.builtin is not None:
            for key in self.changed(DATA_KEYS):
                owns = "verifier" if key == "verifier" else "samples and test split"
                raise KeyProblem((key,), f"capability {self.name!r}: `{key}` applies to data files; the built-in {self.builtin!r} has its own {owns}")
            return self
        if self.options:
            raise KeyProblem(("options",), f"capability {self.name!r}: `options` applies to built-in capabilities, not to a data file")
        if self.dataset is None:
            for key in self.changed(DATASET_KEYS):
                raise KeyProblem((key,), f"capability {self.name!r}: `{key}` needs `dataset` (a file has no configs or splits)")
        if self.test_path is not None and self.test_split is not None:
            raise KeyProblem(("test_split",), f"capability {self.name!r}: give `test_path` or `test_split`, not both")
        held_out = "test_path" if self.test_path is not None else "test_split" if self.test_split is not None else None
        if held_out and self.changed(["test_ratio"]):
            raise KeyProblem(("test_ratio",), f"capability {self.name!r}: give `{held_out}` or `test_ratio`, not both")
        return self


class BranchConfig(Section):
    name: str = Field(description="branch name")
    capabilities: list[str] = Field(min_length=1, description="capabilities this branch trains on (RL data D_k)")
    beta: float = Field(0.1, ge=0, description="OPD advantage scale beta_k (docs/method.md §4)")
    weight: float = Field(1.0, ge=0, description="merge weight w_k (normalised)")
    distill_from: list[str] = Field(default_factory=list, description="teachers of a student that only distils after the experts trained (plans static_opd, mopd)")
    fork_of: str | None = Field(None, description="a distilling student starts as a copy of this branch (static OPD); unset: from the base (MOPD)")


class TopologyConfig(Section):
    kind: TopologyName = Field(
        "pair", description="who teaches whom: pair (K=2, both directions), hub (hub-and-spoke), mesh (all pairs), oneway (first branch learns from the second)"
    )
    hub: str | None = Field(None, description="hub branch name for kind=hub")


class ScheduleConfig(Section):
    plan: PlanName = Field("copd", description="plan builder: copd is Algorithm 1 and needs at least 2 branches to distil between; experts (GRPO per branch, no distillation, one branch allowed), static_opd and mopd are the baselines (static_opd and mopd need branches with `distill_from`)")
    cycles: int = Field(3, gt=0, description="N cycles of Algorithm 1")
    rl_steps: int = Field(6, ge=0, description="S_RL: Phase I steps per cycle")
    opd_steps: int = Field(4, ge=0, description="S_OPD: Phase II steps per cycle")
    trigger: Literal["fixed", "overlap"] = Field("fixed", description="fixed: S_RL steps; overlap: end Phase I early once branch overlap drops below overlap_threshold")
    overlap_threshold: float = Field(0.8, gt=0, le=1, description="top-k overlap that starts consolidation (trigger: overlap)")
    probe_prompts: int = Field(8, gt=0, description="teacher prompts per edge for each overlap probe")
    probe: bool = Field(False, description="log the top-k overlap between branches after every Phase I step (diagnostic only; training is unchanged)")
    experts_from: str | None = Field(None, description="plans static_opd and mopd: a finished run of the same experts (plan experts, same seed and settings) whose RUN/branches/NAME folders this run starts its distillation from, skipping the experts' training; their updates still count as this run's compute (copd compare sets it)")

    @model_validator(mode="after")
    def _experts_from_distillation(self) -> ScheduleConfig:
        if self.experts_from is not None and self.plan not in ("static_opd", "mopd"):
            raise KeyProblem(("experts_from",), f"only plans static_opd and mopd distil from trained experts, the plan is {self.plan!r}")
        return self


class RLConfig(Section):
    prompts_per_step: int = Field(16, gt=0, description="prompts per branch per RL step")
    rollouts_per_prompt: int = Field(8, gt=1, description="G rollouts per prompt")
    advantage: AdvantageName = Field("grpo", description="group advantage: grpo divides by the group's std, dr_grpo (Dr.GRPO) only centres")
    loss_aggregation: LossAggregationName = Field("token_mean", description="how token losses are averaged: token_mean (DAPO), seq_mean (GRPO), seq_sum_norm (Dr.GRPO)")
    eps_low: float = Field(0.2, ge=0, description="lower clip range")
    eps_high: float = Field(0.28, ge=0, description="upper clip range (clip-higher)")
    filter_zero_signal: bool = Field(False, description="drop groups whose rewards are all equal (DAPO)")
    epochs: int = Field(1, gt=0, description="policy updates per batch (1 = on-policy, rho = 1)")


class OPDConfig(Section):
    estimator: EstimatorName = Field("sampled", description="OPD advantage: sampled (the paper's, per sampled token), baseline (minus a per-position baseline), exact_kl (reverse KL on the top-k support)")
    prompts_per_step: int = Field(16, gt=0, description="teacher-data prompts per edge per OPD step")
    rollouts_per_prompt: int = Field(2, gt=0, description="student rollouts per teacher prompt")
    overlap_k: int = Field(4, gt=0, strict=True, description="k of the top-k overlap diagnostic (at most `topk`)")
    topk: int | None = Field(16, gt=0, strict=True, description="teacher scores beyond the sampled token are log-probs on the union of the student's and the teacher's top-`topk` ids per position (what baseline, exact_kl and the diagnostics use); null: the whole vocabulary, which makes every KL exact (cheap for small vocabularies only)")
    diagnostics_every: int = Field(1, ge=0, strict=True, description="compute top-k overlap and symmetric KL on OPD steps 1, 1 + N, 1 + 2N, ... of the run (0: never); on other steps a `sampled` teacher sends only its log-prob of each sampled token (baseline and exact_kl need the support on every step, so they get the diagnostics on every step)")

    @model_validator(mode="after")
    def _overlap_within_topk(self) -> OPDConfig:
        if self.topk is not None and self.overlap_k > self.topk:
            raise KeyProblem(("overlap_k",), f"must be at most opd.topk ({self.topk}), got {self.overlap_k}: the top-k overlap compares ids from the top-`topk` support")
        return self


class OptimConfig(Section):
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    max_nan_in_row: int = Field(5, gt=0, description="stop the run after this many consecutive non-finite losses")
    mini_batches: int = Field(1, gt=0, strict=True, description="optimizer steps per batch: every part (the RL batch, each OPD edge) is cut into this many mini-batches of whole prompt groups, one AdamW step each, all old log-probs taken before the first (verl's ppo_mini_batch_size); must divide rl.prompts_per_step and opd.prompts_per_step")
    step_kl_every: int = Field(10, ge=0, strict=True, description="log approx_kl (the k3 KL between a branch before and after its update) on steps 1, 1 + N, 1 + 2N, ... (0: never); each costs one more forward pass over the step's rollouts")


class EvalConfig(Section):
    samples: int = Field(200, gt=0, description="test prompts per capability")
    batch_size: int = Field(128, gt=0, description="prompts per generation batch")
    n: int = Field(1, gt=0, description="sampled completions per test prompt at the end of a run: eval.json gets mean@n and pass@k for k = 1, 2, 4, ... n")
    max_new_tokens: int | None = Field(None, gt=0, description="new tokens per completion at the end of a run (unset: sampling.max_new_tokens)")
    temperature: float | None = Field(None, gt=0, description="sampling temperature at the end of a run (unset: sampling.temperature)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus threshold at the end of a run (unset: sampling.top_p)")
    log_samples: bool = Field(False, description="also write every test prompt's completions, reference answer and rewards, one file per model: RUN/samples/MODEL.jsonl (report.md links them)")
    group_by: str | None = Field(None, description="also score per value of this data column at the end of a run (eval.json `scores`)")
    every: int = Field(0, ge=0, strict=True, description="also score every branch greedily on every capability's test split (its first `samples` prompts) before the first step and after every this many steps, as `eval` records in metrics.jsonl: held-out accuracy curves (0: only at the end)")


class MergeConfig(Section):
    method: MergeMethodName = Field("mean", description="how branches are merged: weighted and task_arithmetic use each branch's `weight`, task_arithmetic and ties work on task vectors from the base")
    branches: list[str] | None = Field(None, description="branches merged into RUN/final (default: all)")
    scale: float = Field(1.0, gt=0, description="task-vector scale (task_arithmetic, ties)")
    density: float = Field(0.2, gt=0, le=1, description="fraction of task-vector entries kept (ties)")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    capabilities: list[CapabilityConfig] = Field(min_length=1)
    branches: list[BranchConfig] = Field(min_length=1)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    opd: OPDConfig = Field(default_factory=OPDConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        known = [c.name for c in self.capabilities]
        names = [b.name for b in self.branches]
        for i, cap in enumerate(self.capabilities):
            if cap.name in known[:i]:
                raise KeyProblem(("capabilities", i, "name"), f"capability names must be unique, {cap.name!r} is defined twice")
        for i, b in enumerate(self.branches):
            if b.name in names[:i]:
                raise KeyProblem(("branches", i, "name"), f"branch names must be unique, got {names}")
        for i, b in enumerate(self.branches):
            for cap in b.capabilities:
                if cap not in known:
                    near = difflib.get_close_matches(cap, known, n=1, cutoff=0.5)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise KeyProblem(("branches", i, "capabilities"), f"branch {b.name!r} uses unknown capability {cap!r}{hint}; defined: {known}")
        for i, b in enumerate(self.branches):
            for key, refs in (("distill_from", b.distill_from), ("fork_of", [b.fork_of] if b.fork_of else [])):
                for ref in refs:
                    if ref not in names or ref == b.name:
                        raise KeyProblem(("branches", i, key), f"branch {b.name!r} refers to {ref!r}, which is not another branch {names}")
        for ref in self.merge.branches or []:
            if ref not in names:
                raise KeyProblem(("merge", "branches"), f"merge.branches names unknown branch {ref!r}; branches: {names}")
        merged = [b for b in self.branches if b.name in (self.merge.branches or names)]
        if MERGE_METHODS[self.merge.method].weights != "forbidden" and sum(b.weight for b in merged) <= 0:
            raise KeyProblem(("merge", "method"), f"merge method {self.merge.method!r} weighs the merged branches by `weight`, which sum to 0")
        if self.topology.kind == "hub" and self.topology.hub not in names:
            raise KeyProblem(("topology", "hub"), f"must name a branch {names}, got {self.topology.hub!r}")
        for ref in self.resources.branches:
            if ref not in names:
                raise KeyProblem(("resources", "branches", ref), f"names no branch; branches: {names}")
        return self

    @model_validator(mode="after")
    def _plan_has_edges(self) -> Config:
        """A plan that distils needs someone to distil between; without, it would quietly train GRPO alone."""
        plan = self.schedule.plan
        experts = [b.name for b in self.branches if not b.distill_from]
        if plan == "copd" and len(experts) < 2:
            aside = "; branches with distill_from do not count" if len(experts) < len(self.branches) else ""
            raise KeyProblem(("schedule", "plan"), f"the plan 'copd' distils between branches and needs at least 2, got "
                             f"{len(experts)} ({', '.join(experts) or 'none'}{aside}); add a branch, or set schedule.plan: "
                             "experts to train one branch with GRPO alone")
        if plan in ("static_opd", "mopd") and len(experts) == len(self.branches):
            raise KeyProblem(("schedule", "plan"), f"the plan {plan!r} distils students from trained experts and needs a "
                             "branch with `distill_from` (its teachers), none has one; add a student branch, or set "
                             "schedule.plan: copd or experts")
        return self

    @model_validator(mode="after")
    def _batch_cuts(self) -> Config:
        for key, prompts in (("rl", self.rl.prompts_per_step), ("opd", self.opd.prompts_per_step)):
            if prompts % self.optim.mini_batches:
                raise KeyProblem(("optim", "mini_batches"), f"{self.optim.mini_batches} mini-batches do not divide {key}.prompts_per_step = {prompts}")
        self._check_ranks()
        row = self.sampling.max_new_tokens + 1  # at least one prompt token
        if self.model.micro_batch_tokens < row:
            raise KeyProblem(("model", "micro_batch_tokens"), f"{self.model.micro_batch_tokens} tokens cannot hold one row: "
                             f"sampling.max_new_tokens = {self.sampling.max_new_tokens} plus the prompt")
        return self

    def _check_ranks(self) -> None:
        """Branches of several ranks: on Ray, one GPU each, full weights, text models, prompts that the ranks share."""
        for b in self.branches:
            ranks, (_, gpus) = self.resources.ranks_of(b.name), self.resources.of(b.name)
            if ranks == 1:
                continue
            key = ("resources", "branches", b.name, "ranks") if b.name in self.resources.branches and \
                self.resources.branches[b.name].ranks else ("resources", "ranks_per_branch")
            if self.run.backend != "ray":
                raise KeyProblem(key, f"branch {b.name!r} has {ranks} ranks, which run as Ray actors: set run.backend: ray")
            if gpus and gpus != ranks:
                raise KeyProblem(key, f"branch {b.name!r}: {ranks} ranks on {gpus:g} GPUs; a rank takes one GPU")
            for other, value, why in (("lora", "enabled", "a LoRA branch trains few weights and fits one device"),
                                      ("sampling", "engine", "a rollout engine serves one-rank branches")):
                if getattr(getattr(self, other), value) not in (False, "hf"):
                    raise KeyProblem(key, f"branch {b.name!r} has {ranks} ranks, which {other}.{value} does not support yet ({why})")
            for part, prompts in (("rl", self.rl.prompts_per_step), ("opd", self.opd.prompts_per_step)):
                if prompts % (ranks * self.optim.mini_batches):
                    raise KeyProblem(key, f"branch {b.name!r}: {part}.prompts_per_step = {prompts} prompt groups do not divide "
                                          f"into {self.optim.mini_batches} mini-batch(es) x {ranks} ranks")

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
