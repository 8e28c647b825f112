"""A branch of several ranks on Ray: a worker group, one actor per rank, sharded with FSDP2.

The ranks find each other as torch.distributed wants: rank 0's actor picks its node's address
and a free port, then every actor joins the process group there (copd.backends.local.sharded
.join_group). The driver's handle, `BranchGroup`, plays the same roles as a one-actor branch
(copd.backends.ray_backend.RemoteBranch), so the trainer cannot tell them apart:
- sampling: each rank samples its share of the prompts; a task joins the shares into the step's
  rollouts (as one rank lays them out), which stay in the object store;
- scoring: each rank scores its share of the rows; a task joins the scores;
- updates, checkpoints, folders: every rank is called, and answers together.
Waiting on a group fails as soon as any rank is lost: the others may be blocked in a collective
with it, so the group is lost as a whole (and restarted as a whole).
"""

from __future__ import annotations

import functools
import os
import socket
import time
from functools import cached_property, partial
from pathlib import Path

import torch

from copd.backends.ray_backend import BranchWorker, ForwardsCalls, RemoteRollouts, RemoteScores, RemoteValue, _ray, _ref, answered, fetch
from copd.backends.roles import OPDPart, RLPart, Rollouts, ScoreRequest
from copd.errors import BranchLost, BranchNotStarted, CopdError


class RankWorker(BranchWorker):
    """One rank of a branch: joins its process group, then builds its share of the sharded policy."""

    def __init__(self, build, threads: int):
        torch.set_num_threads(threads)
        self.build, self.policy = build, None

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it: where the group meets."""
        ray = _ray()
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def join(self, address: str, port: int, rank: int, world: int, device: str, timeout_s: float) -> int:
        from copd.backends.local.sharded import join_group

        self.rank, self.world = rank, world
        self.policy = self.build(join_group(address, port, rank, world, device, timeout_s))
        return os.getpid()

    def generate_share(self, prompts, n, params, seed, share: range):
        t0 = time.perf_counter()
        with self.policy.gathered():  # every rank gathers, even one with no prompts
            rollouts = self.policy.generate_share(prompts, n, params, seed, share) if len(share) else None
        return rollouts, {"seconds": time.perf_counter() - t0, "pad_id": self.policy.tokenizer.pad_token_id}

    def score_share(self, rollouts: Rollouts, request: ScoreRequest | None):
        from copd.backends.local.microbatch import prompt_group, rank_rows

        t0 = time.perf_counter()
        rows = rank_rows(torch.arange(rollouts.completion_mask_B_T.shape[0]), prompt_group(rollouts), self.rank, self.world)
        with self.policy.gathered():
            scores = self.policy.score(rollouts.select(rows), _request_rows(request, rows)) if len(rows) else None
        return (scores, rows), {"seconds": time.perf_counter() - t0}


def _request_rows(request: ScoreRequest | None, rows: torch.Tensor) -> ScoreRequest | None:
    if request is None or request.ids_B_T_J is None:
        return request
    return ScoreRequest(request.topk, request.ids_B_T_J[rows], request.student_topk)


def join_rollouts(*answers):
    """(rollouts, their completions, meta) of the ranks' shares, in prompt order, completions padded to the longest."""
    from copd.backends.local.hf import pad_completions

    half = len(answers) // 2
    shares, metas = answers[:half], answers[half:]
    rollouts = pad_completions([s for s in shares if s is not None], metas[0]["pad_id"])
    return rollouts, rollouts.completions, {"seconds": max(m["seconds"] for m in metas), "nbytes": rollouts.nbytes}


def join_scores(*answers):
    """(scores, meta) of the ranks' shares of the rows, in row order."""
    from copd.backends.local.hf import scatter_scores
    from copd.backends.local.microbatch import MicroBatch

    half = len(answers) // 2
    shares = [(s, rows) for s, rows in answers[:half] if s is not None]
    width = shares[0][0].token_logprobs_B_T.shape[1]
    cuts = [MicroBatch((rows, width)) for _, rows in shares]
    scores = scatter_scores([s for s, _ in shares], cuts, sum(len(rows) for _, rows in answers[:half]), width)
    return scores, {"seconds": max(m["seconds"] for m in answers[half:]), "nbytes": scores.nbytes}


@functools.cache
def _task(function):
    """`function` as a Ray task that takes no CPU (joining answers is light, and must not wait for a free core)."""
    return _ray().remote(num_cpus=0)(function)


