"""A rollout engine in its own process and Python environment, and the connection copd keeps to it.

The engine (copd/backends/engine/vllm_server.py) runs with another interpreter, the one of
an environment where vLLM is installed, so vLLM's pins never meet copd's. Only token ids,
log-probs, sampling settings and folder paths cross, pickled over a Unix socket with a
random key. An engine that dies (killed, out of memory) surfaces as EngineLost, which the
trainer treats like a lost branch worker: restart from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Listener
from pathlib import Path

from copd.errors import BranchLost, CopdError

SERVER = Path(__file__).with_name("vllm_server.py")


class EngineLost(BranchLost):
    """The engine process of a branch is gone."""


def check_engine_python(python: str) -> None:
    """A one-line error now, before a run folder is written, when `python` cannot import vLLM."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CopdError(f"sampling.vllm.python = {python!r} cannot be run: {err}") from None
    if not found:
        raise CopdError(f"sampling.engine is vllm, but {python} has no vllm module; set sampling.vllm.python to the "
                        "interpreter of an environment with vLLM (`make vllm` builds .venv-vllm/bin/python)")


class EngineProcess:
    """One engine process serving one model; `request` sends a command and waits for its answer."""

    def __init__(self, name: str, python: str, options: dict, log_path: Path | None = None, start_timeout: float = 600.0,
                 wait: bool = True):
        """Start the engine; with wait=False, `ready()` waits for it to load (so several engines load side by side)."""
        self.name, self.python, self.options, self.start_timeout = name, python, options, start_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="copd-engine-")) / "engine.log"
        self.info: dict = {}
        self._launch()
        if wait:
            self.ready()

    def _launch(self) -> None:
        folder = tempfile.mkdtemp(prefix="copd-socket-")
        key = secrets.token_bytes(32)
        listener = Listener(os.path.join(folder, "engine.sock"), family="AF_UNIX", authkey=key)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, "COPD_ENGINE_KEY": key.hex()}
        self.process = subprocess.Popen([self.python, str(SERVER), listener.address, json.dumps(self.options)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        # An engine left behind by a crash of this process would hold its memory: kill it at exit.
        self._finalizer = weakref.finalize(self, _kill, self.process)
        self.connection, self._listener, self._accepted = None, listener, []
        # Accepted at once (the key exchange needs both sides), so the engine goes on to load its model.
        self._accepting = threading.Thread(target=_accept_into, args=(listener, self._accepted), daemon=True)
        self._accepting.start()

    def ready(self) -> None:
        """Wait until the engine has connected and loaded its model."""
        if self.connection is not None:
            return
        deadline = time.monotonic() + self.start_timeout
        while not self._accepted:
            self._accepting.join(0.2)
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise CopdError(f"the vLLM engine of {self.name!r} did not start ({self._tail()})")
        self.connection = self._accepted[0]
        self._listener.close()
        self.info = self._answer("loading the model", self.start_timeout)

    def _answer(self, what: str, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.connection.poll(1.0):
                if self.process.poll() is not None:
                    raise EOFError
                if deadline is not None and time.monotonic() > deadline:
                    self.close()
                    raise CopdError(f"the vLLM engine of {self.name!r} took over {timeout:.0f} s {what} ({self._tail()})")
            status, value = self.connection.recv()
        except (EOFError, OSError):
            raise EngineLost(self.name, f"{what} (its vLLM engine exited; log: {self.log_path})") from None
        if status == "error":
            raise CopdError(f"the vLLM engine of {self.name!r} failed {what}: {value.strip().splitlines()[-1]} (log: {self.log_path})")
        return value

    def request(self, command: str, what: str, **kwargs):
        try:
            self.connection.send((command, kwargs))
        except OSError:
            raise EngineLost(self.name, f"{what} (its vLLM engine exited; log: {self.log_path})") from None
        return self._answer(what)

    def _tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.exists() else []
        last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "no output")
        return f"{last.strip()[:300]}; log: {self.log_path}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def restart(self) -> None:
        self.close()
        self._launch()
        self.ready()

    def close(self) -> None:
        """Ask the engine to stop; kill it if it does not within 30 s."""
        if self.process.poll() is None and self.connection is not None:
            try:
                self.connection.send(("close", {}))
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._listener.close()
        self._finalizer()


def _accept_into(listener: Listener, accepted: list) -> None:
    """The engine's connection, appended to `accepted`; nothing when the listener is closed first (the engine died)."""
    with contextlib.suppress(OSError):
        accepted.append(listener.accept())


def _kill(process: subprocess.Popen) -> None:
    """The engine and the processes it spawned (its own session)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait()
