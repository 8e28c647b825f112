"""One rank of a branch that spans several devices: its model sharded with FSDP2, its share of each step.

A branch of N ranks is N processes joined in a torch.distributed process group (nccl on GPUs,
gloo on CPU). Each holds 1/N of every weight, gradient and AdamW moment
(`torch.distributed.fsdp.fully_shard` over an explicit 1-D device mesh: each transformer block
is a unit, the rest of the model (embeddings, final norm, LM head) the root unit).

Data parallel: each rank samples, scores and trains on its share of a step's prompt groups.
Three things keep N ranks equal to one:
- the loss normaliser of each part (copd.core.losses.loss_normaliser: tokens, rows or padded
  slots) is summed over the ranks before the micro-batch loop, and the ranks' gradients are
  summed (FSDP averages them, so each rank backpropagates world x its loss): they add up to
  the one-rank gradient;
- every forward and backward with gradients is collective (each unit all-gathers its weights,
  then reduce-scatters its gradients), so the ranks run the same number of passes: a rank with
  fewer micro-batches runs idle ones (a zero loss on one row), and a non-finite loss on any
  rank skips the step on all of them;
- metrics are tallied per rank and summed across ranks before they are turned into means.
Sampling and scoring are not collective: every unit is gathered once, then each rank runs its
own passes on its own rows (a full copy of the weights for that time, as in any FSDP rollout).

Checkpoints and folders are the one-rank ones (model.safetensors and optimizer.pt as HFPolicy
writes them, transformers folders): rank 0 gathers the full state and writes it, and loading
broadcasts from rank 0, so a run resumes with any rank count, and `copd merge` reads the result.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer

from copd.backends.local.hf import HFPolicy, export_state
from copd.backends.local.microbatch import prompt_group, rank_rows
from copd.backends.local.objective import Tally
from copd.core.losses import part_count

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the whole state, on rank 0's CPU
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)  # rank 0's state, to every rank


def join_group(address: str, port: int, rank: int, world: int, device: str, timeout_s: float):
    """This process as `rank` of a `world`-rank group (nccl on CUDA, gloo on CPU); returns the device mesh."""
    kind = torch.device(device).type
    backend = "nccl" if kind == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return init_device_mesh(kind, (world,))


class _Root(torch.nn.Module):
    """The root FSDP unit: a call through it gathers the weights outside the blocks (embeddings, norm, LM head)
    for the computation it runs, which reaches into the model beyond its `forward` (the chunked LM head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, compute, *args):
        return compute(*args)


