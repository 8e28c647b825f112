"""`copd compare`: train every method on the same capabilities and base, over several seeds.

Each (training run, seed) gets its own run directory under the comparison folder; a run
that already has eval.json is reused, so an interrupted comparison continues where it
stopped. Scores come from each run's eval.json, compute from its metrics.jsonl.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml
from pydantic import ValidationError

from copd.config.loader import describe_error
from copd.config.methods import BASE_ROW, DISTILLING_RUNS, EXPERTS_RUN, METHODS, ORDERINGS, group_of
from copd.config.schema import Config, unknown_name
from copd.driver.pipeline import run_training
from copd.driver.trainer import plan_of
from copd.errors import CopdError
from copd.reporting.progress import QuietReporter, Reporter
from copd.reporting.run_report import load_metrics


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise CopdError(f"--methods: none given; valid: {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise CopdError(f"--methods: {unknown_name('method', name, METHODS)}")
    return names


def check_methods(base: Config, methods: list[str]) -> None:
    """Derive every method's config and plan before anything trains, so a mistake costs no training time."""
    for name in methods:
        try:
            config = METHODS[name].transform(base)
        except ValidationError as err:
            raise CopdError(describe_error(err, f"method {name!r} (derived from the config)")) from None
        try:
            plan_of(config)
        except CopdError as err:
            raise CopdError(f"method {name!r}: {err}") from None


def run_dir_of(out: Path, run: str, seed: int) -> Path:
    return out / "runs" / f"{run}-seed{seed}"


def runs_to_train(methods: list[str]) -> list[str]:
    """The distinct training runs of the methods, in order; static OPD and MOPD need the experts run
    first, since they distil from its experts instead of training the same experts again."""
    runs = [METHODS[m].run for m in methods]
    if any(r in DISTILLING_RUNS for r in runs):
        runs.insert(0, EXPERTS_RUN)
    return list(dict.fromkeys(runs))


def train_all(base: Config, methods: list[str], seeds: list[int], out: Path, reporter: Reporter, base_dir: Path | None) -> None:
    """Train each distinct (run, seed) once; finished runs (with eval.json) are reused."""
    for seed in seeds:
        for run in runs_to_train(methods):
            run_dir = run_dir_of(out, run, seed)
            if (run_dir / "eval.json").is_file():
                continue
            raw = METHODS[run].transform(base).to_yaml_dict()
            raw["run"].update(seed=seed, out=str(run_dir))
            if run in DISTILLING_RUNS:
                raw["schedule"]["experts_from"] = str(run_dir_of(out, EXPERTS_RUN, seed))
            reporter.print(f"[compare] {run} seed {seed} -> {run_dir}")
            run_training(Config.model_validate(raw), resume=(run_dir / "config.yaml").is_file(), reporter=reporter, base_dir=base_dir)


def compute_of(run_dir: Path) -> dict[str, float]:
    """Optimizer updates and trained completion tokens (RL and OPD rollouts) of one run, with those
    of the run whose experts it distilled from (schedule.experts_from)."""
    rows = [r for r in load_metrics(run_dir / "metrics.jsonl") if r.get("type") == "branch" and "loss" in r]
    compute = {"updates": sum(1 for r in rows if not r.get("skipped")), "tokens": sum(r.get("tokens", 0.0) for r in rows)}
    source = yaml.safe_load((run_dir / "config.yaml").read_text())["schedule"].get("experts_from")
    if source:
        compute = {k: v + compute_of(Path(source).expanduser())[k] for k, v in compute.items()}
    return compute


def collect(base: Config, methods: list[str], seeds: list[int], out: Path) -> dict:
    """compare.json's content: per row and seed, per-capability greedy accuracy and overall."""
    capabilities = sorted({c for b in base.branches if not b.distill_from for c in b.capabilities})
    rows: dict[str, dict] = {BASE_ROW: {"run": METHODS[methods[0]].run, "seeds": {}}}
    compute: dict[str, dict] = {}
    settings = None  # every run evaluates with the same eval.* keys (the base config's)
    for name in methods:
        method = METHODS[name]
        config = method.transform(base)
        for seed in seeds:
            run_dir = run_dir_of(out, method.run, seed)
            found = json.loads((run_dir / "eval.json").read_text())
            models, settings = found["models"], settings or found.get("settings")
            compute[f"{method.run}-seed{seed}"] = compute_of(run_dir)
            rows[BASE_ROW]["seeds"].setdefault(str(seed), _scores(models["base"], capabilities))
            for label, model in method.outputs(config).items():
                rows.setdefault(label, {"run": method.run, "method": name, "seeds": {}})
                rows[label]["seeds"][str(seed)] = _scores(models[model], capabilities)
    for row in rows.values():
        row["mean"], row["std"] = _mean_std(row["seeds"], [*capabilities, "overall"])
    return {"capabilities": capabilities, "seeds": seeds, "rows": rows, "compute": compute, "metric": "greedy accuracy",
            "eval_settings": settings, "closeness": closeness(methods, seeds, out)}


