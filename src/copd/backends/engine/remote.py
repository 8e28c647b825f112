"""Rollout engines on Ray: each branch's engine in its own actor, placed in its branch's bundle.

The engine actor holds the engine process (copd.backends.engine.process) and the branch's
prompt formatting; it reserves no CPU of its own (the engine process does the work, in
the bundle its branch reserved), and sits on its branch's node, so the folder the
learner's actor writes its weights into is the one the engine reloads from. Rollouts stay
in the object store, as a branch actor's do: the learner's update fetches them there.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

from copd.backends.ray_backend import RemoteRollouts, _ray, fetch


class EngineWorker:
    """What runs inside an engine's actor."""

    def __init__(self, config, name: str, base_folder: Path, log_folder: Path, env: dict):
        from copd.backends.engine.setup import start_engine
        from copd.models.sources import load_tokenizer

        self.sampler = start_engine(config, name, base_folder, log_folder, load_tokenizer(base_folder), env)

    def generate(self, prompts, n, params, seed):
        t0 = time.perf_counter()
        rollouts = self.sampler.generate(prompts, n, params, seed)
        return rollouts, rollouts.completions, {"seconds": time.perf_counter() - t0, "nbytes": rollouts.nbytes}

    def reload(self, folder) -> float:
        return self.sampler.reload(folder)

    def engine_pid(self) -> int:
        return self.sampler.engine.pid

    def close(self) -> None:
        self.sampler.close()


class RemoteEngine:
    """The driver's handle on an engine actor: generate, reload, restart, close."""

    def __init__(self, name: str, start):
        self.name, self.start = name, start
        self.actor = start()

    def generate(self, prompts, n, params, seed) -> RemoteRollouts:
        return RemoteRollouts(*self.actor.generate.options(num_returns=3).remote(prompts, n, params, seed), self.name)

    def reload(self, folder) -> float:
        return fetch(self.actor.reload.remote(str(folder)), self.name, "a weight sync")

    def engine_pid(self) -> int:
        return fetch(self.actor.engine_pid.remote(), self.name, "engine pid")

    def restart(self) -> None:
        self.close()
        self.actor = self.start()

    def close(self) -> None:
        ray = _ray()
        with contextlib.suppress(Exception):  # a lost actor has nothing left to close
            ray.get(self.actor.close.remote(), timeout=60)
        ray.kill(self.actor, no_restart=True)


def engine_actor(config, name: str, base_folder: Path, strategy, env: dict) -> RemoteEngine:
    """A branch's engine actor in its branch's bundle (`strategy`), started from the base folder.

    It asks Ray for no GPU, so Ray hides every GPU from it; `env` gives its engine process
    the branch's own (CUDA_VISIBLE_DEVICES), where the engine and the learner share them.
    """
    ray = _ray()
    options = ray.remote(EngineWorker).options(num_cpus=0, scheduling_strategy=strategy)
    log_folder = Path(base_folder).parent / "engines"
    return RemoteEngine(name, partial(options.remote, config, name, base_folder, log_folder, env))
