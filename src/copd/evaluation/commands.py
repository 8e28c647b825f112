"""`copd eval`: score a run's models or a single model folder on named capabilities."""

from __future__ import annotations

import json
from pathlib import Path

from copd.backends.local.factory import make_policy
from copd.backends.roles import SamplingParams
from copd.capabilities import BUILTIN_CAPABILITIES, Capability, load_capability
from copd.errors import CopdError
from copd.evaluation.evaluate import evaluate_policy
from copd.models.sources import load_pretrained
from copd.multimodal.media import VideoSampling

# The keys of a data capability that `copd eval` and `copd diagnose` take as options (--prompt-field, ...).
DATA_FILE_OPTIONS = ("verifier", "prompt_field", "answer_field", "system_field", "images_field", "videos_field", "fields")


def add_data_file_options(parser) -> None:
    """--verifier, --prompt-field, ...: the capability keys of a data file, named and described as in the config."""
    from copd.config.schema import CapabilityConfig

    for key in DATA_FILE_OPTIONS:
        field = CapabilityConfig.model_fields[key]
        default = f" (default {field.default})" if field.default is not None else ""
        listed = " (comma-separated)" if key == "fields" else ""
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar=key.upper(),
                            help=f"data-file tasks: {field.description}{listed}{default}")


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
    caps, files = [], 0
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in own:
            caps.append(load_capability(own[name], video_sampling=sampling))
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
    """The model folders to score: a run's base, branches and final model, or one folder."""
    if (target / "config.json").is_file():
        return {target.name: target}
    found = {"base": target / "base"}
    found.update({f"branch:{p.name}": p for p in sorted((target / "branches").glob("*"))})
    found["merged"] = target / "final"
    found = {k: v for k, v in found.items() if (v / "config.json").is_file()}
    if not found:
        raise CopdError(f"{target}: neither a transformers model folder nor a run directory with models")
    return found


def run_eval(target: str, tasks: str, samples: int, data_keys: dict, out: str | None, seed: int) -> dict:
    path = Path(target).expanduser()
    if not path.exists():
        raise CopdError(f"model or run not found: {path}")
    run_config = None
    if (path / "config.yaml").is_file():
        from copd.config.loader import load_config

        run_config = load_config(path / "config.yaml")
    caps = resolve_tasks(tasks, data_keys, run_config)
    s = run_config.sampling if run_config else None
    params = SamplingParams.from_config(s) if s else SamplingParams(max_new_tokens=32)
    prompting = run_config.model.policy_options() if run_config else {}
    results = {}
    for label, folder in models_of(path).items():
        model, tokenizer = load_pretrained(folder)
        results[label] = evaluate_policy(make_policy(label, model, tokenizer, **prompting), caps, samples, params, seed=seed)
    print(f"  {'model':<16}" + "".join(f"{c.name:>14}" for c in caps) + "   (greedy accuracy / sampled pass rate)")
    for label, scores in results.items():
        cells = "".join(f"{100 * scores['greedy'][c.name]:>7.1f}/{100 * scores['sampled'][c.name]:<5.1f}%" for c in caps)
        print(f"  {label:<16}{cells}")
    if out:
        Path(out).write_text(json.dumps({"samples": samples, "models": results}, indent=1))
        print(f"scores: {out}")
    return results