# Seconds a rank whose collective failed waits for its peers' fate: a killed peer is noticed by gloo at once,
# by Ray a little later.
PEER_GRACE_S = 30.0


def settle(refs: list, branch: str, where: str) -> list:
    """Every rank's answer; a lost rank is reported at once, though the others may never answer. A rank whose
    collective failed (its peer gone) makes the group lost too: every branch then restarts as for a lost actor."""
    ray = _ray()
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            fetch(ready[0], branch, where)
        except ray.exceptions.RayTaskError as err:
            if _collective_failed(err) or _any_lost(pending, branch, where):
                raise BranchLost(branch, where) from err
            raise
    return [fetch(ref, branch, where) for ref in refs]


def _collective_failed(err) -> bool:
    """Whether a rank's error is its process group breaking (a peer killed, or its node gone)."""
    cause = getattr(err, "cause", None)
    return isinstance(cause, torch.distributed.DistError) or any(
        sign in str(cause) for sign in ("by peer", "Connection reset", "Connection closed", "NCCL error"))


def _any_lost(refs: list, branch: str, where: str) -> bool:
    ray = _ray()
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PEER_GRACE_S) if refs else ([], [])
    for ref in ready:
        try:
            fetch(ref, branch, where)
        except BranchLost:
            return True
        except ray.exceptions.RayTaskError:
            pass
    return False


class _JoinedAnswer:
    """What a Ray task joined from a group's ranks: reading any of it first waits on every rank,
    so a rank that died is reported as the group lost rather than as a broken join."""

    def __init__(self, refs, ranks: list, branch: str):
        super().__init__(*refs, branch)
        self.ranks = ranks

    def result(self):
        settle(self.ranks, self.branch, self.where)
        return super().result()

    @cached_property
    def meta(self) -> dict:
        settle(self.ranks, self.branch, self.where)
        return fetch(self._meta, self.branch, self.where)


class GroupRollouts(_JoinedAnswer, RemoteRollouts):
    """The joined rollouts of a group's ranks."""

    @cached_property
    def completions(self) -> list[str]:
        settle(self.ranks, self.branch, self.where)
        return fetch(self._completions, self.branch, self.where)


class GroupScores(_JoinedAnswer, RemoteScores):
    """The joined scores of a group's ranks."""


class GroupValue(RemoteValue):
    """Every rank's answer to one call; rank 0's is the group's (the ranks agree on it)."""

    def __init__(self, refs: list, branch: str, where: str):
        super().__init__(refs[0], branch, where)
        self.refs = refs

    def result(self):
        return settle(self.refs, self.branch, self.where)[0]


class BranchGroup(ForwardsCalls):
    """The driver's handle on a branch's worker group; plays sampler, scorer and learner."""

    def __init__(self, name: str, start):
        self.name, self.start = name, start  # start() makes the group's actors, joined
        self.actors = start()

    @property
    def actor(self):
        return self.actors[0]

    def kill(self) -> None:
        for actor in self.actors:
            _ray().kill(actor, no_restart=True)

    def restart(self) -> None:
        """New actors built from the base folder, joined in a new group (the old ones killed if still there)."""
        self.kill()
        self.actors = self.start()

    def generate(self, prompts, n, params, seed) -> GroupRollouts:
        cuts = torch.tensor_split(torch.arange(len(prompts)), len(self.actors))  # contiguous, as equal as can be
        shares = [range(int(c[0]), int(c[-1]) + 1) if len(c) else range(0) for c in cuts]
        answers = [a.generate_share.options(num_returns=2).remote(prompts, n, params, seed, s) for a, s in zip(self.actors, shares)]
        rollouts, metas = [a[0] for a in answers], [a[1] for a in answers]
        joined = _task(join_rollouts).options(num_returns=3).remote(*rollouts, *metas)
        return GroupRollouts(joined, rollouts + metas, self.name)

    def score(self, rollouts, request=None) -> GroupScores:
        answers = [a.score_share.options(num_returns=2).remote(_ref(rollouts), request) for a in self.actors]
        shares, metas = [a[0] for a in answers], [a[1] for a in answers]
        joined = _task(join_scores).options(num_returns=2).remote(*shares, *metas)
        return GroupScores(joined, shares + metas, self.name)

    def update(self, rl, opd, spec) -> GroupValue:
        rl = [RLPart(_ref(p.rollouts), p.advantages, p.rows) for p in rl]
        opd = [OPDPart(_ref(p.rollouts), _ref(p.teacher), p.beta, p.edge) for p in opd]
        return GroupValue([a.update.remote(rl, opd, spec) for a in self.actors], self.name, "its update")

    def _call(self, method: str, *args):
        refs = [a.call.remote(method, *args) for a in self.actors]
        return settle(refs, self.name, method.replace("_", " "))[0]

    def pid(self) -> int:
        return self.pids()[0]

    def pids(self) -> list[int]:
        return settle([a.pid.remote() for a in self.actors], self.name, "pid")


