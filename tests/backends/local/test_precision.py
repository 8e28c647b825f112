"""model.dtype / compute_dtype `auto`, and the warning for bf16 on hardware that emulates it."""

import pytest

import copd.backends.local.precision as precision
from tests.fakes import make_config


def _config(dtype, compute, lora=False):
    return make_config("unused", model={"dtype": dtype, "compute_dtype": compute}, lora={"enabled": lora})


@pytest.fixture
def measured(monkeypatch):
    def set_factor(factor):
        monkeypatch.setattr(precision, "bf16_speedup", lambda device_type="cpu": factor)
    return set_factor


def test_auto_picks_float32_where_bf16_is_emulated(measured):
    measured(0.003)  # AVX2: bf16 at 0.3 GFLOP/s against 103 in fp32
    config, warnings = precision.resolve_precision(_config("auto", "auto", lora=True), "cpu")
    assert (config.model.dtype, config.model.compute_dtype, warnings) == ("float32", "float32", [])


def test_auto_picks_bf16_where_it_is_faster(measured):
    measured(2.9)  # AVX-512 BF16 / AMX
    config, _ = precision.resolve_precision(_config("auto", "auto", lora=True), "cpu")
    assert (config.model.dtype, config.model.compute_dtype) == ("bfloat16", "bfloat16")
    full, _ = precision.resolve_precision(_config("auto", "auto", lora=False), "cpu")
    assert (full.model.dtype, full.model.compute_dtype) == ("float32", "bfloat16")  # full fine-tuning keeps fp32 weights


def test_an_explicit_slow_bf16_is_kept_with_a_one_line_warning(measured):
    measured(0.003)
    config, warnings = precision.resolve_precision(_config("float32", "bfloat16"), "cpu")
    assert config.model.compute_dtype == "bfloat16" and len(warnings) == 1
    assert warnings[0].startswith("model.compute_dtype: bfloat16 matmuls run at 0.003x the speed of float32 on this cpu")
    assert "\n" not in warnings[0]
    measured(2.9)
    assert precision.resolve_precision(_config("float32", "bfloat16"), "cpu")[1] == []


def test_float32_configs_measure_nothing(monkeypatch):
    monkeypatch.setattr(precision, "bf16_speedup", lambda device_type="cpu": pytest.fail("measured"))
    config = _config("float32", "float32")
    assert precision.resolve_precision(config, "cpu") == (config, [])


def test_the_measurement_is_a_positive_ratio():
    assert precision.bf16_speedup("cpu") > 0 and precision.cpu_capability()
