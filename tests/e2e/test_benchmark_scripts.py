"""The benchmark scripts run on the current code: their steps on the demo's tiny model, the device check on the CPU."""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402
import speed  # noqa: E402

from copd.backends.local.hf import HFPolicy  # noqa: E402
from copd.backends.roles import SamplingParams  # noqa: E402
from copd.config.loader import load_config  # noqa: E402


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
