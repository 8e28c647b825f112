"""Branches on Ray: one actor per branch, holding its policy; the driver holds proxies of its roles.

Each actor builds its branch from the run's saved base folder, on its own resources (a
bundle of a placement group: `resources.cpus_per_branch` / `gpus_per_branch`, overridable
per branch). The proxies below play the three roles of copd.backends.roles without pulling
tensors into the driver: `generate` returns rollouts that stay in the object store (only
their completion texts come back, for the verifiers), `score` returns scores that stay
there too (and their size in bytes), and an update receives both as object references.
Calls return at once; `settle` waits. A synchronous actor runs its tasks in submission
order, so when the driver submits every score of a step before any update, every teacher
scores as the snapshot Algorithm 1 asks for.

LoRA branches: every actor holds its own copy of the frozen base with all K adapters
(initialised from the same seed, so each matches the in-process run) and trains its own
adapter. One actor holding every adapter would serialise all branches on one device;
with a base per actor, branches run side by side on their own GPUs, at the cost of one
base per GPU group, which is small beside full-weight branches and their AdamW state.
"""

from __future__ import annotations

import logging
import os
import re
import time
from functools import cached_property, partial
from pathlib import Path

import torch

from copd.backends.roles import BranchRoles, OPDPart, Pending, RLPart
from copd.errors import BranchLost, BranchNotStarted, CopdError


def require_ray() -> None:
    """A one-line error now, before anything is written, when Ray is missing."""
    _ray()


def _ray():
    try:
        import ray
    except ImportError:
        raise CopdError("run.backend: ray needs the ray package: pip install 'copd[ray]'") from None
    return ray


