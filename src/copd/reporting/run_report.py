"""Write RUN/report.md and RUN/plots/*.png from whatever files a run holds; a partial run says what is missing."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from copd.reporting.environment import environment_line

_DASH = "—"


def load_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; blank or broken lines (a crash mid-write) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # e.g. the last line, cut short by a crash
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _load(path: Path) -> Any:
    """Parsed JSON/YAML file, or None when it is absent or unreadable."""
    try:
        return (yaml.safe_load if path.suffix in (".yaml", ".yml") else json.loads)(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _num(x: Any) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _mean(xs: list) -> float | None:
    vals = [v for v in (_num(x) for x in xs) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    v = _num(x)
    return _DASH if v is None else format(scale * v, spec)


def _pct(x: Any) -> str:
    return _fmt(x, ".1f", 100.0)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _get(d: Any, *keys: str, default: Any = "?") -> Any:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _summary(cfg: Any) -> list[str]:
    if not isinstance(cfg, dict):
        return ["_config.yaml missing: run settings unknown._"]
    branches = [b for b in cfg.get("branches") or [] if isinstance(b, dict)]
    names = ", ".join(str(b.get("name", "?")) for b in branches)
    betas = ", ".join(f"{b.get('name', '?')}={b.get('beta', '?')}" for b in branches)
    model = _get(cfg, "model", "path", default=None) or f"tiny ({_get(cfg, 'model', 'tiny', 'architecture')})"
    sched = {k: _get(cfg, "schedule", k) for k in ("plan", "cycles", "rl_steps", "opd_steps")}
    if sched["plan"] == "experts":  # no edges: topology, estimator and beta play no part
        rl, opd = _num(sched["rl_steps"]), _num(sched["opd_steps"])
        per_cycle = f"{rl + opd:g}" if rl is not None and opd is not None else "?"  # experts run S_RL + S_OPD RL steps
        first = (f"Plan `experts`: each branch trains with GRPO alone, no distillation; K={len(branches)} "
                 f"{'branch' if len(branches) == 1 else 'branches'} ({names}), {sched['cycles']} cycles × {per_cycle} RL steps, "
                 f"merge `{_get(cfg, 'merge', 'method')}`.")
    else:
        first = (f"Plan `{sched['plan']}`, K={len(branches)} branches ({names}), topology "
                 f"`{_get(cfg, 'topology', 'kind')}`, {sched['cycles']} cycles × ({sched['rl_steps']} RL + "
                 f"{sched['opd_steps']} OPD steps), OPD estimator `{_get(cfg, 'opd', 'estimator')}`, "
                 f"β: {betas or '?'}, merge `{_get(cfg, 'merge', 'method')}`.")
    return [first, "",
            f"Model: {model}; seed {_get(cfg, 'run', 'seed')}; RL advantage `{_get(cfg, 'rl', 'advantage')}`, "
            f"loss aggregation `{_get(cfg, 'rl', 'loss_aggregation')}`; overlap top-k {_get(cfg, 'opd', 'overlap_k')}."]


def _environment(starts: Any) -> list[str]:
    """Where the numbers were produced: seeded runs repeat exactly only on the same CPU kind and versions."""
    if not isinstance(starts, list) or not starts:
        return []
    lines = [f"Produced on: {environment_line(starts[0])}."]
    lines += [f"Resumed {s.get('started', '?')} on: {environment_line(s)}." for s in starts[1:] if isinstance(s, dict)]
    return lines + [""]


def _eval_layout(models: dict, mode: str) -> tuple[list[str], list[str]]:
    """Model order (base, branches, merged, others) and capability order of first appearance."""
    kinds = {"base": 0, "merged": 2}  # sorted() is stable: ties keep eval.json order
    order = sorted(models, key=lambda n: 1 if n.startswith("branch:") else kinds.get(n, 3))
    caps = dict.fromkeys(c for n in order for c in (_get(models[n], mode, default={}) or {}))
    return order, list(caps)


def _score_table(models: dict, mode: str) -> list[str]:
    order, caps = _eval_layout(models, mode)
    rows = []
    for n in order:
        vals = [(_get(models[n], mode, default={}) or {}).get(c) for c in caps]
        rows.append([n] + [_pct(v) for v in vals] + [_pct(_mean(vals))])
    return _table(["model"] + caps + ["average"], rows)


def merged_vs_base(models: dict, mode: str = "greedy") -> str:
    """Plain sentence saying, per capability, whether merged beats base (differences in points)."""
    base, merged = _get(models, "base", mode, default=None), _get(models, "merged", mode, default=None)
    if not isinstance(base, dict) or not isinstance(merged, dict):
        return f"Merged vs base: cannot compare ({'base' if not isinstance(base, dict) else 'merged'} scores missing)."
    groups: dict[str, list[str]] = {">": [], "=": [], "<": []}
    for cap in base:
        b, m = _num(base.get(cap)), _num(merged.get(cap))
        if b is not None and m is not None:
            d = round(100 * (m - b), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
            groups[">" if d > 0 else "<" if d < 0 else "="].append(f"{cap} ({d:+.1f} pts)")
    lead = {">": "merged > base on ", "=": "merged = base on ", "<": "not on " if groups[">"] else "merged < base on "}
    parts = [lead[k] + ", ".join(v) for k, v in groups.items() if v]
    if not parts:
        return "Merged vs base: no capability scored for both."
    return f"Merged vs base ({mode}): {'; '.join(parts)}."


def _results(ev: Any, plots: set[str]) -> list[str]:
    out = ["## Results", ""]
    models = _get(ev, "models", default=None)
    if not isinstance(models, dict) or not models:
        return out + ["_Evaluation missing: no eval.json (or no models in it); "
                      "the run may have stopped before evaluation._", ""]
    desc = _get(ev, "decoding", "greedy", default="greedy decoding")
    sizes = _get(ev, "test_sizes", default=None)
    counted = ", ".join(f"{k} {v}" for k, v in sizes.items()) if isinstance(sizes, dict) else _get(ev, "samples")
    out += [f"Greedy accuracy (%), {desc}; test prompts per capability: {counted}.", ""]
    sampled = _get(ev, "decoding", "sampled", default="at the rollout temperature")
    out += _score_table(models, "greedy") + ["", f"Sampled mean reward (%), {sampled}.", ""]
    out += _score_table(models, "sampled") + ["", merged_vs_base(models, "greedy"), ""]
    out += _detail_table(models, _get(ev, "settings", "n", default=1)) + _partly_read(_get(ev, "answers_read_in_part", default={}))
    logs = _get(ev, "sample_logs", default=None)
    if isinstance(logs, list) and logs:  # eval.log_samples: every prompt's completions and rewards
        out += ["Per-sample records (prompt, completions, reference answer, rewards): " + ", ".join(f"[{p}]({p})" for p in logs) + ".", ""]
    return out + _images(plots, ("eval", "heldout"))


def _detail_table(models: dict, n: Any) -> list[str]:
    """With eval.n > 1 or eval.group_by: prompts, greedy, mean@n and pass@k per model, capability and group (%)."""
    order, caps = _eval_layout(models, "greedy")
    found = [(m, c, _get(models[m], "scores", c, default={})) for m in order for c in caps]
    if not isinstance(n, int) or not any(isinstance(s, dict) and (n > 1 or s.get("groups")) for _, _, s in found):
        return []
    keys = ["greedy", f"mean@{n}", *(k for k in _get(found[0][2], "all", default={}) if k.startswith("pass@"))]
    rows = [[m, c, group, str(_get(scores, "prompts")), *(_pct(scores.get(k)) for k in keys)]
            for m, c, summary in found if isinstance(summary, dict)
            for group, scores in [("all", summary.get("all", {})), *(summary.get("groups") or {}).items()]]
    lead = f"By group, with mean@{n} and pass@k (unbiased estimator over {n} samples per prompt), in %." if n > 1 else "By group, in %."
    return [lead, "", *_table(["model", "capability", "group", "prompts", *keys], rows), ""]


def _partly_read(partial: Any) -> list[str]:
    """A warning per capability whose verifier read some reference answers only in part (their rewards are unreliable)."""
    return [f"**Warning:** the verifier of {cap} reads {p.get('count')} of {p.get('of')} reference answers only in part "
            f"(e.g. `{p.get('answer')}` is read as `{p.get('read_as')}`); rewards against them are unreliable.\n"
            for cap, p in (partial.items() if isinstance(partial, dict) else [])]


def _by(records: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r.get(key, "?"))].append(r)
    return {k: sorted(v, key=lambda r: _num(r.get("step")) or 0.0) for k, v in sorted(groups.items())}


def _held_out_series(evals: list[dict]) -> dict[str, list[dict]]:
    """eval.every's records as one series per (branch, capability)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in evals:
        for key, value in r.items():
            if key.startswith("greedy/"):
                groups[f"{r.get('branch', '?')} on {key.removeprefix('greedy/')}"].append({"step": r.get("step"), "accuracy": value})
    return dict(sorted(groups.items()))


