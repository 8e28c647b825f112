"""A branch whose rollouts a rollout engine samples: the engine kept in step with the learner's weights.

After every update the learner writes its weights into a folder (full weights; for a LoRA
branch the base with its adapter merged in, so the engine runs the plain model at full
speed) and the engine reloads them, then resets its prefix cache. The update's metrics
record the sync (sync_bytes, sync_seconds). Any other change of the weights (a checkpoint
loaded, weights set, a restart) marks the engine stale, and the next sampling syncs first.
Teachers still score with their learners: the engine only samples.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from copd.backends.roles import Pending, UpdateResult, settle


def sync_folder(branch: str) -> Path:
    """A fresh folder for a branch's weight syncs, in shared memory where there is some."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=f"copd-sync-{branch}-", dir=shm if shm.is_dir() else None))


class EngineBranch:
    """Plays sampling (through the engine) and learning (through the learner) for one branch.

    Everything else a driver or a backend asks of a learner (its actor, its pid) is the learner's.
    """

    def __init__(self, name: str, learner, engine, folder: Path | None = None):
        self.name, self.learner, self.engine = name, learner, engine
        self.folder = folder or sync_folder(name)
        self.stale = False  # the engine starts from the base, as the learner does

    # ---- sampling ----------------------------------------------------------------------
    def generate(self, prompts, n, params, seed):
        if self.stale:
            self.sync()
        return self.engine.generate(prompts, n, params, seed)

    def sync(self) -> dict[str, float]:
        """The learner's weights into the engine; bytes and seconds of the sync."""
        t0 = time.perf_counter()
        nbytes = settle(self.learner.export_weights(self.folder))
        reload_seconds = self.engine.reload(self.folder)
        self.stale = False
        return {"sync_bytes": float(nbytes), "sync_seconds": time.perf_counter() - t0, "sync_reload_seconds": reload_seconds}

    def restart(self) -> None:
        """A fresh engine (its predecessor lost); it holds the base until the next sync."""
        self.engine.restart()
        self.stale = True

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- learning ----------------------------------------------------------------------
    def update(self, rl, opd, spec):
        result = self.learner.update(rl, opd, spec)
        if isinstance(result, Pending):
            return SyncAfter(result, self)
        return self._synced(result)

    def _synced(self, result: UpdateResult) -> UpdateResult:
        if not result.skipped:  # a skipped update left the weights as they were
            result.metrics.update(self.sync())
        return result

    def supervised_step(self, prompts, answers):
        self.stale = True
        return self.learner.supervised_step(prompts, answers)

    def set_weights(self, weights) -> None:
        self.stale = True
        self.learner.set_weights(weights)

    def load_checkpoint(self, folder: Path) -> None:
        self.stale = True
        self.learner.load_checkpoint(folder)

    def __getattr__(self, name: str):
        if name in ("learner", "engine"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.learner, name)


class SyncAfter(Pending):
    """A remote update, then the sync of its weights into the engine (when the driver waits for it)."""

    def __init__(self, update: Pending, branch: EngineBranch):
        self.update, self.branch = update, branch

    def result(self) -> UpdateResult:
        return self.branch._synced(self.update.result())
