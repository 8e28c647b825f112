"""What crosses the teacher -> student seam in one OPD step, and the step's peak memory, on SmolLM2-135M.

One OPD step: the student samples on the teacher's prompts, the teacher scores the
rollouts, the student makes one update. Cases, each in its own process:
  sampled            the paper's estimator, no diagnostics: the teacher sends B x T log-probs
  sampled+diag       the same on a diagnostics step: plus log-probs on the top-16 support
  exact_kl           reverse KL on the top-16 support (needs the support every step)
  before             optional (--before SRC): the same step with the copd source tree at SRC,
                     e.g. a checkout of the commit before sparse scores, which shipped [B, T, V]

Peak memory is the largest resident set size seen during the measured step (sampled every
2 ms) minus the resident size just before it; a first step runs untimed so that AdamW's
state is allocated before measuring. Needs `copd models fetch smollm2-135m`.

    python benchmarks/seam.py [--before /path/to/old/src] [--prompts 8] [--samples 4] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MODEL = Path("~/.cache/copd/models/smollm2-135m").expanduser()
CASES = {"sampled": ("sampled", False), "sampled+diag": ("sampled", True), "exact_kl": ("exact_kl", True)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS seen while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def opd_step_current(student, teacher, sampler, args, seed: int, estimator: str, support: bool) -> tuple[int, int]:
    """(bytes of teacher scores, completion tokens) of one OPD step with this tree's copd."""
    from copd.backends.roles import LossSpec, SamplingParams
    from copd.driver.rollout import collect_opd_part

    params = SamplingParams(max_new_tokens=args.new_tokens)
    part = collect_opd_part(student, teacher, sampler, args.prompts, args.samples, params, seed, 0.1, "s<-t", support, 16)
    student.update([], [part], LossSpec(opd_estimator=estimator))
    return part.teacher.nbytes, part.rollouts.num_tokens


def opd_step_before(student, teacher, sampler, args, seed: int) -> tuple[int, int]:
    """The same step with the earlier API: score(..., full=True) shipped [B, T, V] log-probs."""
    from copd.policy.base import LossSpec, OPDPart, SamplingParams
    from copd.rollout import collect_opd_rollouts

    rollouts = collect_opd_rollouts(student, sampler, args.prompts, args.samples, SamplingParams(max_new_tokens=args.new_tokens), seed)
    scores = teacher.score(rollouts, full=True)
    student.update([], [OPDPart(rollouts, scores, 0.1, "s<-t")], LossSpec())
    sent = [scores.token_logprobs_B_T, scores.dist_logprobs_B_T_V]
    return sum(t.numel() * t.element_size() for t in sent), rollouts.num_tokens


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    before = args.case == "before"
    if before:
        sys.path.insert(0, args.before)
    if before:
        from copd.models import load_pretrained
        from copd.policy.hf import HFPolicy
        from copd.rollout import MixtureSampler
        from copd.tasks import load_capability
    else:
        from copd.backends.local.hf import HFPolicy
        from copd.capabilities import load_capability
        from copd.driver.rollout import MixtureSampler
        from copd.models.sources import load_pretrained
    model, tokenizer = load_pretrained(MODEL, "float32")
    teacher_model, _ = load_pretrained(MODEL, "float32")
    student, teacher = HFPolicy("s", model, tokenizer, lr=1e-6), HFPolicy("t", teacher_model, tokenizer)
    sampler = MixtureSampler([load_capability({"name": "addition", "builtin": "addition"})], 0)
    if before:
        step = lambda seed: opd_step_before(student, teacher, sampler, args, seed)  # noqa: E731
    else:
        estimator, support = CASES[args.case]
        step = lambda seed: opd_step_current(student, teacher, sampler, args, seed, estimator, support)  # noqa: E731
    step(0)  # allocations and AdamW state
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        sent, tokens = step(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    return {"case": args.case, "score_bytes": sent, "tokens": tokens, "bytes_per_token": sent / tokens, "vocab": vocab,
            "step_peak_mib": (peak.peak - peak.start) / 2**20, "peak_rss_mib": peak.peak / 2**20,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="copd source tree (its src/ folder) of the earlier full-vocabulary seam")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args)))
        return
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {args.threads} threads; "
          f"{args.prompts} prompts x {args.samples} rollouts x up to {args.new_tokens} tokens")
    cases = (["before"] if args.before else []) + list(CASES)
    results = []
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--prompts", str(args.prompts), "--samples", str(args.samples),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)] + (["--before", args.before] if args.before else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    base = results[0]["bytes_per_token"]
    print(f"{'case':<14}{'bytes/token':>13}{'vs first':>10}{'step peak MiB':>15}{'peak RSS MiB':>14}{'s':>7}")
    for r in results:
        print(f"{r['case']:<14}{r['bytes_per_token']:>13,.1f}{base / r['bytes_per_token']:>9,.0f}x{r['step_peak_mib']:>15,.0f}"
              f"{r['peak_rss_mib']:>14,.0f}{r['seconds']:>7.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