def start_group(name: str, options: list, build, threads: int, device: str, timeout_s: float) -> list:
    """The ranks' actors (one per entry of `options`), joined in one process group; BranchNotStarted past `timeout_s`."""
    ray = _ray()
    deadline = time.monotonic() + timeout_s
    actors = [o.remote(build, threads) for o in options]
    died = answered(actors[0], name, deadline, timeout_s)
    if died is not None:
        raise BranchNotStarted(name, f"died while starting ({died})")
    address, port = fetch(actors[0].address.remote(), name, "start")
    joins = [a.join.remote(address, port, rank, len(actors), device, timeout_s) for rank, a in enumerate(actors)]
    ready, _ = ray.wait(joins, num_returns=len(joins), timeout=max(0.0, deadline - time.monotonic()))
    if len(ready) < len(joins):
        raise BranchNotStarted(name, f"could not start its {len(actors)} ranks within {timeout_s:g} s (see `ray status`)")
    settle(joins, name, "start")
    return actors


def build_sharded(config, base_folder: Path, name: str, mesh):
    """One rank's share of a branch (run inside its actor, once the group is joined)."""
    from copd.backends.local.sharded import ShardedPolicy
    from copd.backends.local.vl import VISION_OPTIONS
    from copd.models.sources import load_pretrained
    from copd.multimodal.processor import VLProcessor

    model, tokenizer = load_pretrained(base_folder, config.model.dtype)
    if isinstance(tokenizer, VLProcessor):
        raise CopdError(f"branch {name!r}: a vision-language model trains on one rank per branch for now (resources.ranks_per_branch: 1)")
    options = {k: v for k, v in config.model.policy_options().items() if k not in VISION_OPTIONS}
    return ShardedPolicy(name, model, tokenizer, config.optim.lr, config.optim.weight_decay, mesh=mesh, **options)


def group_handle(config, base_folder: Path, name: str, device: str, options: list, threads: int) -> BranchGroup:
    """A branch of len(options) ranks, each actor made with one entry of `options` (its bundle, CPUs and GPUs)."""
    worker = _ray().remote(RankWorker)
    build = partial(build_sharded, config, base_folder, name)
    start = partial(start_group, name, [worker.options(**o) for o in options], build, threads, device, config.run.restart_timeout)
    return BranchGroup(name, start)


def check_placement(config) -> None:
    """A one-line error, before the run folder is written, when the Ray cluster cannot hold every rank's bundle."""
    from copd.backends.ray_backend import start_ray

    ray = _ray()
    start_ray(config)
    bundles = [bundle for b in config.branches for bundle in config.resources.bundles(b.name)]
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for kind in ("CPU", "GPU"):
        need, have = sum(b.get(kind, 0.0) for b in bundles), sum(n.get(kind, 0.0) for n in nodes)
        if need > have + 1e-9:
            raise CopdError(f"resources: {len(bundles)} ranks of {len(config.branches)} branches need {need:g} {kind}s, and the "
                            f"Ray cluster has {have:g} (see `ray status`); lower resources.ranks_per_branch, cpus_per_branch "
                            "or gpus_per_branch, or add nodes")


def check_rank_model(config, processing) -> None:
    """Branches of several ranks train text models (a one-line error for a vision-language one, before the run folder)."""
    from copd.multimodal.processor import VLProcessor

    several = [b.name for b in config.branches if config.resources.ranks_of(b.name) > 1]
    if several and isinstance(processing, VLProcessor):
        raise CopdError(f"resources: branches {several} have several ranks, which train text models only for now; "
                        f"{config.model.path or 'the model'} is vision-language: set resources.ranks_per_branch: 1")
