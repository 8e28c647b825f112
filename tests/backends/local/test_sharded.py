"""A branch sharded over two gloo ranks (FSDP2) updates, scores and checkpoints as one rank does."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import LossSpec, OPDPart, RLPart, SamplingParams
from tests.backends.local.test_hf import tiny_policy

PROMPTS = ["1+2=", "33+4=", "5+60=", "7+8=", "9+10=", "1+1="]
# fp32 on CPU. A rank computes each row in one forward (the reference runs a prompt once and its completions on
# its cache) and the ranks' gradients are summed in another order: gradients agree to about 1e-7, and AdamW's first
# step (lr 1e-2, about lr x sign(g)) turns that into at most ~2e-6 on weights whose gradient is near 0.
ATOL, RTOL = 1e-5, 1e-5


def parts(policy: HFPolicy):
    """An RL part with a zero-signal group dropped (5 groups: 3 and 2 per rank) and one OPD edge, from `policy`."""
    rollouts = policy.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6, temperature=1.0), seed=5)
    teacher = tiny_policy("t", seed=1).score(rollouts)
    rows = torch.arange(4, 24)  # the first prompt's group left out
    advantages = torch.linspace(-1, 1, 20)
    return [RLPart(rollouts, advantages, rows)], [OPDPart(rollouts, teacher, 0.5, "t->p")]


SPECS = {
    "plain": LossSpec(),
    "mini_batches": LossSpec(mini_batches=2, step_kl=True, aggregation="seq_mean"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, spec_name: str, budget: int, out: str) -> None:
    from copd.backends.local.sharded import ShardedPolicy, join_group

    torch.set_num_threads(1)
    mesh = join_group("127.0.0.1", port, rank, world, "cpu", 120)
    reference = tiny_policy()
    policy = ShardedPolicy("p", reference.model, reference.tokenizer, lr=1e-2, micro_batch_tokens=budget, mesh=mesh)
    rl, opd = parts(tiny_policy())
    result = policy.update(rl, opd, SPECS[spec_name])
    scores = policy.score(rl[0].rollouts)
    policy.save_checkpoint(Path(out) / "checkpoint")
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps({"metrics": result.metrics, "edges": result.edge_metrics}))
        torch.save(scores.token_logprobs_B_T, Path(out) / "scores.pt")
    policy.close()


def run_ranks(world: int, spec_name: str, budget: int, out: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(world, _free_port(), spec_name, budget, str(out)), nprocs=world)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_two_ranks_update_as_one_rank_does(tmp_path, spec_name):
    # A budget of one or two rows per pass: the ranks hold 3 and 2 RL groups, so they run
    # different numbers of passes and the shorter one runs idle ones.
    budget = 24
    reference = tiny_policy()
    reference.micro_batch_tokens = budget
    rl, opd = parts(tiny_policy())
    expected = reference.update(rl, opd, SPECS[spec_name])
    run_ranks(2, spec_name, budget, tmp_path)

    found = json.loads((tmp_path / "metrics.json").read_text())
    for key, value in expected.metrics.items():
        if key != "update_seconds":
            assert found["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for key, value in expected.edge_metrics["t->p"].items():
        assert found["edges"]["t->p"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # The checkpoint is the one-rank format: HFPolicy loads the weights and AdamW moments the ranks wrote.
    loaded = tiny_policy()
    loaded.load_checkpoint(tmp_path / "checkpoint")
    for (name, a), b in zip(reference.model.named_parameters(), loaded.model.parameters()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=name)
    for a, b in zip(reference.optimizer.state.values(), loaded.optimizer.state.values()):
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(torch.load(tmp_path / "scores.pt"), reference.score(rl[0].rollouts).token_logprobs_B_T,
                               atol=1e-5, rtol=1e-5)


def _resume(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from copd.backends.local.sharded import ShardedPolicy, join_group

    torch.set_num_threads(1)
    mesh = join_group("127.0.0.1", port, rank, world, "cpu", 120)
    base = tiny_policy(seed=3)  # other weights: all of them must come from the checkpoint
    policy = ShardedPolicy("p", base.model, base.tokenizer, lr=1e-2, mesh=mesh)
    policy.load_checkpoint(Path(folder))
    rl, opd = parts(tiny_policy())
    policy.update(rl, opd, LossSpec())
    policy.save_checkpoint(Path(out))
    policy.close()


def test_a_checkpoint_of_one_rank_resumes_on_two_and_back(tmp_path):
    one = tiny_policy()
    rl, opd = parts(tiny_policy())
    one.update(rl, opd, LossSpec())
    one.save_checkpoint(tmp_path / "one")
    mp.spawn(_resume, args=(2, _free_port(), str(tmp_path / "one"), str(tmp_path / "two")), nprocs=2)
    one.update(rl, opd, LossSpec())  # the same second step on one rank
    again = tiny_policy(seed=3)
    again.load_checkpoint(tmp_path / "two")
    for a, b in zip(one.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    assert again.optimizer.state_dict()["state"][0]["step"] == 2
