"""run.backend local against ray: wall time per cycle, time at the step barriers, driver overhead, bytes per step.

Each case is a short `copd train` (2 cycles, small evaluation) in its own process, from one
cached warm-started base:
  local x2   every branch in one process, torch with 2 threads
  local x1   the same with 1 thread (the reference the ray run matches number for number)
  ray        one actor per branch, 1 torch thread each (resources.cpus_per_branch; fractional
             when K exceeds the cores, so K = 3 fits on 2 cores)
Figures come from the run's timing.json and metrics.jsonl: train seconds / cycles; the
driver's seconds at the barriers (waiting for rollouts, scores and updates); driver
overhead = step seconds - barrier seconds (drawing prompts, verifying, submitting); and
teacher-score bytes per step (what crosses between actors besides the rollouts).

    python benchmarks/backends.py [--cycles 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"demo (K=2, pair)": ROOT / "examples" / "demo.yaml", "three_branches (K=3, hub)": ROOT / "examples" / "three_branches.yaml"}


def run_case(config: Path, branches: int, case: str, out: Path, cache: Path, cycles: int) -> dict:
    overrides = [f"run.out={out}", f"model.cache_dir={cache}", f"schedule.cycles={cycles}", "eval.samples=8"]
    if case == "local x2":
        overrides.append("run.threads=2")
    elif case == "local x1":
        overrides.append("run.threads=1")
    else:
        share = min(1.0, int(200 / branches) / 100)  # rounded down, so that K bundles fit on 2 cores
        overrides += ["run.backend=ray", "run.threads=1", f"resources.cpus_per_branch={share}"]
    cmd = [sys.executable, "-m", "copd.cli", "train", str(config), *overrides, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{case} on {config.name} failed: {done.stderr.strip().splitlines()[-1]}")
    timing = json.loads((out / "timing.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if r.get("type") == "branch"}  # one record per step carries its times
    score_bytes = sum(r.get("score_bytes", 0) for r in rows if r.get("type") == "edge" and not r.get("probe"))
    barrier = sum(r["barrier_seconds"] for r in steps.values())
    step_total = sum(r["step_seconds"] for r in steps.values())
    rollout_bytes = sum(r.get("rollout_bytes", 0) for r in rows if r.get("type") == "branch")
    branch_seconds = {}
    for r in rows:
        if r.get("type") == "branch":
            branch_seconds[r["branch"]] = branch_seconds.get(r["branch"], 0.0) + r["seconds"]
    return {"case": case, "cycle_s": timing["train_seconds"] / cycles, "barrier_s_per_step": barrier / len(steps),
            "driver_s_per_step": (step_total - barrier) / len(steps), "score_kib_per_step": score_bytes / len(steps) / 1024,
            "rollout_kib_per_step": rollout_bytes / len(steps) / 1024,
            "branch_s_per_step": {b: s / len(steps) for b, s in branch_seconds.items()}, "total_s": timing["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=2)
    args = parser.parse_args()
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; {args.cycles} cycles per run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, config in CONFIGS.items():
            branches = 3 if "K=3" in label else 2
            results = [run_case(config, branches, case, tmp / f"{label[:4]}-{case.replace(' ', '')}", tmp / "cache", args.cycles)
                       for case in ("local x2", "local x1", "ray")]
            print(f"\n{label}")
            print("| case | s / cycle | barrier s / step | driver s / step | rollout KiB / step | score KiB / step | branch s / step | vs local x2 |")
            print("|---|---|---|---|---|---|---|---|")
            base = results[0]["cycle_s"]
            for r in results:
                per_branch = ", ".join(f"{b} {s:.3f}" for b, s in r["branch_s_per_step"].items())
                print(f"| {r['case']} | {r['cycle_s']:.2f} | {r['barrier_s_per_step']:.3f} | {r['driver_s_per_step']:.3f} | "
                      f"{r['rollout_kib_per_step']:.1f} | {r['score_kib_per_step']:.1f} | {per_branch} | {base / r['cycle_s']:.2f}x |")
            print(json.dumps(results))


if __name__ == "__main__":
    main()