def _images(plots: set[str], names: tuple[str, ...]) -> list[str]:
    return [line for n in names if n in plots for line in (f"![{n}](plots/{n}.png)", "")]


def _diagnostics(edges: list[dict], plots: set[str], plan: Any) -> list[str]:
    out = ["## Distillation diagnostics", ""]
    if not edges and plan == "experts":
        out += ["_None: plan `experts` trains each branch with GRPO alone, so no branch distils from another._", ""]
    elif not edges:
        out += ["_No edge (OPD) records in metrics.jsonl._", ""]
    else:
        rows = []
        for name, recs in _by(edges, "edge").items():
            ov = [v for v in (_num(r.get("overlap_topk")) for r in recs) if v is not None]
            rows.append([f"`{name}`", str(sum(1 for r in recs if not r.get("probe"))), _fmt(ov[0] if ov else None), _fmt(ov[-1] if ov else None),
                         _fmt(min(ov) if ov else None), _fmt(_mean([r.get("sym_kl") for r in recs])),
                         _fmt(_mean([r.get("delta_mean") for r in recs])), _fmt(_bytes_per_token(recs), ".1f")])
        # Probe records (schedule.trigger: overlap) measure overlap during Phase I without training.
        header = ["edge (student<-teacher)", "OPD steps", "overlap first", "overlap last",
                  "overlap min", "mean sym KL", "mean delta", "score bytes / token"]
        out += _table(header, rows) + ["", "Teachers send the log-prob of every sampled token and, on steps with diagnostics "
                                       "or for estimators that need it, log-probs on the top-k support (opd.topk); the symmetric "
                                       "KL is computed on that support, a lower bound of the full-vocabulary value "
                                       "(docs/method.md §4). Bytes per token count the teacher scores of OPD steps.", ""]
    return out + _images(plots, ("overlap", "sym_kl"))


