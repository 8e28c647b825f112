"""The driver (copd.driver.trainer.Trainer) against a fake policy: no model, tiny tensors, exact checks."""

import itertools
import json

import pytest

from copd.backends.roles import OPDPart, RLPart, SamplingParams
from copd.driver.pipeline import load_capabilities
from copd.driver.trainer import Trainer
from copd.errors import BranchLost, BranchNotStarted, CopdError
from copd.schedule.plan import Phase
from copd.schedule.topology import Edge
from tests.fakes import BRANCHES, FakePolicy, V, make_config

SKILL = {"add": 0.6, "rev": 0.3, "cnt": 0.8}


def make_trainer(tmp_path, sub="run", log=None, policy_kw=None, trackers=None, **sections):
    run_dir = tmp_path / sub
    run_dir.mkdir(exist_ok=True)
    config = make_config(run_dir, **sections)
    log = [] if log is None else log
    policies = {b.name: FakePolicy(b.name, log, SKILL[b.name], [SKILL[b.name] * i for i in range(V)],
                                   **(policy_kw or {}).get(b.name, {})) for b in config.branches}
    trainer = Trainer(config, run_dir, policies, load_capabilities(config), trackers=trackers)
    step = trainer.step

    def logged_step(phase):
        log.append(("step", trainer.state.global_step + 1, phase.name))
        step(phase)

    trainer.step = logged_step
    return trainer, log


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plain(recs):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in recs]  # without the wall clock


def keyed(recs):
    return {(r["step"], r.get("branch") or r["edge"]): r for r in plain(recs)}


def states(trainer):
    return {name: p.state for name, p in trainer.learners.items()}


def test_plan_steps_and_metrics_records(tmp_path):
    trainer, log = make_trainer(tmp_path)
    trainer.run()
    phases = ["explore", "explore", "consolidate", "consolidate"] * 2
    assert [e[1:] for e in log if e[0] == "step"] == list(zip(range(1, 9), phases))
    recs = records(trainer.run_dir)
    branch = [r for r in recs if r["type"] == "branch"]
    edge = [r for r in recs if r["type"] == "edge"]
    assert sorted((r["step"], r["branch"]) for r in branch) == [(s, b) for s in range(1, 9) for b in ("add", "rev")]
    assert sorted((r["step"], r["edge"]) for r in edge) == [(s, e) for s in (3, 4, 7, 8) for e in ("add<-rev", "rev<-add")]
    for r in recs:
        assert r["cycle"] == (1 if r["step"] <= 4 else 2)
        assert r["phase"] == ("consolidate" if r["step"] in (3, 4, 7, 8) else "explore")
    for r in branch:
        assert {"reward", "loss", "tokens", "seconds"} <= r.keys() and r["skipped"] is False
        assert 0 <= r["reward"] <= 1 and r["reward/" + ("addition" if r["branch"] == "add" else "reversal")] == pytest.approx(r["reward"])
    for r in edge:
        assert {"overlap_topk", "sym_kl", "delta_mean", "tokens"} <= r.keys()
        assert r["edge"] == f"{r['student']}<-{r['teacher']}"


def test_teachers_score_before_any_update_of_the_step(tmp_path):
    trainer, log = make_trainer(tmp_path)
    trainer.run()
    steps = [i for i, e in enumerate(log) if e[0] == "step"] + [len(log)]
    consolidate = 0
    for start, end in itertools.pairwise(steps):
        events = log[start:end]
        kinds = [e[0] for e in events]
        if events[0][2] == "consolidate":
            consolidate += 1
            assert kinds.count("score") == 2
            assert max(i for i, k in enumerate(kinds) if k == "score") < min(i for i, k in enumerate(kinds) if k == "update")
        else:
            assert "score" not in kinds
    assert consolidate == 4
    beta = {"add": 0.1, "rev": 0.3}
    for _, name, rl, opd in (e for e in log if e[0] == "update"):  # student's beta and rollouts
        assert rl == [name] and all(p[:3] == (f"{name}<-{'rev' if name == 'add' else 'add'}", beta[name], name) for p in opd)


