"""The benchmark scripts run on the current code: their steps on the demo's tiny model, the device check on the CPU."""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check
import speed

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import SamplingParams
from copd.config.loader import load_config


def test_the_device_check_passes_on_the_cpu(capsys):
    gpu_check.check_seam("cpu")
    assert "crossing tensors on the CPU: True" in capsys.readouterr().out


def test_the_speed_benchmark_steps_run_on_the_demo_model():
    config = load_config(speed.DEMO_YAML)
    sizes = speed.SIZES[("demo", True)]
    model, tokenizer = speed.build_model("demo", config)
    student, teacher = HFPolicy("a", model, tokenizer), HFPolicy("b", copy.deepcopy(model), tokenizer)
    rl_sampler, opd_sampler = speed.samplers(config)
    params = SamplingParams(max_new_tokens=sizes.new_tokens)
    assert speed.rl_step(student, rl_sampler, sizes, params, seed=0)["tokens"] > 0
    opd = speed.opd_step(student, teacher, rl_sampler, opd_sampler, sizes, params, seed=1)
    assert {"gen_rl", "gen_opd", "score", "update", "step"} <= opd.keys() and opd["score"] > 0


def test_the_memory_benchmark_after_peak_is_below_before_at_the_largest_quick_size(tmp_path, monkeypatch):
    """One RL update at 1,024 tokens of Qwen3's vocabulary, each mode in its own process: the chunked LM head
    computes the same loss as the one-shot [B, T, V] log-softmax at well below its peak RSS; the scaled-down
    paper update runs in-process."""
    from concurrent.futures import ThreadPoolExecutor

    import memory
    import memory_points
    import pytest

    from copd.backends.local import lm_head

    # malloc's defaults in the children: copd's keep-freed setting fragments the heap, which blurs peak RSS by GBs.
    monkeypatch.setenv("COPD_KEEP_FREED_MEMORY", "0")
    args = memory.parse_args(["--quick"])
    (*_, tokens), width = memory.SIZES[True]
    point = {"kind": "update", "part": "rl", "rows": tokens // width, "width": width, "budget": args.budget}
    with ThreadPoolExecutor(2) as pool:  # two processes at once: their start-up (imports) overlaps
        before, after = pool.map(lambda mode: memory.child({**point, "mode": mode}, args), ["before", "after"])
    assert "error" not in before and "error" not in after, (before, after)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-4, abs=1e-6)
    grown_before, grown_after = before["peak_mib"] - before["start_mib"], after["peak_mib"] - after["start_mib"]
    assert grown_after < 0.6 * grown_before, (grown_after, grown_before)
    monkeypatch.setattr(lm_head, "LOGITS_PER_CHUNK", lm_head.LOGITS_PER_CHUNK)  # restored after the in-process run
    paper = memory_points.measure(memory.paper_point(args))
    assert paper["params"] > 0 and paper["s_per_1k"] > 0 and paper["peak_mib"] >= paper["start_mib"] > 0


def test_the_ranks_benchmark_measures_half_the_state_on_two_ranks():
    import argparse

    import pytest
    import ranks

    args = argparse.Namespace(layers=1, prompts=1, prompt_len=4, tokens=4, budget=512, repeats=1)
    one, two = ranks.measure(1, args), ranks.measure(2, args)
    for key in ("params", "grads", "adam"):
        assert two[key] == pytest.approx(one[key] / 2, rel=0.01), key
    assert one["update"] > 0


def test_comparison_operations_sorts_answers_by_the_operation_they_follow():
    import comparison_operations as ops

    from copd.backends.roles import Rollouts
    from copd.capabilities import BUILTIN_CAPABILITIES, Sample

    sample = Sample("Li has 12 cards. Ben has 5 fewer cards than Li. How many cards does Ben have? Answer with the number only.", "7")
    assert ops.operands(sample) == (12, 5)
    assert [ops.operation_of(t, sample) for t in ("7", "12 + 5 = 17", "Ben has 8", "no idea")] == ["difference", "sum", "neither", "neither"]

    class AlwaysAdds:
        def generate(self, prompts, n, params, seed):
            sums = [str(sum(ops.operands(Sample(p.text, ""))) if i % 4 else "x") for i, p in enumerate(prompts)]
            return Rollouts(None, None, 0, None, sums)

    fewer = BUILTIN_CAPABILITIES["comparisons"](relations="fewer")
    assert ops.tally(AlwaysAdds(), fewer, 8, SamplingParams(greedy=True)) == {"sum": 6, "difference": 0, "neither": 2}
