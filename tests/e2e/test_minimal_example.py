"""examples/minimal_copd.py runs end to end, and its first update is the library's update on the same batch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import LossSpec, RLPart, Rollouts
from copd.config.schema import TinyModelConfig
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minimal_copd.py"
# Small, but warm-started enough that the first RL batch has groups with different rewards (a non-zero update).
TINY_FLAGS = [
    "--warmup-steps", "150", "--warmup-lr", "3e-3", "--cycles", "1", "--rl-steps", "1", "--opd-steps", "1",
    "--prompts", "4", "--group", "4", "--opd-prompts", "4", "--opd-samples", "2",
    "--hidden", "64", "--layers", "1", "--test-size", "8", "--threads", "1",
]
ACCURACY = re.compile(r"^accuracy (base|merged): sort=([-\d.]+)% reversal=([-\d.]+)%$", re.MULTILINE)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """(stdout, the file --save-first-update wrote) of one tiny run of the example."""
    saved = tmp_path_factory.mktemp("minimal") / "first_update.pt"
    done = subprocess.run([sys.executable, str(EXAMPLE), *TINY_FLAGS, "--save-first-update", str(saved)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, saved


def test_minimal_example_runs_and_reports_accuracies(example_run):
    stdout, _ = example_run
    found = {label: (float(sort), float(rev)) for label, sort, rev in ACCURACY.findall(stdout)}
    assert set(found) == {"base", "merged"}, stdout
    for label, values in found.items():
        assert all(0.0 <= v <= 100.0 for v in values), (label, values)
    # Both phases of Algorithm 1 ran.
    assert "explore" in stdout and "consolidate" in stdout


def test_the_library_learner_makes_the_example_first_update(example_run):
    """The example's GRPO update (its pg_loss and update) and HFPolicy.update agree on the same batch and weights."""
    saved = torch.load(example_run[1], weights_only=False)
    args, batch = saved["args"], saved["batch"]
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    tiny = TinyModelConfig(architecture="llama", hidden_size=args["hidden"], num_layers=args["layers"], num_heads=4,
                           intermediate_size=3 * args["hidden"], max_positions=64)
    model = build_tiny_model(tiny, tokenizer, seed=args["seed"])
    model.load_state_dict(saved["base"])
    # The example's optimizer: torch's AdamW defaults (weight decay 0.01, the unfused kernel), gradient norm clipped at 1.
    policy = HFPolicy("sort", model, tokenizer, lr=args["lr"], weight_decay=0.01, fused=False)
    rollouts = Rollouts(batch["ids"], batch["mask"], batch["prompt_len"], batch["comp_mask"].float(), batch["texts"])
    spec = LossSpec(eps_low=args["eps_low"], eps_high=args["eps_high"], grad_clip=1.0, step_kl=False)
    result = policy.update([RLPart(rollouts, batch["adv"])], [], spec)
    assert not result.skipped
    after = policy.model.state_dict()
    moved = max((after[k] - saved["base"][k]).abs().max().item() for k in after)
    assert moved > 1e-4  # the update did change the weights, by about lr per weight
    # Bit for bit on the machines tried; the tolerance leaves room for another CPU kind's kernels.
    for key, expected in saved["after"].items():
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