@pytest.mark.parametrize("topology", [{"kind": "pair"}, {"kind": "mesh"}, {"kind": "hub", "hub": "rev"}])
def test_branch_order_does_not_matter(tmp_path, topology):
    three = [*BRANCHES, {"name": "cnt", "capabilities": ["count"], "beta": 0.2}]
    branches = BRANCHES if topology["kind"] == "pair" else three
    a, _ = make_trainer(tmp_path, "fwd", branches=branches, topology=topology)
    b, _ = make_trainer(tmp_path, "rev", branches=branches[::-1], topology=topology)
    a.run()
    b.run()
    assert states(a) == states(b)
    assert keyed(records(a.run_dir)) == keyed(records(b.run_dir)) and len(records(a.run_dir)) == len(records(b.run_dir))


def test_parts_reach_the_right_branches(tmp_path):
    trainer, log = make_trainer(tmp_path)
    # A phase where 'rev' only learns from 'add' (no RLVR), and 'add' only does RLVR.
    trainer.plan = [Phase("consolidate", 1, 2, ("add",), (Edge("rev", "add"),))]
    trainer.run()
    updates = [e for e in log if e[0] == "update"]
    assert len(updates) == 4
    for _, name, rl, opd in updates:
        if name == "add":
            assert rl == ["add"] and opd == []
        else:
            assert rl == [] and len(opd) == 1
            edge, beta, made_by, prompts = opd[0]
            assert (edge, beta, made_by) == ("rev<-add", 0.3, "rev")  # student's beta, student's rollouts
            assert all("+" in p for p in prompts)  # on the teacher's data
    recs = records(trainer.run_dir)
    assert {r["edge"] for r in recs if r["type"] == "edge"} == {"rev<-add"}
    assert all(("reward" in r) == (r["branch"] == "add") for r in recs if r["type"] == "branch")


def test_checkpoint_after_every_cycle_and_pruned(tmp_path):
    trainer, _ = make_trainer(tmp_path, schedule={"cycles": 4, "rl_steps": 1, "opd_steps": 1})
    root, seen = trainer.run_dir / "checkpoints", []
    save = trainer._checkpoint

    def checkpoint(cycle):
        save(cycle)
        seen.append((cycle, trainer.state.global_step, sorted(p.name for p in root.iterdir())))

    trainer._checkpoint = checkpoint
    trainer.run()
    assert [s[:2] for s in seen] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    for cycle, _, listing in seen:
        assert f"cycle_{cycle:04d}" in listing and len(listing) <= 2
        assert not any(n.startswith(".tmp-") for n in listing)
    assert sorted(p.name for p in root.iterdir()) == ["cycle_0003", "cycle_0004"]
    last = root / "cycle_0004"
    assert json.loads((last / "state.json").read_text())["global_step"] == 8
    for name in ("add", "rev"):
        assert json.loads((last / "branches" / name / "state.json").read_text()) == trainer.learners[name].state