class ShardedPolicy(HFPolicy):
    """An HFPolicy whose model is sharded over `mesh`; a rank of its branch's worker group."""

    lockstep = True  # passes with gradients are collective (copd.backends.local.learning)
    # One forward per pass: FSDP's hooks then run in the same order on every rank, whatever the pass's rows.
    shared_prefill = False

    def __init__(self, name: str, model, tokenizer, *args, mesh, **kwargs):
        self.names = [n for n, _ in model.named_parameters()]  # torch.optim's order: optimizer.pt's indices
        self.tied = _tied_names(model)
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        model.to("cpu" if mesh.device_type == "cpu" else f"cuda:{torch.cuda.current_device()}")
        self.units = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for unit in self.units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        self.root = _Root(model)
        fully_shard(self.root, mesh=mesh, reshard_after_forward=True)
        self.units.append(self.root)
        self.root(lambda: None)  # FSDP sets its units up on the root's first call; a rank may first sample, gathered
        kwargs["device"] = str(next(model.parameters()).device)
        super().__init__(name, model, tokenizer, *args, **kwargs)

    # ---- passes --------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self):
        """Every unit's full weights for the time of the block: each rank runs passes of its own (no collectives).
        Re-entrant: only the outermost block gathers and frees."""
        self._gathered = getattr(self, "_gathered", 0) + 1
        if self._gathered == 1:
            for unit in self.units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
        try:
            yield
        finally:
            self._gathered -= 1
            if not self._gathered:
                for unit in self.units:
                    unit.reshard()
                    unit.set_reshard_after_forward(True, recurse=False)

    def _no_grad_passes(self):
        return self.gathered()

    def update(self, rl, opd, spec):
        # A row every rank has, for the idle passes that keep the ranks' passes in step.
        whole = rl[0].resolved().rollouts if rl else opd[0].rollouts
        self._spare = whole.micro(torch.arange(1), 1).to(self.device)
        return super().update(rl, opd, spec)

    def _completion_values(self, rollouts, extra_ids_B_T_J=None, topk: int = 0):
        return self.root(super()._completion_values, rollouts, extra_ids_B_T_J, topk)

    def generate_share(self, prompts, n, params, seed, share):
        with self.gathered():
            return super().generate_share(prompts, n, params, seed, share)

    def score(self, rollouts, request=None):
        with self.gathered():
            return super().score(rollouts, request)

    def _token_logprobs(self, rollouts):
        with self.gathered():
            return super()._token_logprobs(rollouts)

    def supervised_loss(self, prompts, answers):
        return self.root(super().supervised_loss, prompts, answers)

    # ---- what the ranks agree on (hooks of copd.backends.local.learning) ------------------
    def _normaliser(self, mask_B_T, aggregation: str) -> torch.Tensor:
        """The part's normaliser over every rank's rows: each rank's count, summed."""
        total = part_count(mask_B_T, aggregation).to(self.device, torch.float64)
        dist.all_reduce(total)
        return total.clamp(min=1).to(torch.float32)

    def _backward(self, loss: torch.Tensor) -> None:
        """FSDP averages the ranks' gradients; each rank's loss is already normalised by the whole part, so the
        sum is wanted: the average of world x loss (gloo has no reduce-scatter with another divisor)."""
        (loss * self.world).backward()

    def _passes(self, count: int) -> int:
        """The most micro-batches any rank has in this part: every rank runs that many passes."""
        most = torch.tensor(count, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most)

    def _idle_pass(self) -> None:
        """A pass that adds nothing (a zero loss on one row) but takes part in the collectives."""
        (self._completion_values(self._spare).logprobs_B_T.sum() * 0.0).backward()

    def _agree(self, finite: bool) -> bool:
        """Whether every rank's losses were finite."""
        bad = torch.tensor(int(not finite), device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad)

    def _share(self, rows: torch.Tensor, rollouts) -> torch.Tensor:
        """This rank's whole prompt groups of a mini-batch's rows (copd.backends.local.microbatch.rank_rows)."""
        return rank_rows(rows, prompt_group(rollouts), self.rank, self.world)

    def _reduce(self, tallies: list[Tally]) -> None:
        """Every rank's tallies summed, so their means are over the whole step's tokens."""
        mine = [(t.sums, t.weights) for t in tallies]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        for index, tally in enumerate(tallies):
            tally.sums = _sum_dicts([ranks[index][0] for ranks in everyone])
            tally.weights = _sum_dicts([ranks[index][1] for ranks in everyone])

    # ---- weights and checkpoints (rank 0 writes, every rank takes part) ---------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (CPU), {} on the others; a tied weight under its first name only,
        as transformers saves it."""
        return {k: v for k, v in get_model_state_dict(self.model, options=GATHER).items() if k not in self.tied}

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self._with_twins(self.full_state())  # as HFPolicy.get_weights: every state_dict name

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        state = self._with_twins(dict(weights)) if self.rank == 0 else {}
        set_model_state_dict(self.model, state, options=SCATTER)

    def save_checkpoint(self, folder: Path) -> None:
        model = self.full_state()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=GATHER)
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            kept = {k: v.contiguous() for k, v in model.items()}
            save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
            torch.save(_by_index(optim, self.names), folder / "optimizer.pt")
        dist.barrier()

    def load_checkpoint(self, folder: Path) -> None:
        model = self._with_twins(load_file(str(folder / "model.safetensors"))) if self.rank == 0 else {}
        set_model_state_dict(self.model, model, options=SCATTER)
        optim = _by_name(torch.load(folder / "optimizer.pt", map_location="cpu"), self.names) if self.rank == 0 else {}
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=SCATTER)

    def save_pretrained(self, folder: Path) -> None:
        state = self.full_state()
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
        dist.barrier()

    def export_weights(self, folder: Path) -> int:
        state = self.full_state()
        written = export_state(self.model, folder, state) if self.rank == 0 else 0
        dist.barrier()
        return written

    def _with_twins(self, state: dict) -> dict:
        """Tied weights under every one of their names (a file holds one name of each)."""
        for twin, kept in self.tied.items():
            if twin not in state and kept in state:
                state[twin] = state[kept]
            elif kept not in state and twin in state:
                state[kept] = state[twin]
        return state

    def close(self) -> None:
        """Leave the group together: a rank that tears gloo down while a peer still works can abort at exit."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _tied_names(model) -> dict[str, str]:
    """{name: the first name of the same tensor} for parameters registered under several names (a tied LM head)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _sum_dicts(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _by_index(optim: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint) as torch.optim keys it: by parameter index."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in optim["param_groups"]]
    return {"state": {index[name]: value for name, value in optim["state"].items()}, "param_groups": groups}


def _by_name(optim: dict, names: list[str]) -> dict:
    """torch.optim's index-keyed state (optimizer.pt) keyed by parameter name."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": {names[i]: value for i, value in optim["state"].items()}, "param_groups": groups}
