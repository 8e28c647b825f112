"""Which operation each model of a comparison answers with, on the `comparisons` capabilities.

    python benchmarks/comparison_operations.py runs/conflict        # a `copd compare --out` folder
    python benchmarks/comparison_operations.py RUN_DIR [RUN_DIR ...]

"X has b more items than Y" needs a + b and "b fewer" needs a - b. A policy trained on one
relation alone learns one operation and then applies it to the other relation too: that is the
conflict examples/smollm2_conflict.yaml is built on. This script scores every model of each run
(base, branches, merged) greedily on each `comparisons` capability's test split, as the run's
evaluation does, and sorts each answer's last number into: the sum, the difference, or neither
(an arithmetic slip or no number). It prints one table and writes operations.json in the folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from copd.backends.local.factory import make_policy
from copd.backends.roles import Prompt, SamplingParams
from copd.capabilities import Capability, Sample, load_capability
from copd.config.loader import load_config
from copd.evaluation.commands import models_of
from copd.models.sources import load_pretrained

NUMBER = re.compile(r"-?\d+")


def operands(sample: Sample) -> tuple[int, int]:
    """(a, b) of a comparisons prompt: the first quantity and the difference."""
    a, b = (int(w) for w in sample.prompt.replace(".", " ").split() if w.isdigit())
    return a, b


def operation_of(completion: str, sample: Sample) -> str:
    """What the completion's last number is: the sum, the difference, or neither."""
    numbers = NUMBER.findall(completion)
    got = int(numbers[-1]) if numbers else None
    a, b = operands(sample)
    return "sum" if got == a + b else "difference" if got == a - b else "neither"


def tally(policy, capability: Capability, n: int, params: SamplingParams) -> dict[str, int]:
    tests = capability.test_set(n)
    rollouts = policy.generate([Prompt.of(s) for s in tests], 1, params, 0)
    counts = dict.fromkeys(("sum", "difference", "neither"), 0)
    for completion, sample in zip(rollouts.completions, tests):
        counts[operation_of(completion, sample)] += 1
    return counts


def run_operations(run_dir: Path) -> dict[str, dict[str, dict[str, int]]]:
    """{model label: {capability: counts}} for one run, with its own prompting and sampling length."""
    config = load_config(run_dir / "config.yaml")
    capabilities = [load_capability(c) for c in config.capabilities if c.builtin == "comparisons"]
    params = SamplingParams(max_new_tokens=config.sampling.max_new_tokens, greedy=True)
    found = {}
    for label, folder in models_of(run_dir).items():
        model, tokenizer = load_pretrained(folder)
        policy = make_policy(label, model, tokenizer, **config.model.policy_options())
        found[label] = {c.name: tally(policy, c, config.eval.samples, params) for c in capabilities}
    return found


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="a copd compare --out folder, or run directories")
    args = parser.parse_args(argv)
    runs = [r for f in args.folders for r in (sorted((f / "runs").glob("*-seed*")) if (f / "runs").is_dir() else [f])]
    result = {run.name: run_operations(run) for run in runs}
    print(f"{'run':<22}{'model':<16}{'capability':<12}{'sum':>6}{'difference':>12}{'neither':>9}")
    for run, models in result.items():
        for label, per_cap in models.items():
            for cap, c in per_cap.items():
                print(f"{run:<22}{label:<16}{cap:<12}{c['sum']:>6}{c['difference']:>12}{c['neither']:>9}")
    out = (args.folders[0] if (args.folders[0] / "runs").is_dir() else args.folders[0].parent) / "operations.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