@pytest.mark.parametrize("crash_after", [1, 6])  # in cycle 1 (no checkpoint yet), in cycle 2
def test_resume_after_crash_replays_exactly(tmp_path, crash_after):
    full, _ = make_trainer(tmp_path, "full")
    full.run()
    broken, _ = make_trainer(tmp_path, "run", policy_kw={"rev": {"crash_after": crash_after}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        broken.run()
    assert (broken.run_dir / "checkpoints").exists() == (crash_after > 4)
    resumed, _ = make_trainer(tmp_path, "run")
    resumed.run(resume=True)
    assert states(resumed) == states(full)
    assert plain(records(resumed.run_dir)) == plain(records(full.run_dir))


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    trainer, _ = make_trainer(tmp_path)
    trainer.run()
    before = (trainer.run_dir / "metrics.jsonl").read_text()
    again, log = make_trainer(tmp_path)
    again.run(resume=True)
    assert states(again) == states(trainer) and not [e for e in log if e[0] == "update"]
    assert (trainer.run_dir / "metrics.jsonl").read_text() == before


def test_always_non_finite_stops_the_run_naming_the_branch(tmp_path):
    trainer, _ = make_trainer(tmp_path, policy_kw={"rev": {"skip": lambda n: True}})
    with pytest.raises(CopdError, match=r"'rev'.*3 non-finite.*step 3.*no checkpoint"):
        trainer.run()
    rev = [r for r in records(trainer.run_dir) if r.get("branch") == "rev"]
    assert [r["step"] for r in rev] == [1, 2, 3] and all(r["skipped"] is True for r in rev)
    assert all(r["skipped"] is False for r in records(trainer.run_dir) if r.get("branch") == "add")


def test_one_non_finite_loss_does_not_stop_the_run(tmp_path):
    trainer, _ = make_trainer(tmp_path, policy_kw={"rev": {"skip": lambda n: n in (2, 5, 6)}})
    trainer.run()
    rev = {r["step"]: r["skipped"] for r in records(trainer.run_dir) if r.get("branch") == "rev"}
    assert [s for s, skipped in rev.items() if skipped] == [2, 5, 6] and len(rev) == 8
    assert trainer.state.nan_skipped == {"add": 0, "rev": 3}
    assert trainer.state.nan_in_row == {"add": 0, "rev": 0}


@pytest.mark.parametrize("every", [0, 2])
def test_diagnostics_every_n_opd_steps_and_only_token_logprobs_in_between(tmp_path, every):
    trainer, _ = make_trainer(tmp_path, opd={"diagnostics_every": every})
    trainer.run()
    edges = [r for r in records(trainer.run_dir) if r["type"] == "edge"]
    opd_steps = sorted({r["step"] for r in edges})
    assert opd_steps == [3, 4, 7, 8]
    rows = 2 * 3  # opd prompts x rollouts per prompt; the fake scores in float64, 3 tokens a row
    for r in edges:
        due = every > 0 and opd_steps.index(r["step"]) % every == 0
        assert ("overlap_topk" in r) == due and ("sym_kl" in r) == due
        # Token log-probs only, or plus the support: the teacher's top-16 (5 ids here) and the student's 5.
        assert r["score_bytes"] == rows * 3 * 8 + (rows * 3 * 10 * (4 + 8) if due else 0)


def test_resume_replays_the_diagnostics_steps(tmp_path):
    full, _ = make_trainer(tmp_path, "full", opd={"diagnostics_every": 3})
    full.run()
    broken, _ = make_trainer(tmp_path, "run", policy_kw={"rev": {"crash_after": 6}}, opd={"diagnostics_every": 3})
    with pytest.raises(RuntimeError, match="simulated crash"):
        broken.run()
    resumed, _ = make_trainer(tmp_path, "run", opd={"diagnostics_every": 3})
    resumed.run(resume=True)
    assert plain(records(resumed.run_dir)) == plain(records(full.run_dir))



class Opaque:
    """Rollouts as the driver sees them from a remote sampler: only the completions' texts (and the size) are readable."""

    def __init__(self, inner):
        self.inner, self.completions, self.nbytes = inner, inner.completions, inner.nbytes

    def __getattr__(self, name):
        raise AssertionError(f"the driver read rollouts.{name}")


class RemoteLike(FakePolicy):
    """A fake whose rollouts never show their tensors to the driver (as with rollouts kept in another process)."""

    def generate(self, prompts, n, params, seed):
        return Opaque(super().generate(prompts, n, params, seed))

    def score(self, rollouts, request=None):
        return super().score(rollouts.inner, request)

    def update(self, rl, opd, spec):
        rl = [RLPart(p.rollouts.inner, p.advantages, p.rows) for p in rl]
        opd = [OPDPart(p.rollouts.inner, p.teacher, p.beta, p.edge) for p in opd]
        return super().update(rl, opd, spec)


def test_the_driver_needs_only_the_completions_texts(tmp_path):
    config = make_config(tmp_path / "run", rl={"filter_zero_signal": True})
    (tmp_path / "run").mkdir()
    log = []
    policies = {b.name: RemoteLike(b.name, log, SKILL[b.name], [SKILL[b.name] * i for i in range(V)]) for b in config.branches}
    Trainer(config, tmp_path / "run", policies, load_capabilities(config)).run()
    plain_run, _ = make_trainer(tmp_path, "plain", rl={"filter_zero_signal": True})
    plain_run.run()
    assert plain(records(tmp_path / "run")) == plain(records(plain_run.run_dir))


def test_the_step_kl_is_asked_for_on_every_nth_step(tmp_path, monkeypatch):
    asked = []
    update = FakePolicy.update
    monkeypatch.setattr(FakePolicy, "update", lambda self, rl, opd, spec: asked.append(
        (self.name, spec.step_kl)) or update(self, rl, opd, spec))
    trainer, _ = make_trainer(tmp_path, optim={"step_kl_every": 3})
    trainer.run()
    steps = trainer.state.global_step  # 2 cycles of 2 RL + 2 OPD steps
    assert steps == 8
    by_branch = {name: [flag for n, flag in asked if n == name] for name in ("add", "rev")}
    assert by_branch["add"] == [(i - 1) % 3 == 0 for i in range(1, steps + 1)]  # steps 1, 4, 7
    assert by_branch["rev"] == by_branch["add"]


class LostWithItsNode(FakePolicy):
    """A branch whose worker is lost in cycle 2 and whose new one cannot be placed (its node is gone)."""

    def update(self, rl, opd, spec):
        if self.state["updates"] == 5:
            raise BranchLost(self.name, "its update")
        return super().update(rl, opd, spec)

    def restart(self):
        raise BranchNotStarted(self.name, "could not be placed or started within 5 s")


def test_a_restart_that_fails_stops_the_run_with_one_line_saying_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = make_config(run_dir)
    policies = {"add": FakePolicy("add", []), "rev": LostWithItsNode("rev", [])}
    with pytest.raises(CopdError) as failed:
        Trainer(config, run_dir, policies, load_capabilities(config)).run()
    assert type(failed.value) is CopdError and str(failed.value) == (
        "branch 'rev' was lost during its update (step 6); the restart failed: branch 'rev': its new actor could not be "
        f"placed or started within 5 s; resume with --resume {run_dir}")
    assert (run_dir / "checkpoints" / "cycle_0001" / "state.json").is_file()


def test_held_out_accuracy_is_recorded_before_training_and_every_n_steps(tmp_path):
    trainer, _ = make_trainer(tmp_path, eval={"every": 3, "samples": 5})
    trainer.run()
    evals = [r for r in records(trainer.run_dir) if r["type"] == "eval"]
    assert [(r["step"], r["branch"]) for r in evals] == [(s, b) for s in (0, 3, 6) for b in ("add", "rev")]
    capabilities = load_capabilities(trainer.config)
    # Step 0 scores the untrained branches: the fake answers right with probability `skill`, keyed by prompt.
    for r in evals[:2]:
        fake = FakePolicy(r["branch"], [], SKILL[r["branch"]])
        for name, cap in capabilities.items():
            right = [fake.generate([s.prompt], 1, SamplingParams(), 7).completions[0] == s.answer for s in cap.test_set(5)]
            assert r[f"greedy/{name}"] == pytest.approx(sum(right) / 5)
    # Scoring is read-only: the run trains exactly as one without it.
    plain_run, _ = make_trainer(tmp_path, "plain")
    plain_run.run()
    assert states(plain_run) == states(trainer)


def test_a_resumed_run_records_the_same_held_out_curve(tmp_path):
    full, _ = make_trainer(tmp_path, "full", eval={"every": 2, "samples": 3})
    full.run()
    broken, _ = make_trainer(tmp_path, "run", policy_kw={"rev": {"crash_after": 6}}, eval={"every": 2, "samples": 3})
    with pytest.raises(RuntimeError, match="simulated crash"):
        broken.run()
    resumed, _ = make_trainer(tmp_path, "run", eval={"every": 2, "samples": 3})
    resumed.run(resume=True)
    assert plain(records(resumed.run_dir)) == plain(records(full.run_dir))
