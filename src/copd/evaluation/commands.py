"""`copd eval`: score a run's models or a single model folder on named capabilities."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from copd.backends.local.factory import make_policy
from copd.capabilities import BUILTIN_CAPABILITIES, VERIFIERS, Capability, load_capability
from copd.core.passk import reported_ks
from copd.errors import CopdError
from copd.evaluation.records import EvalSettings, check_group_column, partly_read_warnings, score_model
from copd.evaluation.runs import describe_run, enclosing_run, load_run_config
from copd.models.sources import load_pretrained
from copd.multimodal.media import VideoSampling

# From the registry, as the error for an unknown verifier lists it.
VERIFIER_HELP = (f"how a completion is scored: one of {', '.join(VERIFIERS)}, or module:function (from sys.path or the working directory); "
                 "either with +format[:W] adds a final-answer format reward")

# The keys of a data capability that `copd eval` and `copd diagnose` take as options (--prompt-field, ...).
DATA_FILE_OPTIONS = ("verifier", "prompt_field", "answer_field", "system_field", "images_field", "videos_field", "fields")


def add_data_file_options(parser) -> None:
    """--verifier, --prompt-field, ...: the capability keys of a data file, named and described as in the config."""
    from copd.config.schema import CapabilityConfig

    for key in DATA_FILE_OPTIONS:
        field = CapabilityConfig.model_fields[key]
        default = f" (default {field.default})" if field.default is not None else ""
        listed = " (comma-separated)" if key == "fields" else ""
        described = VERIFIER_HELP if key == "verifier" else field.description
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar=key.upper(),
                            help=f"data-file tasks: {described}{listed}{default}")


def data_file_keys(args) -> dict:
    """The data-file options given on the command line, as capability keys."""
    given = {key: getattr(args, key) for key in DATA_FILE_OPTIONS if getattr(args, key, None) is not None}
    if "fields" in given:
        given["fields"] = [name.strip() for name in given["fields"].split(",") if name.strip()]
    return given


def resolve_tasks(names: str, data_keys: dict | None = None, run_config=None) -> list[Capability]:
    """A run's own capability names first (same options as in training), then built-ins, then data files
    (.jsonl, .json, .parquet, .csv) read with `data_keys` (prompt_field, answer_field, verifier, ...)."""
    data_keys = data_keys or {}
    own = {c.name: c for c in run_config.capabilities} if run_config else {}
    # Videos are checked against the frame sampling the run's models were trained with.
    sampling = VideoSampling.from_options(run_config.model.vision.model_dump()) if run_config else None
    # Relative data paths and verifier modules of the run's capabilities: as in training, from the config's folder.
    config_dir = Path(run_config.run.config_dir) if run_config and run_config.run.config_dir else None
    caps, files = [], 0
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in own:
            caps.append(load_capability(own[name], config_dir, video_sampling=sampling))
        elif name in BUILTIN_CAPABILITIES:
            caps.append(load_capability({"name": name, "builtin": name}))
        elif name.endswith(".jsonl") or Path(name).exists():
            # The whole file is the test split.
            spec = {"name": Path(name).stem, "path": name, "test_path": name, **data_keys}
            files += 1
            caps.append(load_capability(spec, video_sampling=sampling))
        else:
            known = sorted(set(own) | set(BUILTIN_CAPABILITIES))
            raise CopdError(f"--tasks: {name!r} is neither a capability ({', '.join(known)}) nor a data file")
    if not caps:
        raise CopdError("--tasks: give at least one capability name or data file")
    if data_keys and not files:
        given = ", ".join(f"--{k.replace('_', '-')}" for k in data_keys)
        raise CopdError(f"{given}: apply to data-file tasks, and --tasks names none")
    return caps


def models_of(target: Path) -> dict[str, Path]:
    """The model folders to score: a run's base, branches, final model and every merge written into it
    (RUN/merged-METHOD, labelled by its folder name), or one folder."""
    if (target / "config.json").is_file():
        return {target.name: target}
    found = {"base": target / "base"}
    found.update({f"branch:{p.name}": p for p in sorted((target / "branches").glob("*"))})
    found["merged"] = target / "final"
    found.update({p.name: p for p in sorted(target.glob("merged-*"))})
    found = {k: v for k, v in found.items() if (v / "config.json").is_file()}
    if not found:
        raise CopdError(f"{target}: neither a transformers model folder nor a run directory with models")
    return found


# A model folder outside any run has no run config: these generation settings apply unless given on the command line.
FOLDER_DEFAULTS = {"max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0, "n": 1, "batch_size": 128}
SETTING_FLAGS = tuple(FOLDER_DEFAULTS)


def add_generation_options(parser, folder_defaults: dict | None = None) -> None:
    """--max-new-tokens, --temperature, --top-p, --n, --batch-size: unset, a run's own settings apply (model folders
    outside a run: FOLDER_DEFAULTS, updated with `folder_defaults`)."""
    helps = {"max_new_tokens": "new tokens per completion", "temperature": "sampling temperature", "top_p": "nucleus sampling threshold",
             "n": "sampled completions per prompt (pass@k, mean@n)", "batch_size": "prompts per generation call"}
    for key, default in {**FOLDER_DEFAULTS, **(folder_defaults or {})}.items():
        where = f"the run's own; a model folder outside a run: {default}" if key != "n" else default
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(default), metavar=key.upper(),
                            help=f"{helps[key]} (default: {where})")


def eval_settings(given: dict, run_config, seed: int, folder_defaults: dict | None = None) -> tuple[EvalSettings, list[str]]:
    """The generation settings: the flags given, else the run's own (its end-of-run evaluation: eval.*, else
    sampling.*), else FOLDER_DEFAULTS; and the names of those that fell back to a model-folder default."""
    defaults = dict(folder_defaults or FOLDER_DEFAULTS)
    if run_config is not None:
        own = EvalSettings.of_run(run_config)
        defaults.update({key: getattr(own, key) for key in SETTING_FLAGS})
    chosen = {key: given[key] if given.get(key) is not None else defaults[key] for key in SETTING_FLAGS}
    for key, low in (("max_new_tokens", 1), ("n", 1), ("batch_size", 1), ("temperature", 1e-6), ("top_p", 1e-6)):
        if chosen[key] < low or (key == "top_p" and chosen[key] > 1):
            limits = "in (0, 1]" if key == "top_p" else "positive" if low < 1 else "at least 1"
            raise CopdError(f"--{key.replace('_', '-')} {chosen[key]}: must be {limits}")
    fallback = [key for key in SETTING_FLAGS if given.get(key) is None and run_config is None]
    return EvalSettings(**chosen, seed=seed), fallback


def run_eval(target: str, tasks: str, samples: int, data_keys: dict, out: str | None, seed: int, given: dict | None = None,
             group_by: str | None = None, log_samples: str | None = None, reporter=None) -> dict:
    """`copd eval`; `reporter` (copd.reporting.progress) shows prompts done per model and task."""
    path = Path(target).expanduser()
    if not path.exists():
        raise CopdError(f"model or run not found: {path}")
    # A run, or a model folder inside one (RUN/final, RUN/branches/X, RUN/merged-ties): the run's tasks and settings.
    run_dir = enclosing_run(path)
    run_config = load_run_config(run_dir)
    if run_dir is not None and run_dir != path.resolve():
        print(describe_run(run_dir, run_config))
    caps = resolve_tasks(tasks, data_keys, run_config)
    check_group_column(caps, group_by)
    settings, fallback = eval_settings(given or {}, run_config, seed)
    print(describe_settings(settings, fallback))
    prompting = run_config.model.policy_options() if run_config else {}
    results, logged = {}, []
    for label, folder in models_of(path).items():
        model, tokenizer = load_pretrained(folder)
        policy = make_policy(label, model, tokenizer, **prompting)
        results[label], records = score_model(policy, label, caps, samples, settings, group_by, reporter)
        for line in partly_read_warnings(records) if not logged else []:  # the references are the same for every model
            print(line)
        logged += [{"model": label, **r} for r in records]
    print_scores(results, caps, settings.n)
    if log_samples:
        with Path(log_samples).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in logged)
        print(f"samples: {log_samples} ({len(logged)} records)")
    if out:
        found = {"settings": dataclasses.asdict(settings), "samples": samples, "group_by": group_by, "models": results}
        Path(out).write_text(json.dumps(found, indent=1))
        print(f"scores: {out}")
    return results


def describe_settings(settings: EvalSettings, fallback: list[str]) -> str:
    shown = ", ".join(f"{key} {getattr(settings, key)}" for key in (*SETTING_FLAGS, "seed"))
    note = f" ({', '.join(fallback)}: model-folder defaults; change them with --{fallback[0].replace('_', '-')} ...)" if fallback else ""
    return f"generation: {shown}{note}"


def print_scores(results: dict, caps: list[Capability], n: int) -> None:
    """One row per model, task and group: prompts, greedy accuracy, mean@n and pass@k (%)."""
    keys = ["greedy", f"mean@{n}", *(f"pass@{k}" for k in reported_ks(n))]
    print(f"  {'model':<16}{'task':<14}{'group':<18}{'prompts':>8}" + "".join(f"{k:>9}" for k in keys))
    for label, found in results.items():
        for cap in caps:
            summary = found["scores"][cap.name]
            rows = [("all", summary["all"]), *summary.get("groups", {}).items()]
            for group, scores in rows:
                cells = "".join(f"{100 * scores[k]:>8.1f}%" for k in keys)
                print(f"  {label:<16}{cap.name:<14}{group[:17]:<18}{scores['prompts']:>8}{cells}")
