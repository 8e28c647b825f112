"""compare.md and its plots, written from compare.json's numbers and the runs' metrics."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from copd.config.methods import rank_of
from copd.reporting.run_report import load_metrics


def _cell(row: dict, key: str, n_seeds: int) -> str:
    mean = 100 * row["mean"][key]
    return f"{mean:.1f} ± {100 * row['std'][key]:.1f}" if n_seeds > 1 else f"{mean:.1f}"


def score_table(result: dict) -> list[str]:
    caps, n = result["capabilities"], len(result["seeds"])
    lines = ["| method | " + " | ".join(caps) + " | overall | run |", "|---" * (len(caps) + 3) + "|"]
    # Rows in their methods' rank (copd.config.methods), then by label.
    for label in sorted(result["rows"], key=lambda name: (rank_of(result["rows"][name]), name)):
        row = result["rows"][label]
        cells = [_cell(row, c, n) for c in caps] + [_cell(row, "overall", n)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['run']} |")
    return lines


def compute_table(result: dict) -> list[str]:
    per_run: dict[str, list[dict]] = defaultdict(list)
    for key, value in result["compute"].items():
        per_run[key.rsplit("-seed", 1)[0]].append(value)
    lines = ["| run | optimizer updates (per seed) | trained completion tokens (mean per seed) |", "|---|---|---|"]
    for run, values in per_run.items():
        updates = sorted({int(v["updates"]) for v in values})
        tokens = sum(v["tokens"] for v in values) / len(values)
        lines.append(f"| {run} | {', '.join(map(str, updates))} | {tokens:,.0f} |")
    return lines


def closeness_table(result: dict) -> list[str]:
    """How close each run's branches ended (compare.json's `closeness`); empty without it."""
    near = result.get("closeness") or {}
    if not near:
        return []
    lines = ["| branches | step | top-k overlap | symmetric KL |", "|---|---|---|---|"]
    for values in near.values():
        mean, std = values["mean"], values["std"]
        lines.append(f"| {values['label']} | {mean['step']:.0f} | {mean['overlap_topk']:.3f} ± {std['overlap_topk']:.3f} "
                     f"| {mean['sym_kl']:.3f} ± {std['sym_kl']:.3f} |")
    return lines


def _curves(out: Path, run_glob: str, kind: str, key: str, by: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for run_dir in sorted((out / "runs").glob(run_glob)):
        seed = run_dir.name.rsplit("-seed", 1)[1]
        for r in load_metrics(run_dir / "metrics.jsonl"):
            if r.get("type") == kind and key in r:
                series[f"{run_dir.name.rsplit('-seed', 1)[0]} {r[by]} (seed {seed})"].append((r["step"], r[key]))
    return series


def held_out_curves(out: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """eval.every's records of every run: capability -> "RUN BRANCH" -> (step, greedy accuracy, mean over seeds)."""
    values: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run_dir in sorted((out / "runs").glob("*-seed*")):
        run = run_dir.name.rsplit("-seed", 1)[0]
        for r in load_metrics(run_dir / "metrics.jsonl"):
            for key, value in r.items() if r.get("type") == "eval" else ():
                if key.startswith("greedy/"):
                    label = run if r["branch"] == run else f"{run} {r['branch']}"  # mixed RLVR's one branch is `mixed`
                    values[key.removeprefix("greedy/")][label][r["step"]].append(value)
    return {cap: {label: [(step, statistics.fmean(v)) for step, v in sorted(steps.items())] for label, steps in series.items()}
            for cap, series in sorted(values.items())}


def _plot(series: dict, title: str, ylabel: str, path: Path) -> bool:
    if not series:
        return False
    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.add_subplot()
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def write_plots(out: Path) -> list[str]:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    specs = [
        ("overlap", "copd-seed*", "edge", "overlap_topk", "edge", "Top-k overlap per edge: CoPD", "overlap"),
        ("overlap_experts", "experts-seed*", "edge", "overlap_topk", "edge", "Top-k overlap between independent experts (probed)", "overlap"),
        ("sym_kl", "copd-seed*", "edge", "sym_kl", "edge", "Symmetric KL per edge: CoPD", "sym KL"),
        ("sym_kl_experts", "experts-seed*", "edge", "sym_kl", "edge", "Symmetric KL between independent experts (probed)", "sym KL"),
        ("reward", "*-seed*", "branch", "reward", "branch", "Reward per branch, every run", "mean reward"),
    ]
    for name, glob, kind, key, by, title, ylabel in specs:
        if _plot(_curves(out, glob, kind, key, by), title, ylabel, plots / f"{name}.png"):
            made.append(name)
    if _plot_panels(held_out_curves(out), "greedy accuracy, mean over seeds", plots / "heldout.png"):
        made.append("heldout")
    return made


def _plot_panels(panels: dict[str, dict], ylabel: str, path: Path) -> bool:
    """One panel per capability (its test split), the same runs' lines in each, one legend."""
    if not panels:
        return False
    fig = Figure(figsize=(4.2 * len(panels) + 1.8, 3.6), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (cap, series) in zip(axes, panels.items()):
        for label, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.2, marker=".")
        ax.set(title=f"test split: {cap}", xlabel="step")
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return True


def _section(title: str, caption: str, table: list[str]) -> list[str]:
    return [f"## {title}", "", caption, "", *table, ""] if table else []


def _settings_line(settings: dict | None) -> list[str]:
    """The generation settings the runs were scored with; their pass@k and groups are in each run's report.md."""
    if not isinstance(settings, dict):
        return []
    shown = ", ".join(f"{k} {settings[k]}" for k in ("max_new_tokens", "temperature", "top_p", "n") if k in settings)
    return [f"Scored with {shown}; mean@n, pass@k and groups (eval.n, eval.group_by) are in each run's report.md.", ""]


def write_compare_report(out: Path, result: dict) -> Path:
    lines = [
        "# CoPD comparison",
        "",
        f"Greedy accuracy (%) on each capability's test split, mean ± std over seeds {result['seeds']}; "
        "overall = mean over the trained capabilities. Rows marked with the same run come from one training run.",
        "",
        *_settings_line(result.get("eval_settings")),
        *score_table(result),
        "",
        "## Orderings (docs/method.md §9), on mean overall accuracy",
        "",
        *[f"- {'held' if o['held'] else 'did NOT hold'}: {o['claim']} ({o['numbers']})" for o in result["orderings"]],
        "",
        *_section("How close the branches end", "At each run's last measurement, mean over its edges, mean ± std over seeds: "
                  "CoPD's OPD edges (measured before the step's update) and the probes between independent experts "
                  "(after it).", closeness_table(result)),
        "## Compute",
        "",
        "Every trained branch makes cycles x (S_RL + S_OPD) updates; mixed RLVR makes K times as many on its one "
        "policy; static OPD and MOPD add cycles x S_OPD distillation updates per student after the experts. "
        "Tokens are the completion tokens each run trained on (RL rollouts plus OPD rollouts).",
        "",
        *compute_table(result),
        "",
    ]
    made = write_plots(out)
    if "heldout" in made:
        lines += ["Held-out curves (eval.every): a step is one update of every branch of a run, so mixed RLVR, "
                  "with K times the updates on its one policy, runs K times as many steps.", ""]
    for name in made:
        lines += [f"![{name}](plots/{name}.png)", ""]
    path = out / "compare.md"
    path.write_text("\n".join(lines))
    return path
