"""CoPD on the real SmolLM2-135M-Instruct, on this CPU: copd against TRL, and K branches full vs LoRA.

    copd models fetch smollm2-135m                  # once: the model folder this script uses
    python benchmarks/smollm2.py                    # both parts (about 15 min on 2 cores)
    python benchmarks/smollm2.py --part anchor      # copd vs TRL GRPOTrainer only
    python benchmarks/smollm2.py --part branches    # K = 1, 2, 3 branches, full and LoRA

anchor    One GRPO step at 1 prompt x 8 rollouts x 32 new tokens (word problems, numeric reward):
          copd full fine-tuning in fp32 and with bf16 autocast, copd LoRA, and TRL's GRPOTrainer
          (fp32, its defaults otherwise; needs `pip install trl`). One warm-up step, then the
          mean of --steps steps.
branches  The branches of a run built by copd.backends.local.branches.build_branches (what `copd train` uses),
          fp32 weights. One round = every branch's RL step (2 prompts x 4 rollouts x 32 tokens)
          and every edge's OPD step (the student samples 2 prompts x 2 on the teacher's data,
          the teacher scores, the student updates). Timed on the second round. Peak RSS is
          the process's own (every case runs in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from speed import provenance, table
from trl_grpo import measure_trl

from copd.backends.local.branches import build_branches
from copd.backends.roles import LossSpec, SamplingParams
from copd.capabilities import load_capability
from copd.config.loader import validate_config
from copd.driver.rollout import MixtureSampler, collect_opd_part, finish_rl, start_rl
from copd.models.sources import load_pretrained
from copd.schedule.topology import build_edges

ANCHOR_VARIANTS = {
    # name: (lora, weights dtype, compute dtype)
    "copd full fp32": (False, "float32", "float32"),
    "copd full bf16 autocast": (False, "float32", "bfloat16"),
    "copd LoRA fp32": (True, "float32", "float32"),
    "copd LoRA bf16 base": (True, "bfloat16", "bfloat16"),
}
CAPABILITIES = [
    {"name": "arith", "builtin": "word_problems", "options": {"max_value": 50}},
    {"name": "units", "builtin": "unit_conversion"},
]


def run_config(k: int, lora: bool, dtype: str, compute: str):
    """A copd config with K branches over the two capabilities (pair for K <= 2, mesh beyond)."""
    caps = [CAPABILITIES[i % 2]["name"] for i in range(k)]
    return validate_config({
        "model": {"path": "unused", "dtype": dtype, "compute_dtype": compute, "chat_template": "auto"},
        "lora": {"enabled": lora, "r": 16, "alpha": 32},
        "capabilities": CAPABILITIES,
        "branches": [{"name": f"b{i}", "capabilities": [caps[i]]} for i in range(k)],
        "topology": {"kind": "pair" if k == 2 else "mesh"},
        "optim": {"lr": 1e-5},
    })


def sampler(name: str, seed: int) -> MixtureSampler:
    spec = next(c for c in CAPABILITIES if c["name"] == name)
    return MixtureSampler([load_capability({"name": name, "builtin": spec["builtin"], **spec.get("options", {})})], seed)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def anchor_copd(model_dir: str, variant: str, steps: int, new_tokens: int) -> dict:
    lora, dtype, compute = ANCHOR_VARIANTS[variant]
    config = run_config(2, lora, dtype, compute)
    model, tokenizer = load_pretrained(model_dir, dtype)
    policy = build_branches(config, model, tokenizer, "cpu")[0]["b0"]
    data, params, times = sampler("arith", 0), SamplingParams(max_new_tokens=new_tokens), []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch = finish_rl(start_rl(policy, data, 1, 8, params, seed=step), 8)
        t1 = time.perf_counter()
        # As `copd train` runs most steps: approx_kl is measured on one step in optim.step_kl_every (10).
        policy.update([batch.part], [], LossSpec(step_kl=False)) if batch.part else None
        times.append((t1 - t0, time.perf_counter() - t1, batch.part.rollouts.num_tokens if batch.part else 0))
    timed = times[1:]
    gen, upd = (sum(t[i] for t in timed) / len(timed) for i in (0, 1))
    return {"library": variant, "step": gen + upd, "generate": gen, "update": upd, "steps": len(timed),
            "rollout_tok_s": sum(t[2] for t in timed) / sum(t[0] for t in timed), "peak_rss_mib": peak_rss_mib()}


def anchor_trl(model_dir: str, steps: int, new_tokens: int, checkpointing: bool) -> dict:
    data = sampler("arith", 0).draw(steps + 1)
    result = measure_trl(model_dir, [(s.prompt, s.answer) for _, s in data], new_tokens, steps, checkpointing)
    return {**result, "peak_rss_mib": peak_rss_mib()}


def branch_round(policies, config, samplers, params, seed: int) -> dict:
    """Every branch's RL step, then every edge's OPD step; seconds and generated tokens of each."""
    rl_times, opd_times, tokens, gen_seconds = [], [], 0, 0.0
    for name, policy in policies.items():
        t0 = time.perf_counter()
        batch = finish_rl(start_rl(policy, samplers[name], 2, 4, params, seed), 4)
        t1 = time.perf_counter()
        policy.update([batch.part], [], LossSpec(step_kl=False)) if batch.part else None
        rl_times.append(time.perf_counter() - t0)
        tokens, gen_seconds = tokens + (batch.part.rollouts.num_tokens if batch.part else 0), gen_seconds + t1 - t0
    for edge in build_edges(config.topology.kind, [b.name for b in config.branches]):
        t0 = time.perf_counter()
        part = collect_opd_part(policies[edge.student], policies[edge.teacher], samplers[edge.teacher], 2, 2, params, seed + 1,
                                0.1, edge.label, support=True, topk=16)
        policies[edge.student].update([], [part], LossSpec(step_kl=False))
        opd_times.append(time.perf_counter() - t0)
    return {"rl": sum(rl_times) / len(rl_times), "opd": sum(opd_times) / max(len(opd_times), 1),
            "edges": len(opd_times), "rollout_tok_s": tokens / gen_seconds}


def branches_case(model_dir: str, k: int, lora: bool, new_tokens: int) -> dict:
    config = run_config(k, lora, "float32", "float32")
    model, tokenizer = load_pretrained(model_dir, "float32")
    policies = build_branches(config, model, tokenizer, "cpu")[0]
    samplers = {b.name: sampler(b.capabilities[0], i) for i, b in enumerate(config.branches)}
    params = SamplingParams(max_new_tokens=new_tokens)
    branch_round(policies, config, samplers, params, seed=0)  # warm-up: allocations, optimizer state
    result = branch_round(policies, config, samplers, params, seed=1)
    return {"k": k, "mode": "LoRA r=16" if lora else "full", **result, "peak_rss_mib": peak_rss_mib()}


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    case = json.loads(args.single)
    if case["part"] == "trl":
        return anchor_trl(args.model, args.steps, args.new_tokens, case["checkpointing"])
    if case["part"] == "anchor":
        return anchor_copd(args.model, case["variant"], args.steps, args.new_tokens)
    return branches_case(args.model, case["k"], case["lora"], args.new_tokens)


def run_child(case: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(case), "--model", args.model,
           "--threads", str(args.threads), "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def anchor_part(args) -> str:
    results = [run_child({"part": "anchor", "variant": v}, args) for v in ANCHOR_VARIANTS]
    try:
        import trl  # noqa: F401
        results += [run_child({"part": "trl", "checkpointing": gc}, args) for gc in (True, False)]
    except ImportError:
        print("trl is not installed: pip install trl (the TRL row is skipped)", file=sys.stderr)
    trl_step = next((r["step"] for r in results if r["library"].startswith("trl")), None)  # TRL as users get it
    rows = [[r["library"], f"{r['step']:.2f}", f"{r['generate']:.2f}" if "generate" in r else "-",
             f"{r['update']:.2f}" if "update" in r else "-", f"{r['peak_rss_mib']:,.0f}",
             f"{trl_step / r['step']:.2f}x" if trl_step else "-"] for r in results]
    header = ["", "s / step", "generate s", "update s", "peak RSS MiB", "TRL / this"]
    return f"GRPO step, 1 prompt x 8 rollouts x {args.new_tokens} new tokens, mean of {args.steps} steps\n" + table(header, rows)


def branches_part(args) -> str:
    cases = [(k, lora) for lora in (False, True) for k in (1, 2, 3)]
    results = [run_child({"part": "branches", "k": k, "lora": lora}, args) for k, lora in cases]
    one_full = next(r["peak_rss_mib"] for r in results if r["k"] == 1 and r["mode"] == "full")
    rows = [[r["mode"], str(r["k"]), f"{r['rollout_tok_s']:.0f}", f"{r['rl']:.2f}", f"{r['opd']:.2f}" if r["edges"] else "-",
             str(r["edges"]), f"{r['peak_rss_mib']:,.0f}", f"{r['peak_rss_mib'] / one_full:.2f}x"] for r in results]
    header = ["branches", "K", "rollout tok/s", "RL step s", "OPD step s", "edges", "peak RSS MiB", "vs one full branch"]
    return "K branches (RL: 2 prompts x 4 rollouts; OPD: 2 x 2; fp32 weights)\n" + table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "anchor", "branches"], default="all")
    parser.add_argument("--model", default=str(Path("~/.cache/copd/models/smollm2-135m").expanduser()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed anchor steps after one warm-up step")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(child(args)))
        return
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}; run `copd models fetch smollm2-135m` first")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    print(f"SmolLM2-135M-Instruct; {provenance()}\n")
    for part, fn in (("anchor", anchor_part), ("branches", branches_part)):
        if args.part in ("all", part):
            print(fn(args) + "\n", flush=True)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
