"""The driver: runs a plan of phases over policies, logs every step, checkpoints every cycle.

It never branches on the method: a phase says which branches do RLVR and which OPD edges
are active, and one step is always (1) sample every branch's RL and OPD rollouts,
(2) let the teachers score the students' rollouts, (3) update every branch. Because all
scoring happens before any update, teachers are the branches as they were at the start
of the step (Algorithm 1, Phase II) and the branch order never matters.

It talks to each branch's roles (copd.backends.roles.BranchRoles: sampler, scorer,
learner), never to a model. Teachers send sparse scores (docs/method.md §4): the sampled
tokens' log-probs always, and the top-k support only on steps where the estimator or the
diagnostics need it; each edge record says how many bytes crossed (`score_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from copd.backends.roles import BranchRoles, LossSpec, OPDPart, Policy, Rollouts, SamplingParams, settle
from copd.capabilities import Capability
from copd.config.schema import Config
from copd.core.opd import OPD_ESTIMATORS
from copd.driver.adopt import expert_weights, experts_of
from copd.driver.checkpoint import latest_checkpoint, load_latest_intact, save_checkpoint
from copd.driver.rollout import MixtureSampler, RLBatch, StartedRL, collect_opd_part, collect_opd_rollouts, derived_seed, finish_rl, start_rl
from copd.driver.run_state import RunState
from copd.driver.step_clock import StepClock, branch_costs
from copd.errors import BranchLost, BranchNotStarted, CopdError
from copd.evaluation.diagnose import measure_pair
from copd.evaluation.evaluate import pass_rates
from copd.reporting.progress import QuietReporter, Reporter
from copd.reporting.trackers import Trackers
from copd.schedule.plan import TOPOLOGY_PLANS, Phase, Students, build_plan, with_overlap_trigger, with_probes
from copd.schedule.topology import build_edges


class MetricsLog:
    """metrics.jsonl: one JSON record per line, appended and flushed as training goes; each
    record also goes to the run's experiment trackers (run.report_to)."""

    def __init__(self, path: Path, trackers: Trackers | None = None):
        self.path, self.trackers = path, trackers or Trackers()
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0

    def truncate(self, lines: int, step: int) -> None:
        """Drop records written after the checkpoint being resumed (at global step `step`), so they are not duplicated."""
        kept = self.path.read_text().splitlines(keepends=True)[:lines] if self.path.exists() else []
        self.path.write_text("".join(kept))
        self.lines = len(kept)
        self.trackers.rewind(step)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        self.trackers.record(record)


def loss_spec(config: Config) -> LossSpec:
    return LossSpec(
        aggregation=config.rl.loss_aggregation,
        eps_low=config.rl.eps_low,
        eps_high=config.rl.eps_high,
        opd_estimator=config.opd.estimator,
        overlap_k=config.opd.overlap_k,
        epochs=config.rl.epochs,
        mini_batches=config.optim.mini_batches,
        grad_clip=config.optim.grad_clip,
        correction=config.sampling.vllm.correction,
        correction_cap=config.sampling.vllm.correction_cap,
    )