# Runs whose branches' closeness is compared: CoPD's OPD edges against the independent experts' probes.
CLOSENESS_RUNS = {"copd": "CoPD", "experts": "experts (probed)"}
CLOSENESS_KEYS = ("overlap_topk", "sym_kl")


def closeness_of(run_dir: Path) -> dict[str, float] | None:
    """Top-k overlap and symmetric KL between a run's branches at its last measurement, mean over its edges."""
    last: dict[str, dict] = {}
    for r in load_metrics(run_dir / "metrics.jsonl"):
        if r.get("type") == "edge" and all(k in r for k in CLOSENESS_KEYS):
            last[r["edge"]] = r
    if not last:
        return None
    values = {k: statistics.fmean(r[k] for r in last.values()) for k in CLOSENESS_KEYS}
    return {**values, "step": max(r["step"] for r in last.values())}


def closeness(methods: list[str], seeds: list[int], out: Path) -> dict:
    """compare.json's `closeness`: per run of CLOSENESS_RUNS that was trained, per seed and mean ± std."""
    found = {}
    for run in CLOSENESS_RUNS:
        if run not in runs_to_train(methods):
            continue
        per_seed = {str(s): c for s in seeds if (c := closeness_of(run_dir_of(out, run, s))) is not None}
        if per_seed:
            mean, std = _mean_std(per_seed, [*CLOSENESS_KEYS, "step"])
            found[run] = {"label": CLOSENESS_RUNS[run], "seeds": per_seed, "mean": mean, "std": std}
    return found


def closeness_claim(result: dict) -> tuple[str, bool, str] | None:
    """The paper's claim that CoPD's branches stay closer than independent experts: higher overlap, lower sym KL."""
    near = result.get("closeness", {})
    if not all(run in near for run in CLOSENESS_RUNS):
        return None
    copd, experts = near["copd"]["mean"], near["experts"]["mean"]
    held = copd["overlap_topk"] > experts["overlap_topk"] and copd["sym_kl"] < experts["sym_kl"]
    numbers = (f"overlap {copd['overlap_topk']:.3f} vs {experts['overlap_topk']:.3f}, "
               f"sym KL {copd['sym_kl']:.3f} vs {experts['sym_kl']:.3f}")
    return "CoPD's branches end closer than the experts", held, numbers


def _scores(model_eval: dict, capabilities: list[str]) -> dict[str, float]:
    scores = {c: model_eval["greedy"][c] for c in capabilities}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def _mean_std(per_seed: dict, keys: list[str]) -> tuple[dict, dict]:
    values = {k: [s[k] for s in per_seed.values()] for k in keys}
    mean = {k: statistics.fmean(v) for k, v in values.items()}
    std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def orderings(result: dict) -> list[tuple[str, bool, str]]:
    """The paper's orderings (copd.config.methods.ORDERINGS), checked on mean overall accuracy: (claim, held, numbers)."""
    overall = {label: row["mean"]["overall"] for label, row in result["rows"].items()}
    spread = {label: row.get("std", {}).get("overall", 0.0) for label, row in result["rows"].items()}
    groups: dict[str, list[str]] = {}
    for label, row in result["rows"].items():
        group = group_of(label, row)
        if group is not None:
            groups.setdefault(group, []).append(label)
    best = {g: max(labels, key=overall.get) for g, labels in groups.items()}
    found = []
    for high, low in ORDERINGS:
        if high in best and low in best:
            a, b = best[high], best[low]
            numbers = f"{100 * overall[a]:.1f} vs {100 * overall[b]:.1f}"
            if abs(overall[a] - overall[b]) < max(spread[a], spread[b]):
                numbers += f"; the gap is within one std over seeds ({100 * max(spread[a], spread[b]):.1f})"
            found.append((f"{high} > {low}", overall[a] > overall[b], numbers))
    return found


def run_compare(base: Config, methods: list[str], seeds: int, out: Path, reporter: Reporter | None = None, base_dir: Path | None = None) -> Path:
    from copd.reporting.compare_report import write_compare_report

    if seeds < 1:
        raise CopdError("--seeds must be at least 1")
    check_methods(base, methods)
    out.mkdir(parents=True, exist_ok=True)
    seed_list = [base.run.seed + i for i in range(seeds)]
    train_all(base, methods, seed_list, out, reporter or QuietReporter(), base_dir)
    result = collect(base, methods, seed_list, out)
    claims = [*orderings(result), *filter(None, [closeness_claim(result)])]
    result["orderings"] = [{"claim": c, "held": h, "numbers": n} for c, h, n in claims]
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    return write_compare_report(out, result)
