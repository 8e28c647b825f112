"""`copd train` on a local Ray whose node is lost mid-run: it ends in bounded time with one line saying how to resume.

Killing Ray's dashboard agent takes the raylet down with it (the raylet fate-shares with its
agents), so the node is gone and the restarted branches' actors can never be placed.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.extras import require

require("ray")
psutil = pytest.importorskip("psutil", reason="finding Ray's processes needs psutil (a dependency of Ray's extras)")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
# A model and steps so small that the run reaches its first checkpoint soon, and cycles enough
# that it is still training when the node is lost.
TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64", "warmup.enabled=false",
        "schedule.cycles=100", "schedule.rl_steps=1", "schedule.opd_steps=1", "rl.prompts_per_step=2", "rl.rollouts_per_prompt=2",
        "opd.prompts_per_step=2", "eval.samples=8", "run.threads=1", "run.backend=ray", "run.restart_timeout=3"]


def is_dashboard_agent(process) -> bool:
    """Ray's dashboard agent: its process title, or its script (the raylet's own command line names it only inside an option)."""
    try:
        line = process.cmdline()
    except psutil.Error:  # a worker that ended meanwhile
        return False
    return line[:1] == ["ray::DashboardAgent"] or any(arg.endswith("dashboard/agent.py") for arg in line[:3])


def still_there(processes: list) -> list:
    """The processes still running after up to 20 s (a zombie has ended)."""
    _, alive = psutil.wait_procs(processes, timeout=20)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_for_checkpoint(run: subprocess.Popen, run_dir: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not list(run_dir.glob("checkpoints/cycle_*/state.json")):
        assert run.poll() is None, f"copd train ended (exit {run.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {limit} s"
        time.sleep(0.2)


def stop(run: subprocess.Popen, seen: list) -> None:
    """Kill whatever of the run is still there: the driver, Ray's processes and the actors."""
    processes = set(seen)
    if run.poll() is None:
        try:
            driver = psutil.Process(run.pid)
            processes |= {driver, *driver.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    run.wait(timeout=30)


# 40-60 s on 2 busy cores, most of it Ray and the actors starting (`pytest -m slow tests/backends/test_ray_lost_node.py`): not in CI;
# tests/backends/test_ray.py and tests/driver/test_trainer.py check its parts there.
@pytest.mark.slow
def test_a_lost_node_stops_the_run_with_one_line_saying_how_to_resume(tmp_path):
    run_dir, err = tmp_path / "run", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, started by the driver
    argv = [sys.executable, "-m", "copd.cli", "train", str(DEMO), *TINY, f"run.out={run_dir}",
            f"model.cache_dir={tmp_path / 'cache'}", "--quiet"]
    with err.open("w") as stderr:
        run = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    seen = []  # every process of the run, killed at the end if still there
    try:
        wait_for_checkpoint(run, run_dir, 240)
        seen = psutil.Process(run.pid).children(recursive=True)
        agents = [p for p in seen if is_dashboard_agent(p)]
        assert len(agents) == 1, [p.cmdline()[:3] for p in seen]
        agents[0].send_signal(signal.SIGKILL)
        try:
            code = run.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"copd train still running 150 s after its node was lost: {err.read_text()[-2000:]}")
        left = still_there(seen)
    finally:
        stop(run, seen)
    lines = err.read_text().strip().splitlines()
    assert code == 2, lines[-20:]
    last = lines[-1]
    assert last.startswith("copd: error: branch ") and "was lost" in last, lines[-20:]
    assert "could not be placed or started within 3 s" in last and last.endswith(f"resume with --resume {run_dir}"), last
    assert not left, [p.pid for p in left]  # Ray's own processes went with the driver
