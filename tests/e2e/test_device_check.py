"""benchmarks/gpu_check.py's seam check runs on the CPU too, so the script stays in step with the code."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_device_check_passes_on_the_cpu(capsys):
    gpu_check.check_seam("cpu")
    assert "crossing tensors on the CPU: True" in capsys.readouterr().out
