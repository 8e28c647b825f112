"""A whole run: prepare the base, train the plan, save branches, merge, evaluate, report.

This is what `copd train` and `copd demo` call. Everything lands in the run directory
(docs/run-directory.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from copd.backends.engine.setup import check_engine, check_engine_model, evaluation_engines
from copd.backends.local.branches import describe_branches
from copd.backends.local.precision import resolve_precision
from copd.backends.ray_group import check_rank_model
from copd.backends.roles import BranchRoles, Prompt
from copd.capabilities import Capability, load_capability
from copd.config.loader import dump_config, load_config
from copd.config.schema import Config
from copd.driver.adopt import check_experts_from
from copd.driver.branches import BRANCH_BACKENDS
from copd.driver.checkpoint import check_resumable
from copd.driver.merging import merge_branches
from copd.driver.trainer import Trainer, plan_of
from copd.driver.warmstart import model_text_check, prepare_base
from copd.errors import CopdError
from copd.evaluation.records import EvalSettings, check_group_column, partly_read, score_model
from copd.models.sources import check_model_source, load_pretrained
from copd.multimodal.media import VideoSampling
from copd.multimodal.processor import VLProcessor
from copd.reporting.environment import record_environment
from copd.reporting.progress import QuietReporter, Reporter
from copd.reporting.run_report import write_report
from copd.reporting.trackers import Trackers, check_trackers


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
    """The config's capabilities, their text checked against what the base model can encode (a built
    tiny model's alphabet), so a character it would read as <unk> fails now, naming its file and row."""
    sampling = VideoSampling.from_options(config.model.vision.model_dump())
    check = model_text_check(config)
    return {c.name: load_capability(c, base_dir, sampling, check) for c in config.capabilities}


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
PLACEMENT_KEYS = ("out", "config_dir", "backend", "ray_address", "restart_timeout")


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
    """Run the config end to end; returns the run directory.

    Every check that can fail on the user's input runs before the run folder is written.
    """
    reporter = reporter or QuietReporter()
    run_dir = Path(config.run.out).expanduser()
    if base_dir is not None and config.run.config_dir is None:  # recorded in RUN/config.yaml for copd eval and diagnose
        config = config.model_copy(update={"run": config.run.model_copy(update={"config_dir": str(Path(base_dir).resolve())})})
    base_dir = Path(config.run.config_dir) if config.run.config_dir else None
    config, capabilities, device = check_run(config, run_dir, resume, reporter, base_dir)
    started, timing = time.perf_counter(), {}  # timing: stage -> seconds, written to timing.json
    with timed(timing, "warmup_seconds"):
        base = prepare_base_model(config, run_dir, capabilities, resume, reporter)
    backend = BRANCH_BACKENDS[config.run.backend](config, base.model, base.tokenizer, device)
    check_token_budget(config, capabilities, backend.base_policy)
    write_run_dir(config, run_dir, resume, backend.base_policy, base.warmup, device)
    trackers = Trackers.open(config.run.report_to, run_dir, config.run.project, config.to_yaml_dict(), resume)
    try:
        with backend.open(run_dir) as branches:
            reporter.print(describe_branches({name: roles.learner for name, roles in branches.items()}))
            with timed(timing, "train_seconds"):
                Trainer(config, run_dir, branches, capabilities, reporter, trackers).run(resume=resume)
            merged = save_and_merge(config, run_dir, branches)
            with timed(timing, "eval_seconds"):
                evaluate_models(config, run_dir, capabilities, branches, backend.base_policy, merged, reporter)
        timing["total_seconds"] = round(time.perf_counter() - started, 2)
        (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
        write_report(run_dir)
        trackers.results(run_dir)
    finally:
        trackers.close()
    return run_dir


def _reuses_base(run_dir: Path, resume: bool) -> bool:
    """A resumed run loads the base its first start saved (its warm start is not run again)."""
    return resume and (run_dir / "base" / "config.json").is_file()


def check_run(config: Config, run_dir: Path, resume: bool, reporter: Reporter, base_dir: Path | None) -> tuple[Config, dict[str, Capability], str]:
    """What can be checked before the base model is built: plan, data, device, precision, placement,
    trackers, engine, experts, model source, run folder. Returns the config with `auto` dtypes decided,
    the capabilities and the device."""
    plan_of(config)  # names of plans, estimators and merge methods were checked when the config loaded
    capabilities = load_capabilities(config, base_dir)
    device = resolve_device(config.run.device)
    config, warnings = resolve_precision(config, device)  # `auto` dtypes decided by a measured bf16 speed
    for warning in warnings:
        reporter.print(f"warning: {warning}")
    BRANCH_BACKENDS[config.run.backend].check(config)
    check_trackers(config.run.report_to)
    check_engine(config)
    check_engine_model(config)
    check_experts_from(config)
    check_group_column(list(capabilities.values()), config.eval.group_by, "eval.group_by")
    if not _reuses_base(run_dir, resume):
        check_model_source(config.model)
    check_run_dir(config, run_dir, resume)
    if resume:
        check_resumable(run_dir, [b.name for b in config.branches])
    return config, capabilities, device


@dataclass
class Base:
    model: object
    tokenizer: object
    warmup: dict | None  # what the warm start did (warmup.json); None for a base a resumed run reloads


def prepare_base_model(config: Config, run_dir: Path, capabilities: dict[str, Capability], resume: bool, reporter: Reporter) -> Base:
    """The base model and tokenizer (loaded, built tiny, warm-started), then the checks that need the tokenizer."""
    if _reuses_base(run_dir, resume):
        base = Base(*load_pretrained(run_dir / "base", config.model.dtype), None)
    else:
        base = Base(*prepare_base(config, capabilities, reporter))
    check_modalities(capabilities, base.tokenizer)
    check_engine_model(config, base.tokenizer)
    check_rank_model(config, base.tokenizer)
    return base


def write_run_dir(config: Config, run_dir: Path, resume: bool, base_policy, warmup: dict | None, device: str) -> None:
    """The run folder, written only now: config.yaml, the base and its warm start (a new run), the environment."""
    prepare_run_dir(config, run_dir, resume)
    if warmup is not None:
        base_policy.save_pretrained(run_dir / "base")
        (run_dir / "warmup.json").write_text(json.dumps(warmup, indent=1))
    record_environment(run_dir, device)


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


@contextlib.contextmanager
def timed(timing: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds of the block to timing[key] (a key timed in several blocks sums them)."""
    t0 = time.perf_counter()
    yield
    timing[key] = round(timing.get(key, 0.0) + time.perf_counter() - t0, 2)


def save_and_merge(config: Config, run_dir: Path, branches: dict[str, BranchRoles]):
    """Every branch as a transformers folder under branches/, and their merge under merged/ (returned as a policy)."""
    for name, roles in branches.items():
        roles.learner.save_pretrained(run_dir / "branches" / name)
    return merge_branches(run_dir, config)


def evaluate_models(config: Config, run_dir: Path, capabilities: dict[str, Capability], branches: dict[str, BranchRoles],
                    base_policy, merged, reporter: Reporter) -> None:
    """eval.json: the base, every branch and the merged model on every capability's test split."""
    with contextlib.ExitStack() as stack:
        if config.sampling.eval_engine == "vllm":
            models = evaluation_engines(config, run_dir, branches, base_policy.tokenizer, stack)
        else:  # each branch's own learner samples (not its engine), as the base and the merged model do
            models = {"base": base_policy, **{f"branch:{n}": r.scorer for n, r in branches.items()}, "merged": merged}
        evaluate_run(config, run_dir, capabilities, models, reporter)


def evaluate_run(config: Config, run_dir: Path, capabilities: dict[str, Capability], policies: dict, reporter: Reporter) -> dict:
    """eval.json: every model (base, branches, merged) on every capability's test split."""
    settings = EvalSettings.of_run(config)
    caps = list(capabilities.values())
    reporter.start("evaluating", len(policies))
    models, logs, partial = {}, [], {}
    for label, policy in policies.items():
        models[label], records = score_model(policy, label, caps, config.eval.samples, settings, config.eval.group_by)
        partial = partial or partly_read(records)  # the references are the same for every model
        if config.eval.log_samples:  # one file per model: samples/base.jsonl, samples/branch-rev.jsonl, ...
            logs.append(f"samples/{label.replace(':', '-')}.jsonl")
            (run_dir / "samples").mkdir(exist_ok=True)
            (run_dir / logs[-1]).write_text("".join(json.dumps(r) + "\n" for r in records))
        reporter.advance("evaluating", label)
    reporter.stop()
    sampled = f"{settings.n} sample(s) per prompt at temperature {settings.temperature}, top_p {settings.top_p}"
    result = {
        "decoding": {"greedy": "argmax decoding", "sampled": sampled},
        "settings": dataclasses.asdict(settings),
        "sample_logs": logs,
        "answers_read_in_part": partial,
        "samples": config.eval.samples,
        # A small option space can hold fewer test prompts than asked for: say how many were used.
        "test_sizes": {c.name: len(c.test_set(config.eval.samples)) for c in caps},
        "models": models,
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result