def _bytes_per_token(records: list[dict]) -> float | None:
    """Teacher-score bytes per completion token over an edge's OPD steps (probes excluded)."""
    trained = [r for r in records if not r.get("probe") and _num(r.get("score_bytes")) is not None]
    tokens = sum(_num(r.get("tokens")) or 0.0 for r in trained)
    return sum(r["score_bytes"] for r in trained) / tokens if tokens else None


def _branch_summary(branches: list[dict], plots: set[str]) -> list[str]:
    out = ["## Branch training", ""]
    if not branches:
        return out + ["_No branch records in metrics.jsonl._", ""]
    rows = []
    for name, recs in _by(branches, "branch").items():
        rewards = [v for v in (_num(r.get("reward")) for r in recs) if v is not None]
        n = max(1, math.ceil(0.1 * len(rewards)))
        tokens = sum(_num(r.get("tokens")) or 0.0 for r in recs)
        rows.append([f"`{name}`", str(len(recs)), _fmt(_mean(rewards[:n])), _fmt(_mean(rewards[-n:])),
                     str(sum(1 for r in recs if r.get("skipped") is True)), f"{tokens:.0f}",
                     _fmt(_mean([r.get("seconds") for r in recs]))])
    header = ["branch", "steps", "reward first 10%", "reward last 10%", "NaN-skipped", "tokens", "s/step"]
    return out + _table(header, rows) + [""] + _images(plots, ("reward", "loss"))


def _warmup_timing(warm: Any, timing: Any) -> list[str]:
    out = []
    if isinstance(warm, dict):
        out += ["## Warm-up", "", f"{_get(warm, 'steps')} steps in {_fmt(warm.get('seconds'), '.1f')} s.", ""]
        hist = [h for h in warm.get("history") or [] if isinstance(h, dict)]
        caps = sorted({c for h in hist for c in (h.get("pass_rate") or {})})
        if hist and caps:
            rows = [[str(h.get("step", "?"))] + [_pct((h.get("pass_rate") or {}).get(c)) for c in caps] for h in hist]
            out += ["Pass rate (%) during warm-up:", ""] + _table(["step"] + caps, rows) + [""]
    if isinstance(timing, dict):
        rows = [[k.removesuffix("_seconds"), _fmt(v, ".1f")] for k, v in timing.items()]
        out += ["## Timing", ""] + _table(["stage", "seconds"], rows) + [""]
    return out


def _consolidate_spans(branches: list[dict]) -> list[tuple[float, float]]:
    phase: dict[float, bool] = {}
    for r in branches:
        if (s := _num(r.get("step"))) is not None:
            phase[s] = phase.get(s, False) or r.get("phase") == "consolidate"
    runs = [list(g) for consolidate, g in groupby(sorted(phase), key=phase.__getitem__) if consolidate]
    return [(r[0] - 0.5, r[-1] + 0.5) for r in runs]


