"""The two rollout engines on the real SmolLM2-135M-Instruct, on this CPU: one RL run each, from one command.

    copd models fetch smollm2-135m      # once
    make vllm                           # once: vLLM's own environment (.venv-vllm)
    python benchmarks/engine.py         # about 10 min on 2 cores
    python benchmarks/engine.py --steps 2 --prompts 2 --out /tmp/engines   # a quick look

Each run is `copd train` on examples/smollm2_arith.yaml with one branch (add_sub), RL only
(plan experts), float32, the same seed; only sampling.engine differs (hf: copd's decoder
in the learner; vllm: a vLLM engine in its own process, synced after every update).
Printed: seconds per step of sampling (the branch's step time less its update and sync),
weight sync and update, the engine/learner log-prob gap, each run's reward per step (the
two curves, also plotted into OUT/rewards.png), and the sync of a 4B model on paper at
the rate measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speed import provenance, table

from copd.config.loader import load_config
from copd.driver.pipeline import run_training
from copd.models.fetch import fetch_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2_arith.yaml"
# Qwen3-VL-4B (the paper's model): parameters, and bytes per weight in bf16.
PAPER_PARAMS, PAPER_BYTES = 4.44e9, 2


def run(engine: str, args) -> list[dict]:
    overrides = [f"model.path={fetch_model('smollm2-135m')}", f"run.out={args.out / engine}", f"sampling.engine={engine}",
                 f"sampling.vllm.python={args.python}", "branches=[{name: addsub, capabilities: [add_sub]}]",
                 "schedule.plan=experts", "schedule.cycles=1", f"schedule.rl_steps={args.steps}", "schedule.opd_steps=0",
                 f"rl.prompts_per_step={args.prompts}", "rl.rollouts_per_prompt=8", "sampling.max_new_tokens=24",
                 "eval.samples=8", "optim.step_kl_every=0"]
    run_dir = run_training(load_config(EXAMPLE, overrides))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def phases(records: list[dict]) -> dict[str, float]:
    """Mean seconds per step after the first (engine warm-up): sampling, sync, update."""
    later = records[1:] or records
    mean = lambda key: sum(r.get(key, 0.0) for r in later) / len(later)  # noqa: E731
    update, sync = mean("update_seconds"), mean("sync_seconds")
    return {"sampling": mean("seconds") - update - sync, "sync": sync, "update": update, "step": mean("seconds")}


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for engine, rewards in curves.items():
        ax.plot(range(1, len(rewards) + 1), rewards, marker="o", label=engine)
    ax.set(xlabel="step", ylabel="mean reward", title="RL on SmolLM2-135M: hf vs vllm sampling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/engine_bench"))
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's interpreter")
    args = parser.parse_args()
    results = {engine: run(engine, args) for engine in ("hf", "vllm")}
    print(f"# {provenance()}")
    print(f"# {args.steps} RL steps of {args.prompts} prompts x 8 rollouts x <= 24 tokens, SmolLM2-135M float32\n")
    rows = []
    for engine, records in results.items():
        p = phases(records)
        gap = sum(r.get("engine_logprob_gap", 0.0) for r in records) / len(records)
        rows.append([engine, f"{p['sampling']:.2f}", f"{p['sync']:.2f}", f"{p['update']:.2f}", f"{p['step']:.2f}",
                     f"{gap:.1e}" if engine != "hf" else "-"])
    print(table(["engine", "sampling s", "sync s", "update s", "step s", "log-prob gap"], rows))
    curves = {engine: [r["reward"] for r in records] for engine, records in results.items()}
    print("\nreward per step:")
    for engine, rewards in curves.items():
        print(f"  {engine:5s} " + " ".join(f"{x:.2f}" for x in rewards))
    plot(curves, args.out / "rewards.png")
    print(f"  (plotted: {args.out / 'rewards.png'})")
    synced = [r for r in results["vllm"][1:] or results["vllm"] if "sync_bytes" in r]
    rate = sum(r["sync_bytes"] for r in synced) / sum(r["sync_seconds"] for r in synced)
    paper = PAPER_PARAMS * PAPER_BYTES
    print(f"\nsync: {synced[0]['sync_bytes'] / 1e6:,.0f} MB per step at {rate / 1e6:,.0f} MB/s (write + reload); "
          f"a 4B model in bf16 is {paper / 1e9:.1f} GB: {paper / rate:,.0f} s per sync at this rate")


if __name__ == "__main__":
    sys.exit(main())
