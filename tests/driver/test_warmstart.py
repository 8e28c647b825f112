"""The warm start's stop rules, on a scripted policy and scripted pass rates."""

from __future__ import annotations

import types

import copd.driver.warmstart as warmstart
from copd.capabilities import load_capability
from copd.reporting.progress import QuietReporter
from tests.fakes import make_config

# Sampled pass rates at checks 1, 2, 3, ...: addition is learnt first, count last.
RATES = [{"addition": 0.1, "reversal": 0.0, "count": 0.0},
         {"addition": 0.5, "reversal": 0.1, "count": 0.1},
         {"addition": 0.3, "reversal": 0.6, "count": 0.2},
         {"addition": 0.2, "reversal": 0.3, "count": 0.7}]


class Recorder:
    """Stands in for the warm start's policy."""

    def supervised_step(self, prompts, answers, grad_clip):
        return 0.0


BRANCHES = [{"name": "a", "capabilities": ["addition"]}, {"name": "b", "capabilities": ["reversal", "count"]}]


def run(monkeypatch, per_capability):
    config = make_config("unused", BRANCHES, warmup={"check_every": 2, "min_pass_rate": 0.4, "batch_size": 12,
                                           "max_steps": 100, "per_capability": per_capability})
    caps = [load_capability(c) for c in config.capabilities]
    checks, drawn = iter(RATES + [RATES[-1]] * 60), []

    class Spy(warmstart.MixtureSampler):  # records which capabilities each batch drew from
        def draw(self, n):
            batch = super().draw(n)
            drawn.append({cap.name for cap, _ in batch})
            return batch

    monkeypatch.setattr(warmstart, "MixtureSampler", Spy)
    monkeypatch.setattr(warmstart, "make_policy", lambda *a, **k: Recorder())
    monkeypatch.setattr(warmstart, "pass_rates", lambda *a, **k: next(checks))
    model = types.SimpleNamespace(device="cpu")
    info = warmstart.warm_start(model, None, config, caps, QuietReporter())
    return info, drawn


def test_each_capability_leaves_the_mixture_once_it_reaches_the_rate(monkeypatch):
    info, drawn = run(monkeypatch, per_capability=True)
    # addition reached 0.4 at check 2 (step 4), reversal at check 3 (step 6), count at check 4 (step 8).
    assert info["steps"] == 8 and info["left_early"] == ["addition", "reversal", "count"]
    assert drawn[:4] == [{"addition", "reversal", "count"}] * 4
    assert drawn[4:6] == [{"reversal", "count"}] * 2 and drawn[6:8] == [{"count"}] * 2


def test_without_it_every_capability_trains_until_all_reach_the_rate_together(monkeypatch):
    info, drawn = run(monkeypatch, per_capability=False)
    # No check has all three at 0.4 (addition has fallen back by check 4): max_steps ends it.
    assert info["steps"] == 100 and info["left_early"] == []
    assert all(d == {"addition", "reversal", "count"} for d in drawn)
