"""A whole run: prepare the base, train the plan, save branches, merge, evaluate, report.

This is what `copd train` and `copd demo` call. Everything lands in the run directory
(README, "The run directory").
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path


from copd.backends.local.branches import build_branches, describe_branches
from copd.backends.local.factory import make_policy
from copd.config.schema import Config
from copd.config.loader import dump_config, load_config
from copd.errors import CopdError
from copd.evaluation.evaluate import evaluate_policy
from copd.driver.checkpoint import check_resumable
from copd.driver.merging import merge_branches
from copd.models.sources import check_model_source, load_pretrained
from copd.backends.ray_group import check_rank_model
from copd.backends.engine.setup import check_engine, check_engine_model, close_engines, evaluation_engines, local_engines
from copd.backends.roles import BranchRoles, Prompt, SamplingParams
from copd.reporting.progress import QuietReporter, Reporter
from copd.reporting.environment import record_environment
from copd.reporting.run_report import write_report
from copd.reporting.trackers import Trackers, check_trackers
from copd.capabilities import Capability, load_capability
from copd.driver.trainer import Trainer, plan_of
from copd.backends.local.precision import resolve_precision
from copd.multimodal.media import VideoSampling
from copd.multimodal.processor import VLProcessor
from copd.driver.adopt import check_experts_from
from copd.driver.warmstart import prepare_base


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CopdError("run.device is cuda but torch sees no CUDA device; use run.device=cpu or auto")
    return name


def check_modalities(capabilities: dict[str, Capability], tokenizer) -> None:
    """A text model cannot read a capability's images or videos: say so before the run folder is written."""
    if isinstance(tokenizer, VLProcessor):
        return
    for cap in capabilities.values():
        if any(s.images or s.videos for s in cap.test_set(8)):
            raise CopdError(f"capability {cap.name!r} has images or videos, but the base model reads text only; use a "
                            "vision-language model (model.tiny.architecture: qwen3_vl, or a Qwen3-VL, Qwen2.5-VL or Qwen2-VL model.path)")


def load_capabilities(config: Config, base_dir: Path | None = None) -> dict[str, Capability]:
    sampling = VideoSampling.from_options(config.model.vision.model_dump())
    return {c.name: load_capability(c, base_dir, sampling) for c in config.capabilities}


