"""`copd eval`: score a run's models or a single model folder on named capabilities."""

from __future__ import annotations

import json
from pathlib import Path

from copd.errors import CopdError
from copd.evaluation.evaluate import evaluate_policy
from copd.models.sources import load_pretrained
from copd.backends.roles import SamplingParams
from copd.backends.local.factory import make_policy
from copd.capabilities import BUILTIN_CAPABILITIES, Capability, load_capability
from copd.multimodal.media import VideoSampling


def resolve_tasks(names: str, verifier: str, run_config=None) -> list[Capability]:
    """A run's own capability names first (same options as in training), then built-ins, then data files (.jsonl, .json, .parquet, .csv)."""
    own = {c.name: c for c in run_config.capabilities} if run_config else {}
    # Videos are checked against the frame sampling the run's models were trained with.
    sampling = VideoSampling.from_options(run_config.model.vision.model_dump()) if run_config else None
    caps = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in own:
            caps.append(load_capability(own[name], video_sampling=sampling))
        elif name in BUILTIN_CAPABILITIES:
            caps.append(load_capability({"name": name, "builtin": name}))
        elif name.endswith(".jsonl") or Path(name).exists():
            # The whole file is the test split.
            spec = {"name": Path(name).stem, "path": name, "test_path": name, "verifier": verifier}
            caps.append(load_capability(spec, video_sampling=sampling))
        else:
            known = sorted(set(own) | set(BUILTIN_CAPABILITIES))
            raise CopdError(f"--tasks: {name!r} is neither a capability ({', '.join(known)}) nor a data file")
    if not caps:
        raise CopdError("--tasks: give at least one capability name or data file")
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


def run_eval(target: str, tasks: str, samples: int, verifier: str, out: str | None, seed: int) -> dict:
    path = Path(target).expanduser()
    if not path.exists():
        raise CopdError(f"model or run not found: {path}")
    run_config = None
    if (path / "config.yaml").is_file():
        from copd.config.loader import load_config

        run_config = load_config(path / "config.yaml")
    caps = resolve_tasks(tasks, verifier, run_config)
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
