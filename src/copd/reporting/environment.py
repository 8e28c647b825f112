"""What a run's numbers depend on besides its config: the CPU, torch's kernel level and the versions.

Seeded results repeat exactly on one machine with one set of versions; AVX2 and AVX-512
kernels round differently, so the same seed gives other numbers on another CPU kind.
Every run writes RUN/environment.json (one entry per start, so a run resumed elsewhere
says so), report.md shows it, and benchmarks/speed.py and benchmarks/smollm2.py print the
same line.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

# Packages whose version can change a figure.
PACKAGES = ("copd", "torch", "transformers", "peft", "ray")


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def describe_environment(device: str = "cpu") -> dict:
    """CPU model, torch's CPU capability, threads, cores, device, Python and package versions."""
    import torch

    from copd.backends.local.precision import cpu_capability

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_model(),
             "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
             "cores": os.cpu_count(), "device": device, "python": platform.python_version(), "versions": versions}
    if device.startswith("cuda") and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def environment_line(found: dict) -> str:
    """One line for a report or a benchmark's output."""
    versions = ", ".join(f"{name} {version}" for name, version in found.get("versions", {}).items())
    gpu = f", GPU {found['gpu']}" if found.get("gpu") else ""
    return (f"{found.get('cpu', '?')}, torch capability {found.get('cpu_capability', '?')}, {found.get('threads', '?')} threads "
            f"of {found.get('cores', '?')} cores{gpu}; Python {found.get('python', '?')}, {versions}")


def record_environment(run_dir: Path, device: str) -> dict:
    """Append this start's environment to RUN/environment.json (a list: a resumed run adds one)."""
    path = run_dir / "environment.json"
    starts = json.loads(path.read_text()) if path.is_file() else []
    found = describe_environment(device)
    path.write_text(json.dumps([*starts, found], indent=1))
    return found
