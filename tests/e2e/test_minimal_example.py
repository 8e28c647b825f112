"""examples/minimal_copd.py runs end to end with tiny settings and prints base and merged accuracy."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minimal_copd.py"
TINY_FLAGS = [
    "--warmup-steps", "20", "--cycles", "1", "--rl-steps", "1", "--opd-steps", "1",
    "--prompts", "4", "--group", "4", "--opd-prompts", "4", "--opd-samples", "2",
    "--hidden", "32", "--layers", "1", "--test-size", "8", "--threads", "1",
]
ACCURACY = re.compile(r"^accuracy (base|merged): sort=([-\d.]+)% reversal=([-\d.]+)%$", re.MULTILINE)


def test_minimal_example_runs_and_reports_accuracies():
    done = subprocess.run([sys.executable, str(EXAMPLE), *TINY_FLAGS], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {label: (float(sort), float(rev)) for label, sort, rev in ACCURACY.findall(done.stdout)}
    assert set(found) == {"base", "merged"}, done.stdout
    for label, values in found.items():
        assert all(0.0 <= v <= 100.0 for v in values), (label, values)
    # Both phases of Algorithm 1 ran.
    assert "explore" in done.stdout and "consolidate" in done.stdout