def _smooth(ys: list[float]) -> list[float]:
    w = max(1, len(ys) // 20)
    return [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]


def _axes(width: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, 3.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas set explicitly: no pyplot, no global backend state
    return fig, fig.add_subplot()


def _save(fig: Figure, ax: Any, path: Path) -> bool:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return True


def _line_plot(path: Path, groups: dict[str, list[dict]], key: str, labels: tuple[str, str],
               spans: list[tuple[float, float]], smooth: bool = False) -> bool:
    pairs = {n: [(_num(r.get("step")), _num(r.get(key))) for r in recs] for n, recs in groups.items()}
    series = {n: [(x, y) for x, y in p if x is not None and y is not None] for n, p in pairs.items()}
    series = {n: p for n, p in series.items() if p}
    if not series:
        return False
    fig, ax = _axes(6.0)
    for i, (x0, x1) in enumerate(spans):
        ax.axvspan(x0, x1, color="tab:gray", alpha=0.15, lw=0, label="consolidate" if i == 0 else None)
    for i, (name, pts) in enumerate(series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        color = f"C{i % 10}"
        if smooth and len(ys) > 3:
            ax.plot(xs, ys, color=color, alpha=0.3, lw=0.8)
            ys = _smooth(ys)
        ax.plot(xs, ys, color=color, lw=1.5, label=name, marker="." if len(xs) < 30 else None)
    ax.set(title=labels[0], xlabel="step", ylabel=labels[1])
    return _save(fig, ax, path)


def _eval_plot(path: Path, ev: Any) -> bool:
    models = _get(ev, "models", default=None)
    order, caps = _eval_layout(models, "greedy") if isinstance(models, dict) else ([], [])
    if not caps:
        return False
    fig, ax = _axes(max(5.0, 1.5 * len(caps) + 2))
    width = 0.8 / len(order)
    for i, name in enumerate(order):
        scores = _get(models[name], "greedy", default={}) or {}
        ys = [100 * (_num(scores.get(c)) or 0.0) for c in caps]
        ax.bar([j + (i - (len(order) - 1) / 2) * width for j in range(len(caps))], ys, width, label=name)
    ax.set_xticks(range(len(caps)), caps)
    ax.set(title="Greedy accuracy per capability", xlabel="capability", ylabel="accuracy (%)", ylim=(0, 100))
    return _save(fig, ax, path)


def _write_plots(plot_dir: Path, branches: list[dict], edges: list[dict], ev: Any, evals: list[dict]) -> set[str]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    spans = _consolidate_spans(branches)
    by_branch, by_edge = _by(branches, "branch"), _by(edges, "edge")
    lines = {  # plot name: (records grouped, metric key, (title, y label), smoothed)
        "reward": (by_branch, "reward", ("Reward per branch", "mean reward"), True),
        "loss": (by_branch, "loss", ("Loss per branch", "loss"), True),
        "overlap": (by_edge, "overlap_topk", ("Top-k overlap per edge", "overlap"), False),
        "sym_kl": (by_edge, "sym_kl", ("Symmetric KL per edge", "sym KL"), False),
        "heldout": (_held_out_series(evals), "accuracy", ("Greedy accuracy on the test splits (eval.every)", "accuracy"), False),
    }
    made = {name: _line_plot(plot_dir / f"{name}.png", g, k, lab, spans, sm) for name, (g, k, lab, sm) in lines.items()}
    made["eval"] = _eval_plot(plot_dir / "eval.png", ev)
    for name, ok in made.items():
        if not ok:
            (plot_dir / f"{name}.png").unlink(missing_ok=True)  # no stale plot from an earlier write
    return {name for name, ok in made.items() if ok}


def write_report(run_dir: Path) -> Path:
    """(Re)write run_dir/report.md and run_dir/plots/*.png; returns the report path."""
    run_dir = Path(run_dir)
    cfg, ev = _load(run_dir / "config.yaml"), _load(run_dir / "eval.json")
    warm, timing = _load(run_dir / "warmup.json"), _load(run_dir / "timing.json")
    records = load_metrics(run_dir / "metrics.jsonl")
    branches, edges, evals = ([r for r in records if r.get("type") == kind] for kind in ("branch", "edge", "eval"))
    plots = _write_plots(run_dir / "plots", branches, edges, ev, evals)
    inputs = (("config.yaml", cfg), ("metrics.jsonl", records), ("eval.json", ev))
    missing = [name for name, content in inputs if not content]
    lines = [f"# CoPD run report: {run_dir.name}", ""] + _summary(cfg) + [""] + _environment(_load(run_dir / "environment.json"))
    if missing:
        lines += [f"Missing or empty: {', '.join(missing)}.", ""]
    lines += _results(ev, plots) + _diagnostics(edges, plots, _get(cfg, "schedule", "plan")) + _branch_summary(branches, plots)
    lines += _warmup_timing(warm, timing)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