class BranchWorker:
    """What runs inside a branch's actor: its policy, built there from the base folder."""

    def __init__(self, build, threads: int):
        torch.set_num_threads(threads)
        self.policy = build()

    def generate(self, prompts, n, params, seed):
        t0 = time.perf_counter()
        rollouts = self.policy.generate(prompts, n, params, seed)
        return rollouts, rollouts.completions, {"seconds": time.perf_counter() - t0, "nbytes": rollouts.nbytes}

    def score(self, rollouts, request):
        t0 = time.perf_counter()
        scores = self.policy.score(rollouts, request)
        return scores, {"seconds": time.perf_counter() - t0, "nbytes": scores.nbytes}

    def update(self, rl, opd, spec):
        ray = _ray()
        # Parts arrive with object references inside them (rollouts, scores): fetched here, in the actor.
        get = lambda x: ray.get(x) if isinstance(x, ray.ObjectRef) else x  # noqa: E731
        rl = [RLPart(get(p.rollouts), p.advantages, p.rows) for p in rl]
        opd = [OPDPart(get(p.rollouts), get(p.teacher), p.beta, p.edge) for p in opd]
        t0 = time.perf_counter()
        result = self.policy.update(rl, opd, spec)
        result.metrics["actor_update_seconds"] = time.perf_counter() - t0
        return result

    def call(self, method: str, *args):
        return getattr(self.policy, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def visible_devices(self) -> str | None:
        """The GPUs Ray gave this actor (CUDA_VISIBLE_DEVICES), which its colocated rollout engine shares."""
        return os.environ.get("CUDA_VISIBLE_DEVICES")


def fetch(ref, branch: str, where: str):
    """ray.get, with a lost actor (or a lost object it made) reported as the branch it was."""
    ray = _ray()
    try:
        return ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
        raise BranchLost(branch, where) from err


def answered(actor, branch: str, deadline: float, seconds: float) -> str | None:
    """None once a new actor answers (placed, its branch built); why it died, when it died without failing itself
    (its node lost before it ran, say: a new start may be placed elsewhere).

    BranchNotStarted when it has not answered by `deadline` (`seconds` after its restart began),
    or when building its branch failed. Ray keeps an actor it cannot place pending for good
    (its node lost, and no other node with room for its bundle), and every call to it waits
    with it: this bounds that wait.
    """
    ray = _ray()
    try:
        ray.get(actor.pid.remote(), timeout=max(0.0, deadline - time.monotonic()))
        return None
    except ray.exceptions.GetTimeoutError:
        raise BranchNotStarted(branch, f"could not be placed or started within {seconds:g} s "
                                       "(a lost node, say; see `ray status`)") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
        # Ray's message ends with the cause (the error its __init__ raised, say), after a traceback.
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
        why = lines[-1].strip() if lines else type(err).__name__
        if getattr(err, "actor_init_failed", False):
            raise BranchNotStarted(branch, f"died while starting ({why})") from err
        return why


class RemoteValue(Pending):
    """The answer of one remote call, fetched when needed."""

    def __init__(self, ref, branch: str, where: str):
        self.ref, self.branch, self.where = ref, branch, where

    def result(self):
        return fetch(self.ref, self.branch, self.where)


class RemoteWork(RemoteValue):
    """A result kept in the object store, with its size and the seconds its actor spent on it."""

    def __init__(self, ref, meta_ref, branch: str, where: str):
        super().__init__(ref, branch, where)
        self._meta = meta_ref

    @cached_property
    def meta(self) -> dict:
        return fetch(self._meta, self.branch, self.where)

    @property
    def nbytes(self) -> int:
        return self.meta["nbytes"]

    @property
    def seconds(self) -> float:
        return self.meta["seconds"]


class RemoteRollouts(RemoteWork):
    """Rollouts kept in the object store; the completion texts come to the driver on first use."""

    def __init__(self, ref, completions_ref, meta_ref, branch: str):
        super().__init__(ref, meta_ref, branch, "sampling")
        self._completions = completions_ref

    @cached_property
    def completions(self) -> list[str]:
        return fetch(self._completions, self.branch, self.where)


class RemoteScores(RemoteWork):
    """A teacher's scores kept in the object store."""

    def __init__(self, ref, meta_ref, branch: str):
        super().__init__(ref, meta_ref, branch, "scoring")


def _ref(x):
    return x.ref if isinstance(x, RemoteWork) else x


START_ATTEMPTS = 3  # starts of a restarted branch's actor that died before it ran (its node lost), before giving up


class ForwardsCalls:
    """The learner's calls a branch handle forwards to its actor(s) as they are; `_call` says how."""

    def _call(self, method: str, *args):
        raise NotImplementedError

    def parameter_counts(self):
        return self._call("parameter_counts")

    def get_weights(self):
        return self._call("get_weights")

    def set_weights(self, weights) -> None:
        self._call("set_weights", weights)

    def save_checkpoint(self, folder: Path) -> None:
        self._call("save_checkpoint", folder)

    def load_checkpoint(self, folder: Path) -> None:
        self._call("load_checkpoint", folder)

    def save_pretrained(self, folder: Path) -> None:
        self._call("save_pretrained", folder)

    def export_weights(self, folder: Path) -> int:
        return self._call("export_weights", folder)


class RemoteBranch(ForwardsCalls):
    """The driver's handle on a branch actor; plays sampler, scorer and learner."""

    def __init__(self, name: str, start, restart_timeout: float = 300.0):
        self.name, self.start = name, start  # start() makes a fresh actor of this branch
        self.restart_timeout = restart_timeout  # seconds a restarted actor has to answer (run.restart_timeout)
        self.actor = start()

    def restart(self) -> None:
        """A new actor built from the base folder (its predecessor is killed if still there), once it answers.

        BranchNotStarted when none does within restart_timeout seconds: the calls that follow
        would otherwise wait for an actor Ray may never place. An actor that dies before it
        runs (its node found dead meanwhile) is started again, up to START_ATTEMPTS times:
        Ray places the new one on a node still alive, where there is one with room.
        """
        ray = _ray()
        deadline = time.monotonic() + self.restart_timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            ray.kill(self.actor, no_restart=True)
            self.actor = self.start()
            died = answered(self.actor, self.name, deadline, self.restart_timeout)
            if died is None:
                return
            if attempt == START_ATTEMPTS or time.monotonic() >= deadline:
                raise BranchNotStarted(self.name, f"died while starting ({died}); starts tried: {attempt}")

    def generate(self, prompts, n, params, seed) -> RemoteRollouts:
        return RemoteRollouts(*self.actor.generate.options(num_returns=3).remote(prompts, n, params, seed), self.name)

    def score(self, rollouts, request=None) -> RemoteScores:
        return RemoteScores(*self.actor.score.options(num_returns=2).remote(_ref(rollouts), request), self.name)

    def update(self, rl, opd, spec) -> RemoteValue:
        rl = [RLPart(_ref(p.rollouts), p.advantages, p.rows) for p in rl]
        opd = [OPDPart(_ref(p.rollouts), _ref(p.teacher), p.beta, p.edge) for p in opd]
        return RemoteValue(self.actor.update.remote(rl, opd, spec), self.name, "its update")

    def _call(self, method: str, *args):
        return fetch(self.actor.call.remote(method, *args), self.name, method.replace("_", " "))

    def pid(self) -> int:
        return fetch(self.actor.pid.remote(), self.name, "pid")


def build_branch(config, base_folder: Path, name: str, device: str):
    """One branch of the run, as the local backend builds it (run inside its actor)."""
    from copd.backends.local.branches import build_branches
    from copd.models.sources import load_pretrained

    model, tokenizer = load_pretrained(base_folder, config.model.dtype)
    if config.lora.enabled:  # every adapter, as in one process, so the seeded initialisation matches
        return build_branches(config, model, tokenizer, device)[0][name]
    from copd.backends.local.factory import make_policy

    optim = config.optim
    return make_policy(name, model, tokenizer, optim.lr, optim.weight_decay, device, **config.model.policy_options())


def start_ray(config) -> None:
    """Join run.ray_address, or start a local Ray with this machine's CPUs (and GPUs)."""
    ray = _ray()
    if ray.is_initialized():
        return
    # Ray's start-up notes (INFO) would interleave with copd's progress display; its warnings still show.
    if config.run.ray_address:
        ray.init(address=config.run.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    else:  # the actors' library warnings stay in Ray's logs
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def ray_branches(config, base_folder: Path, device: str) -> tuple[dict[str, BranchRoles], object]:
    """(roles of each branch, their placement group): one actor per rank, each in its bundle (PACK: as few nodes as fit).
    A branch of several ranks is a worker group (copd.backends.ray_group)."""
    ray = _ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from copd.backends.ray_group import group_handle

    start_ray(config)
    wants = [config.resources.bundles(b.name) for b in config.branches]
    bundles = [bundle for own in wants for bundle in own]
    group = placement_group(bundles, strategy="PACK")
    if not group.wait(timeout_seconds=120):
        raise CopdError(f"ray: the cluster cannot place the branches' bundles {bundles} (see `ray status`)")
    worker = ray.remote(BranchWorker)
    branches, first = {}, 0
    for branch, own in zip(config.branches, wants):
        options = [dict(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first + rank))
                   for rank, b in enumerate(own)]
        first += len(own)
        threads = max(1, int(own[0]["CPU"]))
        if len(own) > 1:
            branches[branch.name] = BranchRoles.of(group_handle(config, base_folder, branch.name, device, options, threads))
            continue
        build = partial(build_branch, config, base_folder, branch.name, device)
        start = partial(worker.options(**options[0]).remote, build, threads)
        branches[branch.name] = BranchRoles.of(RemoteBranch(branch.name, start, config.run.restart_timeout))
        if config.sampling.engine == "vllm":
            branches[branch.name] = _with_engine(config, base_folder, branches[branch.name].learner,
                                                 options[0]["scheduling_strategy"])
    return branches, group


def _with_engine(config, base_folder: Path, branch: RemoteBranch, strategy) -> BranchRoles:
    """The branch's roles with its rollout engine in an actor of its own, on the branch's bundle and GPUs."""
    from copd.backends.engine.branch import EngineBranch
    from copd.backends.engine.remote import engine_actor

    devices = fetch(branch.actor.visible_devices.remote(), branch.name, "start")
    engine = engine_actor(config, branch.name, base_folder, strategy, {"CUDA_VISIBLE_DEVICES": devices} if devices else {})
    synced = EngineBranch(branch.name, branch, engine)
    return BranchRoles(sampler=synced, scorer=branch, learner=synced)


def release(branches: dict[str, BranchRoles], group) -> None:
    """Stop the branch actors and free their placement group (a run's end, or its failure)."""
    ray = _ray()
    from ray.util.placement_group import remove_placement_group

    from copd.backends.engine.setup import close_engines

    close_engines(branches)
    for roles in branches.values():
        for actor in getattr(roles.learner, "actors", [roles.learner.actor]):  # every rank of a worker group
            ray.kill(actor, no_restart=True)
    remove_placement_group(group)