def check_run_dir(config: Config, run_dir: Path, resume: bool) -> None:
    """Refuse to mix runs: a new run needs an empty folder; --resume needs the same config."""
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise CopdError(f"--resume {run_dir}: no config.yaml there, so it holds no run to resume")
        _check_same_run(config, saved)
        return
    if saved.is_file():
        raise CopdError(f"run directory {run_dir} already holds a run; resume it with --resume {run_dir} or choose another run.out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CopdError(f"run directory {run_dir} is not empty; choose another run.out")


def prepare_run_dir(config: Config, run_dir: Path, resume: bool) -> None:
    """check_run_dir, then (for a new run) create the folder with its config.yaml."""
    check_run_dir(config, run_dir, resume)
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")


# run.* keys that say where a run goes, not what it computes.
PLACEMENT_KEYS = ("out", "backend", "ray_address", "restart_timeout")


def _check_same_run(config: Config, saved: Path) -> None:
    # Read through the schema, so a run saved before a key existed compares with its default.
    old = load_config(saved).to_yaml_dict()
    new = config.to_yaml_dict()
    for settings in (old, new):  # where branches run may change: a run resumes on other resources or rank counts
        settings.pop("resources", None)
        for key in PLACEMENT_KEYS:
            settings["run"].pop(key, None)
    for section in new:
        if old.get(section) != new[section]:
            raise CopdError(f"{saved}: the run there was made with a different config (section {section!r} differs); resume with the same config")


def run_training(config: Config, resume: bool = False, reporter: Reporter | None = None, base_dir: Path | None = None) -> Path:
    """Run the config end to end; returns the run directory."""
    reporter = reporter or QuietReporter()
    run_dir = Path(config.run.out).expanduser()
    # Plan, data, device and model-path errors surface before anything is written (names of
    # plans, estimators and merge methods were checked when the config loaded).
    plan_of(config)
    capabilities = load_capabilities(config, base_dir)
    device = resolve_device(config.run.device)
    config, warnings = resolve_precision(config, device)  # `auto` dtypes decided by a measured bf16 speed
    for warning in warnings:
        reporter.print(f"warning: {warning}")
    if config.run.backend == "ray":
        from copd.backends.ray_group import check_placement

        check_placement(config)  # Ray installed, and room for every rank
    check_trackers(config.run.report_to)
    check_engine(config)
    check_engine_model(config)
    check_experts_from(config)
    base_folder = run_dir / "base"
    reuse_base = resume and (base_folder / "config.json").is_file()
    if not reuse_base:
        check_model_source(config.model)
    check_run_dir(config, run_dir, resume)
    if resume:
        check_resumable(run_dir, [b.name for b in config.branches])
    timing, t0 = {}, time.perf_counter()
    if reuse_base:
        model, tokenizer = load_pretrained(base_folder, config.model.dtype)
    else:
        model, tokenizer, info = prepare_base(config, capabilities, reporter)
    timing["warmup_seconds"] = round(time.perf_counter() - t0, 2)
    check_modalities(capabilities, tokenizer)
    check_engine_model(config, tokenizer)
    check_rank_model(config, tokenizer)
    remote = config.run.backend == "ray"
    # With Ray the branches are built inside their actors, from the saved base folder.
    policies, base_policy = (({}, make_policy("base", model, tokenizer, device=device, **config.model.policy_options())) if remote
                             else build_branches(config, model, tokenizer, device))
    check_token_budget(config, capabilities, base_policy)
    # The run folder is written only now, so a mistake found while building the base or the
    # branches (a bad lora.target_modules, say) leaves no half-made run behind.
    prepare_run_dir(config, run_dir, resume)
    if not reuse_base:
        base_policy.save_pretrained(base_folder)
        (run_dir / "warmup.json").write_text(json.dumps(info, indent=1))
    record_environment(run_dir, device)
    trackers = Trackers.open(config.run.report_to, run_dir, config.run.project, config.to_yaml_dict(), resume)
    run = RunContext(config, run_dir, capabilities, reporter, resume, timing, trackers, t0)
    try:
        _train_anywhere(run, policies, base_policy, device)
        (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
        write_report(run_dir)
        trackers.results(run_dir)
    finally:
        trackers.close()
    return run_dir


# Prompts per capability whose length is checked against the token budget before a run starts.
BUDGET_CHECK_PROMPTS = 10_000


def check_token_budget(config: Config, capabilities: dict[str, Capability], policy) -> None:
    """model.micro_batch_tokens must hold one row: the longest training prompt plus sampling.max_new_tokens.

    Prompts are counted as the policy formats them (chat template included), the training
    prompts of a data file in full (up to BUDGET_CHECK_PROMPTS), of a generator that many
    drawn. An image or video adds its vision tokens on top, which this count leaves out.
    """
    budget, new_tokens = config.model.micro_batch_tokens, config.sampling.max_new_tokens
    text_tokenizer = getattr(policy.tokenizer, "tokenizer", policy.tokenizer)  # a VLProcessor wraps one
    for name, cap in capabilities.items():
        samples = getattr(cap.source, "train", None) or cap.train_sampler(0).draw(min(BUDGET_CHECK_PROMPTS, 1000))
        texts = [policy.format_prompt(Prompt.of(s)) for s in samples[:BUDGET_CHECK_PROMPTS]]
        longest = max((len(ids) for ids in text_tokenizer(texts, add_special_tokens=False)["input_ids"]), default=0)
        if longest + new_tokens > budget:
            raise CopdError(f"model.micro_batch_tokens = {budget} cannot hold one row: capability {name!r} has a prompt of "
                            f"{longest} tokens, plus sampling.max_new_tokens = {new_tokens}; raise the budget to at least "
                            f"{longest + new_tokens}")


@dataclass
class RunContext:
    """What every stage of one run shares."""

    config: Config
    run_dir: Path
    capabilities: dict[str, Capability]
    reporter: Reporter
    resume: bool
    timing: dict  # stage -> seconds, written to timing.json
    trackers: Trackers
    started: float  # perf_counter() at the start


def _train_anywhere(run: RunContext, policies: dict, base_policy, device: str) -> None:
    """Train in this process, or on one Ray actor per branch (built there from the saved base folder);
    with sampling.engine vllm, each branch samples through its own engine."""
    if run.config.run.backend != "ray":
        branches = ({name: BranchRoles.of(p) for name, p in policies.items()} if run.config.sampling.engine == "hf"
                    else local_engines(run.config, run.run_dir, policies))
        try:
            _train_and_evaluate(run, branches, base_policy)
        finally:
            close_engines(branches)
    else:
        from copd.backends.ray_backend import ray_branches, release

        branches, group = ray_branches(run.config, run.run_dir / "base", device)
        try:
            _train_and_evaluate(run, branches, base_policy)
        finally:
            release(branches, group)
    run.timing["total_seconds"] = round(time.perf_counter() - run.started, 2)


def _train_and_evaluate(run: RunContext, branches: dict[str, BranchRoles], base_policy) -> None:
    """Train the plan, save the branches, merge them, evaluate every model (timings into run.timing)."""
    learners = {name: roles.learner for name, roles in branches.items()}
    run.reporter.print(describe_branches(learners))
    t1 = time.perf_counter()
    Trainer(run.config, run.run_dir, branches, run.capabilities, run.reporter, run.trackers).run(resume=run.resume)
    run.timing["train_seconds"] = round(time.perf_counter() - t1, 2)
    for name, learner in learners.items():
        learner.save_pretrained(run.run_dir / "branches" / name)
    merged = merge_branches(run.run_dir, run.config)
    t2 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if run.config.sampling.eval_engine == "vllm":
            models = evaluation_engines(run.config, run.run_dir, branches, base_policy.tokenizer, stack)
        else:  # each branch's own learner samples (not its engine), as the base and the merged model do
            models = {"base": base_policy, **{f"branch:{n}": r.scorer for n, r in branches.items()}, "merged": merged}
        evaluate_run(run.config, run.run_dir, run.capabilities, models, run.reporter)
    run.timing["eval_seconds"] = round(time.perf_counter() - t2, 2)


def evaluate_run(config: Config, run_dir: Path, capabilities: dict[str, Capability], policies: dict, reporter: Reporter) -> dict:
    """eval.json: every model (base, branches, merged) on every capability's test split."""
    params = SamplingParams.from_config(config.sampling)
    caps = list(capabilities.values())
    reporter.start("evaluating", len(policies))
    models = {}
    for label, policy in policies.items():
        models[label] = evaluate_policy(policy, caps, config.eval.samples, params, config.eval.batch_size, seed=config.run.seed)
        reporter.advance("evaluating", label)
    reporter.stop()
    result = {
        "decoding": {"greedy": "argmax decoding", "sampled": f"one sample at temperature {params.temperature}, top_p {params.top_p}"},
        "samples": config.eval.samples,
        # A small option space can hold fewer test prompts than asked for: say how many were used.
        "test_sizes": {c.name: len(c.test_set(config.eval.samples)) for c in caps},
        "models": models,
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result
