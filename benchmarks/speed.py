"""Speed benchmark of copd's HFPolicy: rollout and update throughput, RL vs OPD step time, memory.

    python benchmarks/speed.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/speed.py --quick         # smoke run: small batches, one repeat
    python benchmarks/speed.py --models demo --threads 4

Two models, both built from config (nothing is downloaded, weights are random):
  demo  the tiny Llama of examples/demo.yaml with copd's character tokenizer;
  100m  a ~110M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied
        embeddings). Text goes through the char tokenizer; sampled ids beyond its 99 tokens decode
        to nothing, which is fine since only time is measured.
Everything runs through copd.backends.local.hf.HFPolicy (KV-cache sampling, real AdamW steps). Each model
is measured in its own subprocess (`--single MODEL`, one JSON line back) so that its peak RSS
(ru_maxrss) is its own. One warm-up iteration, then the mean over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import LossSpec, OPDPart, RLPart, SamplingParams, ScoreRequest
from copd.capabilities import load_capability
from copd.config.loader import load_config
from copd.driver.rollout import MixtureSampler, collect_opd_rollouts
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model

DEMO_YAML = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    prompts: int  # P prompts per RL step
    samples: int  # G rollouts per prompt
    new_tokens: int  # M = max_new_tokens
    opd_prompts: int  # teacher-data prompts per OPD step
    opd_samples: int  # student rollouts per teacher prompt
    repeats: int  # timed iterations after one warm-up


# demo full = examples/demo.yaml (rl 16x8, opd 16x2, max_new_tokens 8); 100m kept small for 2 cores.
SIZES = {
    ("demo", False): Sizes(16, 8, 8, 16, 2, 5),
    ("demo", True): Sizes(4, 4, 8, 4, 2, 1),
    ("100m", False): Sizes(4, 4, 32, 4, 2, 2),
    ("100m", True): Sizes(2, 2, 8, 2, 2, 1),
}


def build_model(name: str, config):
    """(model, tokenizer) built from config with copd's own builders."""
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    if name == "demo":
        return build_tiny_model(config.model.tiny, tokenizer, seed=config.run.seed), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.run.seed)
    llama = LlamaConfig(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=2048, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(llama), tokenizer


def samplers(config) -> tuple[MixtureSampler, MixtureSampler]:
    """Prompt samplers of the demo's first two branches: the student's RL data, the teacher's data (edge a<-b)."""
    caps = {c.name: load_capability({"name": c.name, "builtin": c.builtin, **c.options}) for c in config.capabilities}
    student, teacher = config.branches[0], config.branches[1]
    return (MixtureSampler([caps[c] for c in student.capabilities], seed=1),
            MixtureSampler([caps[c] for c in teacher.capabilities], seed=2))


def random_part(rollouts, seed: int) -> RLPart:
    """An RLPart whose per-sequence advantages are random (rewards do not matter for timing)."""
    gen = torch.Generator().manual_seed(seed)
    adv_B = torch.randn(rollouts.completion_mask_B_T.shape[0], 1, generator=gen)
    return RLPart(rollouts, adv_B * rollouts.completion_mask_B_T)


def rl_step(student, rl_sampler, s: Sizes, params, seed: int) -> dict[str, float]:
    """generate + update with one RL part; phases timed inside the step."""
    t0 = time.perf_counter()
    rollouts = student.generate([x.prompt for _, x in rl_sampler.draw(s.prompts)], s.samples, params, seed)
    t1 = time.perf_counter()
    student.update([random_part(rollouts, seed)], [], LossSpec(step_kl=False))
    t2 = time.perf_counter()
    return {"tokens": rollouts.num_tokens, "gen": t1 - t0, "update": t2 - t1, "step": t2 - t0}


def opd_step(student, teacher, rl_sampler, opd_sampler, s: Sizes, params, seed: int) -> dict[str, float]:
    """RL rollouts + OPD rollouts (student on teacher prompts) + teacher.score + one joint update."""
    t0 = time.perf_counter()
    rollouts = student.generate([x.prompt for _, x in rl_sampler.draw(s.prompts)], s.samples, params, seed)
    t1 = time.perf_counter()
    # As the driver does on a diagnostics step (collect_opd_part): the teacher sends its top-16 support too.
    opd_rollouts = collect_opd_rollouts(student, opd_sampler, s.opd_prompts, s.opd_samples, params.recording(16), seed + 1)
    t2 = time.perf_counter()
    opd = OPDPart(opd_rollouts, teacher.score(opd_rollouts, ScoreRequest.support(16)), 0.1, "a<-b")
    t3 = time.perf_counter()
    student.update([random_part(rollouts, seed)], [opd], LossSpec(step_kl=False))
    t4 = time.perf_counter()
    return {"gen_rl": t1 - t0, "gen_opd": t2 - t1, "score": t3 - t2, "update": t4 - t3, "step": t4 - t0}


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def state_bytes(policy: HFPolicy) -> int:
    """Parameters (tied weights counted once) plus AdamW state tensors."""
    params = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    state = policy.optimizer.state.values()
    return params + sum(t.numel() * t.element_size() for st in state for t in st.values() if torch.is_tensor(t))


def measure(name: str, quick: bool) -> dict:
    """All measurements of one model (run inside its own process)."""
    started = time.perf_counter()
    config = load_config(DEMO_YAML)
    s = SIZES[(name, quick)]
    model, tokenizer = build_model(name, config)
    student = HFPolicy("a", model, tokenizer, lr=config.optim.lr)
    teacher = HFPolicy("b", copy.deepcopy(model), tokenizer, lr=config.optim.lr)
    rl_sampler, opd_sampler = samplers(config)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=s.new_tokens)
    rl_step(student, rl_sampler, s, params, seed=0)  # warm-up
    rl = mean_of([rl_step(student, rl_sampler, s, params, seed=1 + i) for i in range(s.repeats)])
    opd_step(student, teacher, rl_sampler, opd_sampler, s, params, seed=100)  # warm-up
    opd = mean_of([opd_step(student, teacher, rl_sampler, opd_sampler, s, params, seed=101 + i) for i in range(s.repeats)])
    return {
        "model": name, "sizes": asdict(s), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "rl": rl, "opd": opd,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "state_mib": state_bytes(student) / MIB,
        "seconds": time.perf_counter() - started,
    }


