"""Pilot study of docs/method.md §7: does post-OPD gain follow teacher-student top-k overlap?

    python benchmarks/pilot_overlap.py RUN [RUN ...] [--out pilot.json]
    python benchmarks/pilot_overlap.py /tmp/pilot_run --quick      # smoke run: 4 pairs, 5 steps

Checkpoints: RUN/base, RUN/branches/*, RUN/final, RUN/merged-* of every run (identical weights
are kept once; a tokenizer differing from the first checkpoint's is skipped). Each is evaluated
greedily on every capability of the first run's config. For an ordered pair (student S, teacher T)
the target capability is the one where T's greedy accuracy most exceeds S's (pairs where T is
better nowhere are dropped). Per pair: top-k overlap and symmetric KL of T on S's rollouts of that
capability (copd.evaluation.diagnose.diagnose_models), then a copy of S runs --steps OPD-only updates from T
on that capability's prompts (the run's beta of its first branch, estimator, batch sizes, lr);
gain = greedy accuracy after - before. Reports Pearson and Spearman correlation of overlap vs gain.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import SamplingParams
from copd.config.loader import load_config
from copd.driver.pipeline import load_capabilities
from copd.driver.rollout import MixtureSampler, collect_opd_part, derived_seed
from copd.driver.trainer import loss_spec
from copd.evaluation.diagnose import diagnose_models
from copd.evaluation.evaluate import evaluate_policy
from copd.models.sources import load_pretrained

QUICK = {"steps": 5, "samples": 16, "eval_samples": 64, "max_pairs": 4}


def candidate_folders(run: Path) -> list[Path]:
    """base, branches/*, final, merged-* of one run directory (only transformers folders)."""
    found = [run / "base", *sorted((run / "branches").glob("*")), run / "final", *sorted(run.glob("merged-*"))]
    return [f for f in found if (f / "config.json").is_file()]


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_checkpoints(runs: list[Path], config) -> dict[str, HFPolicy]:
    """Label -> policy; duplicates (same weights) and foreign tokenizers are skipped with a note."""
    policies: dict[str, HFPolicy] = {}
    seen: dict[str, str] = {}
    vocab = None
    for run in runs:
        for folder in candidate_folders(run):
            label = f"{run.name}/{folder.relative_to(run)}"
            label = f"{run}/{folder.relative_to(run)}" if label in policies else label
            digest = weights_digest(folder)
            if digest in seen:
                print(f"skip {label}: same weights as {seen[digest]}")
                continue
            model, tokenizer = load_pretrained(folder)
            if vocab is None:
                vocab = tokenizer.get_vocab()
            elif tokenizer.get_vocab() != vocab:
                print(f"skip {label}: its tokenizer differs from the first checkpoint's")
                continue
            seen[digest] = label
            policies[label] = HFPolicy(label, model, tokenizer, config.optim.lr, config.optim.weight_decay)
    return policies


def evaluate_all(policies: dict[str, HFPolicy], caps: list, n: int, params: SamplingParams) -> dict[str, dict]:
    """Greedy accuracy per checkpoint per capability on the first n test prompts."""
    acc = {}
    for label, policy in policies.items():
        acc[label] = evaluate_policy(policy, caps, n, params)["greedy"]
        print(f"eval {label}: " + ", ".join(f"{c} {a:.1%}" for c, a in acc[label].items()))
    return acc


def choose_pairs(acc: dict[str, dict], max_pairs: int, min_gap: float) -> list[tuple[str, str, str]]:
    """(student, teacher, capability) where the teacher beats the student most; strided to max_pairs."""
    eligible = []
    for s in sorted(acc):
        for t in sorted(acc):
            if s == t:
                continue
            cap = max(sorted(acc[t]), key=lambda c: acc[t][c] - acc[s][c])
            if acc[t][cap] - acc[s][cap] > min_gap:
                eligible.append((s, t, cap))
    if len(eligible) <= max_pairs:
        return eligible
    stride = len(eligible) / max_pairs
    return [eligible[int(i * stride)] for i in range(max_pairs)]


def opd_gain(student: HFPolicy, teacher: HFPolicy, cap, config, args, params: SamplingParams) -> dict:
    """A copy of the student distils from the teacher on `cap` only; greedy accuracy after, and stats."""
    s = HFPolicy("S", copy.deepcopy(student.model), student.tokenizer, config.optim.lr, config.optim.weight_decay)
    sampler = MixtureSampler([cap], derived_seed(args.seed, "pilot", cap.name))
    spec, beta = loss_spec(config), config.branches[0].beta
    skipped, adv = 0, []
    for step in range(args.steps):
        support = spec.opd_estimator != "sampled" or config.opd.diagnostics_every > 0
        part = collect_opd_part(s, teacher, sampler, config.opd.prompts_per_step, config.opd.rollouts_per_prompt, params,
                                derived_seed(args.seed, "pilot-step", step), beta, "S<-T", support, config.opd.topk)
        result = s.update([], [part], spec)
        skipped += int(result.skipped)
        adv.extend(v["opd_adv_mean"] for v in result.edge_metrics.values() if "opd_adv_mean" in v)
    after = evaluate_policy(s, [cap], args.eval_samples, params)["greedy"][cap.name]
    return {"acc_after": after, "skipped_updates": skipped, "opd_adv_mean": sum(adv) / len(adv) if adv else None}


def run_pair(pair, policies, caps, acc, config, args, params) -> dict:
    s, t, cap_name = pair
    cap = caps[cap_name]
    start = time.perf_counter()
    diag = diagnose_models(policies[s], policies[t], [cap], args.samples, params, config.opd.overlap_k, args.seed)
    row = {"student": s, "teacher": t, "capability": cap_name, "overlap": diag["overall"]["overlap"],
           "sym_kl": diag["overall"]["sym_kl"], "acc_before": acc[s][cap_name], "teacher_acc": acc[t][cap_name]}
    row.update(opd_gain(policies[s], policies[t], cap, config, args, params))
    row["gain"] = row["acc_after"] - row["acc_before"]
    row["seconds"] = time.perf_counter() - start
    return row


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties get their average rank (for Spearman's rho)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def correlations(rows: list[dict]) -> dict:
    """Pearson and Spearman of overlap vs gain; None with fewer than 3 pairs or a constant input."""
    x, y = [r["overlap"] for r in rows], [r["gain"] for r in rows]
    out = {"pearson": None, "spearman": None, "n": len(rows)}
    if len(rows) < 3:
        return out
    for name, (a, b) in {"pearson": (x, y), "spearman": (ranks(x), ranks(y))}.items():
        with contextlib.suppress(statistics.StatisticsError):
            out[name] = statistics.correlation(a, b)
    return out


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def print_table(rows: list[dict], corr: dict, k: int) -> None:
    print(f"\n| student | teacher | capability | top-{k} overlap | sym KL | acc before | acc after | gain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['student']}` | `{r['teacher']}` | {r['capability']} | {r['overlap']:.3f} | {r['sym_kl']:.3f} "
              f"| {r['acc_before']:.1%} | {r['acc_after']:.1%} | {r['gain'] * 100:+.1f} |")
    print(f"\noverlap vs gain over {corr['n']} pairs: Pearson r = {fmt(corr['pearson'])}, "
          f"Spearman rho = {fmt(corr['spearman'])} (paper: r = 0.89)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="copd run directories (config.yaml, base, branches, final)")
    p.add_argument("--max-pairs", type=int, help="at most this many (student, teacher) pairs (default 12; quick 4)")
    p.add_argument("--samples", type=int, help="test prompts for the overlap diagnosis (default 64; quick 16)")
    p.add_argument("--steps", type=int, help="OPD-only updates per pair (default 20; quick 5)")
    p.add_argument("--eval-samples", type=int, help="test prompts per greedy accuracy (default: config eval.samples; quick 64)")
    p.add_argument("--min-gap", type=float, default=0.0, help="teacher must beat the student by more than this (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and prompt order (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--out", help="write settings, accuracies, pairs and correlations as JSON here")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"steps": 20, "samples": 64, "eval_samples": None, "max_pairs": 12}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    runs = [Path(r).expanduser() for r in args.runs]
    config_path = runs[0] / "config.yaml"
    config = load_config(config_path)
    caps = load_capabilities(config, base_dir=config_path.resolve().parent)
    args.eval_samples = args.eval_samples or config.eval.samples
    params = SamplingParams.from_config(config.sampling)
    policies = load_checkpoints(runs, config)
    acc = evaluate_all(policies, list(caps.values()), args.eval_samples, params)
    pairs = choose_pairs(acc, args.max_pairs, args.min_gap)
    print(f"{len(policies)} checkpoints, {len(pairs)} pairs; {args.steps} OPD steps each, "
          f"beta {config.branches[0].beta}, estimator {config.opd.estimator}")
    rows = []
    for i, pair in enumerate(pairs, 1):
        rows.append(run_pair(pair, policies, caps, acc, config, args, params))
        r = rows[-1]
        print(f"[{i}/{len(pairs)}] {r['student']} <- {r['teacher']} on {r['capability']}: overlap {r['overlap']:.3f}, "
              f"gain {r['gain'] * 100:+.1f} pts ({r['seconds']:.1f} s)", flush=True)
    corr = correlations(rows)
    print_table(rows, corr, config.opd.overlap_k)
    seconds = time.perf_counter() - start
    print(f"wall time {seconds:.0f} s")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "runs"}
        result = {"runs": [str(r) for r in runs], "settings": settings, "accuracy": acc, "pairs": rows, **corr, "seconds": seconds}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
