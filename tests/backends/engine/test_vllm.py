"""(vLLM's environment) The vLLM engine on the real SmolLM2-135M in float32: it agrees with the learner,
takes the learner's weights when synced, and trains and resumes within copd runs.

Skips, saying how to build it, where vLLM's environment is missing (`make vllm`).
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from copd.backends.engine.branch import EngineBranch
from copd.backends.engine.sampler import EngineSampler
from copd.backends.engine.setup import start_engine
from copd.backends.local.factory import make_policy
from copd.backends.roles import SamplingParams, ScoreRequest
from copd.config.loader import load_config
from copd.driver.pipeline import run_training
from copd.models.fetch import fetch_model
from copd.models.sources import load_pretrained
from tests.extras import require, require_vllm

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "smollm2_arith.yaml"
PROMPTS = ["What is 7 plus 5?", "What is 9 times 3?"]
# Engine and learner compute the same float32 model with different kernels: per-token log-probs
# agreed within 2e-4 here (mean 6e-6), so these bounds leave room for other CPUs.
MEAN_TOLERANCE, MAX_TOLERANCE = 1e-4, 2e-3


def overrides(tmp_path, python, name, *more):
    return [f"model.path={fetch_model('smollm2-135m')}", f"sampling.vllm.python={python}", f"run.out={tmp_path / name}",
            *more]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    python = require_vllm()
    folder = fetch_model("smollm2-135m")
    config = load_config(EXAMPLE, [f"model.path={folder}", f"sampling.vllm.python={python}", "sampling.engine=vllm"])
    model, tokenizer = load_pretrained(folder, "float32")
    learner = make_policy("learner", model, tokenizer, lr=1e-4, **config.model.policy_options())
    engine = start_engine(config, "engine", folder, tmp_path_factory.mktemp("logs"), tokenizer)
    yield learner, engine
    engine.close()


def gap(rollouts, learner) -> torch.Tensor:
    """|engine - learner| log-prob of every sampled token."""
    mask = rollouts.completion_mask_B_T.bool()
    return (rollouts.sampler_logprobs_B_T - learner.score(rollouts).token_logprobs_B_T)[mask].abs()


def test_the_engines_log_probs_are_the_learners(smollm2):
    learner, engine = smollm2
    params = SamplingParams(max_new_tokens=16, record_topk=4)
    rollouts = engine.generate(PROMPTS, 4, params, seed=1)
    found = gap(rollouts, learner)
    assert found.mean() < MEAN_TOLERANCE and found.max() < MAX_TOLERANCE
    # The same rollouts from the same seed; finished rows end with EOS, in the mask.
    again = engine.generate(PROMPTS, 4, params, seed=1)
    assert torch.equal(again.input_ids_B_L, rollouts.input_ids_B_L)
    eos = learner.tokenizer.eos_token_id
    for ids, mask in zip(rollouts.completion_ids_B_T, rollouts.completion_mask_B_T):
        length = int(mask.sum())
        assert length == len(ids) or ids[length - 1] == eos
    # The engine's top-4 is the learner's top-4.
    scores = learner.score(rollouts, ScoreRequest(topk=4))
    mask = rollouts.completion_mask_B_T.bool()
    same = (scores.topk_ids_B_T_K.long() == rollouts.topk_ids_B_T_K.long())[mask]
    assert same[:, 0].float().mean() == 1.0 and same.float().mean() > 0.95


def test_a_sync_gives_the_engine_the_learners_new_weights(smollm2, tmp_path):
    learner, engine = smollm2
    branch = EngineBranch("b", learner, engine, tmp_path / "sync")
    branch.supervised_step(PROMPTS, ["12", "27"])  # new weights: the engine now samples from the old ones
    params = SamplingParams(max_new_tokens=12)
    stale = engine.generate(PROMPTS, 2, params, seed=2)
    assert gap(stale, learner).mean() > 100 * MEAN_TOLERANCE
    synced = branch.generate(PROMPTS, 2, params, seed=2)  # stale, so it syncs first
    assert not branch.stale
    found = gap(synced, learner)
    assert found.mean() < MEAN_TOLERANCE and found.max() < MAX_TOLERANCE


# One branch of RL on SmolLM2, short: 2 cycles of 2 RL steps (experts: rl_steps + opd_steps), a checkpoint after cycle 1.
RUN = ["branches=[{name: addsub, capabilities: [add_sub]}]", "schedule.plan=experts", "schedule.cycles=2", "schedule.rl_steps=1", "schedule.opd_steps=1",
       "rl.prompts_per_step=2", "rl.rollouts_per_prompt=4", "sampling.max_new_tokens=12", "eval.samples=4", "optim.lr=1e-5",
       "sampling.engine=vllm", "sampling.eval_engine=vllm", "optim.step_kl_every=0"]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The short run, uninterrupted, in one process."""
    python = require_vllm()
    folder = tmp_path_factory.mktemp("vllm_runs")
    run_dir = run_training(load_config(EXAMPLE, overrides(folder, python, "whole", *RUN)))
    evaluated = json.loads((run_dir / "eval.json").read_text())["models"]
    assert set(evaluated) == {"base", "branch:addsub", "merged"}  # each sampled by the engine from its folder
    return records(run_dir), python


def test_a_run_records_the_engine_gap_and_every_sync(reference):
    rows, _ = reference
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["engine_logprob_gap"] < MEAN_TOLERANCE and r["engine_weight_mean"] == pytest.approx(1.0, abs=1e-3) for r in rows)
    assert all(r["sync_bytes"] > 5e8 for r in rows)  # 134.5M float32 weights after every update


def test_a_run_whose_engine_is_killed_resumes_like_any_other(tmp_path, monkeypatch, reference):
    rows, python = reference
    generate, killed = EngineSampler.generate, []

    def killing(self, prompts, n, params, seed):  # the engine dies in step 3, after cycle 1's checkpoint
        if not killed and json_steps(tmp_path / "killed") == 2:
            killed.append(self.engine.pid)
            os.kill(self.engine.pid, signal.SIGKILL)
        return generate(self, prompts, n, params, seed)

    monkeypatch.setattr(EngineSampler, "generate", killing)
    resumed = run_training(load_config(EXAMPLE, overrides(tmp_path, python, "killed", *RUN)))
    assert killed
    assert_same_run(records(resumed), rows)


@pytest.mark.slow  # 2.5 min more (`pytest -m slow tests/backends/engine`): not in CI
def test_engines_on_ray_give_the_run_in_one_process(tmp_path, reference):
    rows, python = reference
    require("ray")
    remote = run_training(load_config(EXAMPLE, overrides(tmp_path, python, "ray", *RUN, "run.backend=ray")))
    import ray

    ray.shutdown()
    assert_same_run(records(remote), rows)


def assert_same_run(mine: list[dict], theirs: list[dict]) -> None:
    """The same steps, rewards and tokens; losses to float rounding (a restarted engine's batches may round differently)."""
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert a["reward"] == b["reward"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)


def json_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0