class Trainer:
    def __init__(self, config: Config, run_dir: Path, branches: dict[str, Policy | BranchRoles], capabilities: dict[str, Capability],
                 reporter: Reporter | None = None, trackers: Trackers | None = None):
        self.config, self.run_dir = config, run_dir
        # One object playing every role (the local backend) or separate players per role.
        self.roles = {b: r if isinstance(r, BranchRoles) else BranchRoles.of(r) for b, r in branches.items()}
        self.learners = {b: r.learner for b, r in self.roles.items()}
        self.reporter = reporter or QuietReporter()
        names = [b.name for b in config.branches]
        self.plan = plan_of(config)
        self.edges = sorted({e for phase in self.plan for e in phase.edges}, key=lambda e: e.label)
        seed = config.run.seed
        caps_of = {b.name: [capabilities[c] for c in b.capabilities] for b in config.branches}
        self.rl_samplers = {b: MixtureSampler(caps_of[b], derived_seed(seed, "rl", b)) for b in names}
        self.opd_samplers = {e.label: MixtureSampler(caps_of[e.teacher], derived_seed(seed, "opd", e.label)) for e in self.edges}
        probed = {e for phase in self.plan for e in phase.probe_edges}
        self.opd_samplers.update({f"probe:{e.label}": MixtureSampler(caps_of[e.teacher], derived_seed(seed, "probe", e.label)) for e in probed})
        self.capabilities = list(capabilities.values())  # every branch is scored on all of them (eval.every)
        self.beta = {b.name: b.beta for b in config.branches}
        self.spec = loss_spec(config)
        self.sampling = SamplingParams.from_config(config.sampling)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", trackers)
        self.state = RunState.start(names)
        self.initial_samplers = self._sampler_states()

    def _sampler_states(self) -> dict:
        return {"rl_samplers": {b: s.state_dict() for b, s in self.rl_samplers.items()},
                "opd_samplers": {e: s.state_dict() for e, s in self.opd_samplers.items()}}

    def _load_samplers(self, rl_samplers: dict, opd_samplers: dict) -> None:
        for b, s in rl_samplers.items():
            self.rl_samplers[b].load_state_dict(s)
        for e, s in opd_samplers.items():
            self.opd_samplers[e].load_state_dict(s)

    # ---- running the plan --------------------------------------------------------------
    def run(self, resume: bool = False) -> None:
        """Run the plan; a lost branch worker restarts every branch from the last checkpoint (run.max_restarts).

        A restart that fails (a new worker that cannot be placed within run.restart_timeout, or
        is lost while loading the checkpoint) ends the run with one error saying how to resume.
        """
        if resume or self.config.schedule.experts_from:
            self._restore()
        restarts = 0
        while True:
            try:
                return self._run_plan()
            except BranchLost as lost:
                what = f"{lost} (step {self.state.global_step})"
                if restarts >= self.config.run.max_restarts:
                    raise CopdError(f"{what}; {restarts} restarts used (run.max_restarts); resume with --resume {self.run_dir}") from None
                restarts += 1
                self.reporter.stop()
                self.reporter.print(f"{what}; restarting every branch from the last checkpoint ({restarts}/{self.config.run.max_restarts})")
                try:
                    self._start_over()
                except (BranchLost, BranchNotStarted) as failed:
                    raise CopdError(f"{what}; the restart failed: {failed}; resume with --resume {self.run_dir}") from None

    def _start_over(self) -> None:
        """Fresh workers for every branch, then the state of the last checkpoint (or of the start)."""
        for roles in self.roles.values():
            for player in {id(p): p for p in (roles.sampler, roles.scorer, roles.learner)}.values():
                getattr(player, "restart", lambda: None)()
        self.state = RunState.start([b.name for b in self.config.branches])
        self._load_samplers(**self.initial_samplers)
        self._restore()

    def _run_plan(self) -> None:
        total = sum(p.steps for p in self.plan)
        done = sum(p.steps for p in self.plan[: self.state.next_phase])
        self.reporter.start("training", total)
        for _ in range(done):
            self.reporter.advance("resumed")
        if self.state.global_step == self._first_step():
            self._held_out_due(self.state.next_phase)
        for index in range(self.state.next_phase, len(self.plan)):
            phase = self.plan[index]
            for branch, source in phase.forks:  # e.g. static OPD: the student starts as a copy of an expert
                self.learners[branch].set_weights(self.learners[source].get_weights())
            limit = phase.steps + (self.state.take_carry() if phase.absorbs_carry else 0)
            for done in range(1, limit + 1):
                self.step(phase)
                self._held_out_due(index)
                # A trigger needs no probe after the phase's last step; a diagnostic probe does.
                probing = phase.probe_edges and (done < limit or phase.stop_below is None)
                overlap = self._probe(phase) if probing else None
                if overlap is not None and phase.stop_below is not None and overlap < phase.stop_below:
                    self.state.carry = limit - done  # the next phase runs these steps
                    break
            self.state.next_phase = index + 1
            if index + 1 == len(self.plan) or self.plan[index + 1].cycle != phase.cycle:
                self._checkpoint(phase.cycle)
        self.reporter.stop()

    def step(self, phase: Phase) -> None:
        """One step of Algorithm 1 for every branch of the phase: sample, score, update, record.

        Every teacher scores before any branch updates, so teachers are the branches as they
        were at the start of the step. Remote roles answer at once (pending), so all branches
        work side by side until the driver needs an answer.
        """
        self.state.global_step += 1
        if phase.edges:  # counted over the run and checkpointed, so a resumed run measures on the same steps
            self.state.opd_steps += 1
        clock = StepClock(self._active(phase))
        started = self._start_rl(phase, clock)  # x ~ D_k, G rollouts each
        opd_parts = self._collect_opd(phase, clock)  # x' ~ D_j, the student's rollouts, the teacher's scores
        with clock.barrier():
            rl = self._finish_rl(started, clock)  # verifier rewards, group advantages
        pending = self._update(rl, opd_parts, clock)  # L_RL + L_OPD, one update per branch
        with clock.barrier():
            results = {b: settle(answer) for b, answer in pending.items()}
        self._record_step(phase, clock, started, rl, opd_parts, results)

    def _start_rl(self, phase: Phase, clock: StepClock) -> dict[str, StartedRL]:
        cfg, started = self.config, {}
        for b in phase.rl_branches:
            with clock.charge(b):
                started[b] = start_rl(self.roles[b].sampler, self.rl_samplers[b], cfg.rl.prompts_per_step, cfg.rl.rollouts_per_prompt,
                                      self.sampling, derived_seed(cfg.run.seed, "rl", b, self.state.global_step))
        return started

    def _collect_opd(self, phase: Phase, clock: StepClock) -> dict[str, list[OPDPart]]:
        """Each edge: the student samples on the teacher's prompts and the teacher scores them (docs/method.md §4)."""
        cfg, parts = self.config, {b: [] for b in clock.seconds}
        support = bool(phase.edges) and self._needs_support()
        for edge in phase.edges:
            with clock.charge(edge.student):
                part = collect_opd_part(self.roles[edge.student].sampler, self.roles[edge.teacher].scorer, self.opd_samplers[edge.label],
                                        cfg.opd.prompts_per_step, cfg.opd.rollouts_per_prompt, self.sampling,
                                        derived_seed(cfg.run.seed, "opd", edge.label, self.state.global_step),
                                        self.beta[edge.student], edge.label, support, cfg.opd.topk)
            parts[edge.student].append(part)
        return parts

    def _finish_rl(self, started: dict[str, StartedRL], clock: StepClock) -> dict[str, RLBatch]:
        rl, cfg = {}, self.config.rl
        for b, begun in started.items():
            with clock.charge(b):
                rl[b] = finish_rl(begun, cfg.rollouts_per_prompt, cfg.advantage, cfg.filter_zero_signal)
        return rl

    def _update(self, rl: dict[str, RLBatch], opd_parts: dict[str, list[OPDPart]], clock: StepClock) -> dict:
        """Every branch's update on its RL part and its edges' OPD parts (pending while a remote branch works)."""
        every = self.config.optim.step_kl_every  # approx_kl costs one more forward: on steps 1, 1 + N, ...
        spec = dataclasses.replace(self.spec, step_kl=bool(every) and (self.state.global_step - 1) % every == 0)
        pending = {}
        for b in clock.seconds:
            batch = rl.get(b)
            parts = [batch.part] if batch is not None and batch.part is not None else []
            # A canonical order of a student's edges, so listing branches differently cannot
            # change the floating-point sum of its losses.
            opd = sorted(opd_parts[b], key=lambda part: part.edge)
            with clock.charge(b):
                pending[b] = self.learners[b].update(parts, opd, spec) if parts or opd else None
        return pending

    def _record_step(self, phase: Phase, clock: StepClock, started: dict, rl: dict, opd_parts: dict, results: dict) -> None:
        step_times = clock.step_times()
        seconds, sampled = branch_costs(clock.seconds, started, opd_parts, results)
        score_bytes = {part.edge: part.teacher.nbytes for parts in opd_parts.values() for part in parts}
        shown = [self._record(phase, b, rl.get(b), results[b], seconds[b], {**step_times, "rollout_bytes": sampled[b]}, score_bytes)
                 for b in clock.seconds]
        self.reporter.advance(f"cycle {phase.cycle}/{self.config.schedule.cycles} {phase.name}", "  ".join(shown))

    def _held_out_due(self, phase_index: int) -> None:
        """eval.every: greedy accuracy on every capability's test split, as `eval` records, of every branch
        that trains in this phase or a later one (an expert that only teaches from here on is not scored again)."""
        every, step = self.config.eval.every, self.state.global_step
        if not every or step % every:
            return
        greedy = dataclasses.replace(self.sampling, greedy=True)
        tests = {c.name: c.test_set(self.config.eval.samples) for c in self.capabilities}
        training = {b for p in self.plan[phase_index:] for b in (*p.rl_branches, *(e.student for e in p.edges), *dict(p.forks))}
        for branch, roles in self.roles.items():
            if branch not in training:
                continue
            rates = pass_rates(roles.scorer, self.capabilities, tests, greedy, self.config.run.seed, self.config.eval.batch_size)
            self.metrics.write({"step": step, "type": "eval", "branch": branch, **{f"greedy/{c}": v for c, v in rates.items()}})

    def _needs_support(self) -> bool:
        """Whether this OPD step's teachers send the top-k support: the estimator needs it, or diagnostics
        are due (on OPD steps 1, 1 + every, 1 + 2 every, ...)."""
        every = self.config.opd.diagnostics_every
        due = every > 0 and (self.state.opd_steps - 1) % every == 0
        return OPD_ESTIMATORS[self.spec.opd_estimator].needs_support or due

    def _probe(self, phase: Phase) -> float:
        """Mean top-k overlap over the phase's probe edges on the students' own rollouts (logged)."""
        step, cfg, values = self.state.global_step, self.config, []
        for edge in phase.probe_edges:
            rollouts = collect_opd_rollouts(self.roles[edge.student].sampler, self.opd_samplers[f"probe:{edge.label}"], cfg.schedule.probe_prompts,
                                            1, self.sampling.recording(cfg.opd.topk), derived_seed(cfg.run.seed, "probe", edge.label, step))
            found = self._measure(edge, rollouts)
            self.metrics.write({"step": step, "cycle": phase.cycle, "phase": phase.name, "type": "edge", "probe": True, "edge": edge.label,
                                "student": edge.student, "teacher": edge.teacher, **found})
            values.append(found["overlap_topk"])
        return sum(values) / len(values)

    def _measure(self, edge, rollouts: Rollouts) -> dict[str, float]:
        """An OPD step's diagnostics on rollouts that are measured but never trained on."""
        student, teacher = self.roles[edge.student].scorer, self.roles[edge.teacher].scorer
        return measure_pair(student, teacher, rollouts, self.config.opd.overlap_k, self.config.opd.topk)

    def _active(self, phase: Phase) -> list[str]:
        students = [e.student for e in phase.edges]
        return [b.name for b in self.config.branches if b.name in phase.rl_branches or b.name in students]

    # ---- logging and failure handling -------------------------------------------------------
    def _record(self, phase: Phase, branch: str, batch: RLBatch | None, result, seconds: float, step_times: dict,
                score_bytes: dict[str, int]) -> str:
        """Write the branch's (and its edges') records; return a short summary for the progress bar."""
        base = {"step": self.state.global_step, "cycle": phase.cycle, "phase": phase.name}
        record = {**base, "type": "branch", "branch": branch, "seconds": round(seconds, 4), **step_times}
        if batch is not None:
            record.update(reward=sum(batch.rewards) / len(batch.rewards), filtered_groups=batch.filtered_groups,
                          **{f"reward/{k}": v for k, v in batch.by_capability.items()})
        if result is not None:
            record.update(result.metrics, skipped=result.skipped)
            for label, edge in result.edge_metrics.items():
                student, teacher = label.split("<-")
                self.metrics.write({**base, "type": "edge", "edge": label, "student": student, "teacher": teacher, **edge,
                                    "score_bytes": score_bytes.get(label, 0)})
        self.metrics.write(record)
        if result is not None:  # after writing, so the step that stops the run is on record too
            self._count_nan(branch, result.skipped)
        overlaps = [e["overlap_topk"] for e in result.edge_metrics.values() if "overlap_topk" in e] if result else []
        shown = f"{branch} r={record['reward']:.2f}" if "reward" in record else branch
        return shown + (f" ov={sum(overlaps) / len(overlaps):.2f}" if overlaps else "")

    def _count_nan(self, branch: str, skipped: bool) -> None:
        in_row = self.state.nan_in_row
        in_row[branch] = in_row[branch] + 1 if skipped else 0
        self.state.nan_skipped[branch] += int(skipped)
        limit = self.config.optim.max_nan_in_row
        if in_row[branch] >= limit:
            last = latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint {last} is intact" if last else "no checkpoint was written yet"
            raise CopdError(
                f"branch {branch!r}: {limit} non-finite losses in a row (step {self.state.global_step}); "
                f"stopping, {kept}; lower optim.lr and resume with --resume"
            )

    # ---- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self, cycle: int) -> None:
        # Every branch saves and confirms before the manifest (state.json) is written and the
        # folder renamed into place: a checkpoint is a consistent cut of all branches.
        state = dataclasses.replace(self.state, cycle=cycle, metrics_lines=self.metrics.lines, **self._sampler_states())
        save_checkpoint(self.run_dir, cycle, self.learners, state, self.config.run.keep_checkpoints)

    def _restore(self) -> None:
        if latest_checkpoint(self.run_dir) is None:  # killed before the first cycle ended: start over from the base
            self.metrics.truncate(0, 0)  # and drop the records of the lost steps, or they would repeat
            self._adopt_experts()
            return
        folder, state = load_latest_intact(self.run_dir, self.learners, self.reporter.print)
        self._load_samplers(state.rl_samplers, state.opd_samplers)
        self.metrics.truncate(state.metrics_lines, state.global_step)
        self.state = state
        self.reporter.print(f"resumed from {folder}")

    def _adopt_experts(self) -> None:
        """schedule.experts_from: the experts as that run left them, and the plan from its distillation
        on, at the global step where the skipped experts phase would have ended (so every seed matches)."""
        if not self.config.schedule.experts_from:
            return
        for name in experts_of(self.config):
            self.learners[name].set_weights(expert_weights(self.config, name))
        self.state.next_phase = next(i for i, phase in enumerate(self.plan) if phase.name == "distill")
        self.state.global_step = self._first_step()
        self.reporter.print(f"experts from {self.config.schedule.experts_from}; distillation starts at step {self._first_step()}")

    def _first_step(self) -> int:
        """The global step this run starts at: 0, or with schedule.experts_from the end of the skipped experts phase."""
        if not self.config.schedule.experts_from:
            return 0
        return sum(phase.steps for phase in self.plan if phase.name != "distill")


def plan_of(config: Config) -> list[Phase]:
    """The config's plan: topology edges among the experts for CoPD, named teachers otherwise."""
    names = [b.name for b in config.branches]
    students = Students({b.name: tuple(b.distill_from) for b in config.branches if b.distill_from},
                        {b.name: b.fork_of for b in config.branches if b.fork_of})
    experts = list(students.experts(names))
    s = config.schedule
    try:
        topology = build_edges(config.topology.kind, experts, config.topology.hub) if len(experts) > 1 else []
        plan = build_plan(s.plan, names, topology if s.plan in TOPOLOGY_PLANS else [], s.cycles, s.rl_steps, s.opd_steps, students)
        plan = with_overlap_trigger(plan, s.overlap_threshold) if s.trigger == "overlap" else plan
        return with_probes(plan, topology) if s.probe else plan
    except ValueError as err:
        raise CopdError(f"config: {err}") from None
