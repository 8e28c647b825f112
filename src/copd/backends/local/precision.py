"""bfloat16 only where the hardware runs it fast: a measured choice for model.dtype and model.compute_dtype.

On a CPU with native bf16 (AVX-512 BF16 or AMX) a bf16 matmul runs about 3x faster than
fp32; on one without (AVX2 only) torch emulates it, at a few hundredths of fp32's speed,
and a bf16 training step is 10x+ slower. copd measures it once per process: a square
matmul in each dtype, a fraction of a second. `auto` picks bf16 when it is faster, and an
explicit `bfloat16` that is slower gets a one-line warning with the measured factor.
"""

from __future__ import annotations

import functools
import time

import torch

from copd.config.schema import Config

SIDE = 256  # small enough that emulated bf16 still finishes in about 0.1 s
MIN_SECONDS = 0.05  # each dtype is timed for at least this long
FASTER = 1.1  # bf16 must beat fp32 by this factor for `auto` to pick it


def cpu_capability() -> str:
    """torch's CPU kernel level (AVX2, AVX512, ...), the figure speed tables should name."""
    return torch.backends.cpu.get_cpu_capability()


def _matmul_flops(dtype: torch.dtype) -> float:
    a, b = torch.randn(SIDE, SIDE).to(dtype), torch.randn(SIDE, SIDE).to(dtype)
    a @ b  # warm-up: kernels picked, memory touched
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < MIN_SECONDS:
        a @ b
        runs += 1
    return 2 * SIDE ** 3 * runs / elapsed


@functools.cache
def bf16_speedup(device_type: str = "cpu") -> float:
    """bf16 matmul throughput over fp32's on this device (above 1: bf16 is faster)."""
    if device_type == "cuda":
        return 2.0 if torch.cuda.is_bf16_supported() else 0.0
    if device_type != "cpu":
        return 1.0
    return _matmul_flops(torch.bfloat16) / _matmul_flops(torch.float32)


def resolve_precision(config: Config, device: str) -> tuple[Config, list[str]]:
    """The config with `auto` dtypes decided for `device`, and one warning per slow bf16 choice.

    compute_dtype auto: bf16 autocast when bf16 matmuls are faster. dtype auto: bf16 weights
    only for a frozen LoRA base when bf16 is faster (full fine-tuning keeps fp32 weights, as
    bf16 rounds small AdamW updates away).
    """
    model = config.model
    if "auto" not in (model.dtype, model.compute_dtype) and "bfloat16" not in (model.dtype, model.compute_dtype):
        return config, []
    device_type = torch.device(device).type
    factor = bf16_speedup(device_type)
    fast = factor >= FASTER
    compute = model.compute_dtype if model.compute_dtype != "auto" else ("bfloat16" if fast else "float32")
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if fast and config.lora.enabled else "float32")
    warnings = [
        f"model.{key}: bfloat16 matmuls run at {factor:.3g}x the speed of float32 on this {device_type} "
        f"(torch capability {cpu_capability()}); a step will be slower than in float32 (set {key}: auto or float32)"
        for key, value in (("dtype", model.dtype), ("compute_dtype", model.compute_dtype))
        if value == "bfloat16" and device_type == "cpu" and factor < 1
    ]
    resolved = config.model_copy(update={"model": model.model_copy(update={"dtype": dtype, "compute_dtype": compute})})
    return resolved, warnings