def run_child(name: str, args) -> dict:
    """Re-invoke this script with --single so the model's peak RSS is measured alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", name]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def provenance() -> str:
    """CPU model and torch kernel level, versions, and the measured bf16 / fp32 matmul ratio: what a figure depends on."""
    from copd.backends.local.precision import bf16_speedup
    from copd.reporting.environment import describe_environment, environment_line

    return f"{environment_line(describe_environment())}; bf16 matmul {bf16_speedup('cpu'):.3g}x fp32"


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(r) for r in rows])


def main_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        s, rl, opd = r["sizes"], r["rl"], r["opd"]
        rows.append([
            r["model"], f"{r['params'] / 1e6:.2f}M", f"{s['prompts']}x{s['samples']}, M={s['new_tokens']}",
            fmt(rl["tokens"] / rl["gen"]), fmt(rl["tokens"] / rl["update"]),
            f"{rl['step']:.3f}", f"{opd['step']:.3f}", f"{opd['step'] / rl['step']:.2f}x",
            f"{r['peak_rss_mib']:,.0f}", f"{r['state_mib']:,.1f}",
        ])
    return rows


def breakdown_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        s, o = r["sizes"], r["opd"]
        rows.append([r["model"], f"{s['opd_prompts']}x{s['opd_samples']}", f"{o['gen_rl']:.3f}",
                     f"{o['gen_opd']:.3f}", f"{o['score']:.3f}", f"{o['update']:.3f}", f"{r['seconds']:.0f}"])
    return rows


def report(results: list[dict], args) -> None:
    threads = results[0]["threads"] if results else torch.get_num_threads()
    mode = "quick" if args.quick else "full"
    print(f"copd speed benchmark ({mode}): {provenance()} ({os.cpu_count()} cores, load {args.load_at_start:.1f} "
          "at start)\n")
    if args.load_at_start >= (os.cpu_count() or 1) and threads > 1:
        print("WARNING: the machine was busy; multi-threaded timings degrade badly, compare with --threads 1\n")
    print(table(["model", "params", "rollouts PxG", "rollout tok/s", "update tok/s", "RL step s",
                 "OPD step s", "OPD/RL", "peak RSS MiB", "params+AdamW MiB"], main_rows(results)))
    print("\nOPD step breakdown (seconds; student generates, teacher scores, one joint update):\n")
    print(table(["model", "OPD rollouts", "gen RL", "gen OPD", "teacher score", "update RL+OPD", "model total s"],
                breakdown_rows(results)))
    print("\nMeans over the repeats after one warm-up (demo 5, 100m 2; quick 1), float32, temperature 1.0.")
    print("tok/s counts generated completion tokens. RL step = generate + update(RL part, random advantages);")
    print("OPD step = RL rollouts + OPD rollouts + teacher.score (sampled tokens and the top-16 support) + update(RL part + OPDPart, beta 0.1).")
    print("Peak RSS is per model (own process) and includes the teacher copy; params+AdamW is the student's.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, one repeat (smoke run)")
    parser.add_argument("--models", default="demo,100m", help="comma-separated: demo, 100m")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--single", choices=["demo", "100m"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in ("demo", "100m")]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from demo, 100m")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(measure(args.single, args.quick)))
        return
    args.load_at_start = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    report([run_child(name, args) for name in args.models.split(",")], args)


if __name__ == "__main__":
    main()
