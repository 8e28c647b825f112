"""Per-sample evaluation: every prompt's greedy completion and n sampled ones, with their rewards,
then the scores over them (greedy accuracy, mean@n, pass@k), per capability and per group.

A record is what `copd eval --log-samples` writes, one JSON line per prompt, so a user can see
what the model answered and how the verifier scored it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from copd.backends.roles import Policy, Prompt, SamplingParams
from copd.capabilities import Capability, Sample
from copd.capabilities.readings import AnswerReading, dropped_tokens
from copd.core.passk import sample_scores
from copd.errors import CopdError


@dataclass(frozen=True)
class EvalSettings:
    """How completions are generated for scoring (recorded beside every score)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    n: int  # sampled completions per prompt
    batch_size: int  # prompts per generation call
    seed: int

    @classmethod
    def of_run(cls, config) -> EvalSettings:
        """The evaluation at the end of a run: eval.* where set, else the run's sampling.*."""
        e, s = config.eval, config.sampling
        return cls(max_new_tokens=e.max_new_tokens or s.max_new_tokens, temperature=e.temperature or s.temperature,
                   top_p=e.top_p or s.top_p, n=e.n, batch_size=e.batch_size, seed=config.run.seed)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


def score_records(policy: Policy, cap: Capability, tests: list[Sample], settings: EvalSettings,
                  advance: Callable[[int], None] = lambda done: None, read: bool = True) -> list[dict]:
    """One record per test prompt: its greedy completion and `settings.n` sampled ones, each with its reward
    and, with `read` and a registered verifier, what the verifier read (see `scored`, `reference_read`).

    Batches are seeded by their first prompt's index, as in training-time evaluation, so with
    n = 1 the sampled completions are those `pass_rates` scores.
    """
    params = settings.sampling()
    greedy = dataclasses.replace(params, greedy=True)
    reading = cap.reading if read else None
    records = []
    for start in range(0, len(tests), settings.batch_size):
        chunk = tests[start : start + settings.batch_size]
        prompts = [Prompt.of(s) for s in chunk]
        best = policy.generate(prompts, 1, greedy, settings.seed + start).completions
        drawn = policy.generate(prompts, settings.n, params, settings.seed + start).completions
        for i, sample in enumerate(chunk):
            sampled = drawn[i * settings.n : (i + 1) * settings.n]
            records.append({
                "capability": cap.name, "prompt": sample.prompt, "answer": sample.answer, "fields": sample.fields,
                **reference_read(reading, sample),
                "greedy": scored(cap, reading, best[i], sample),
                "sampled": [scored(cap, reading, text, sample) for text in sampled],
            })
        advance(len(chunk))
    return records


def scored(cap: Capability, reading: AnswerReading | None, completion: str, sample: Sample) -> dict:
    """A completion, its reward and, where the verifier is a registered one, the answer it extracted (None: none found)."""
    found = {"completion": completion, "reward": cap.score(completion, sample)}
    if reading is not None:
        found["extracted"] = reading.completion(completion, **sample.fields)
    return found


def reference_read(reading: AnswerReading | None, sample: Sample) -> dict:
    """How the verifier reads the reference ("answer_read") and, when that reading lost some of the
    reference's names or numbers, which ("answer_dropped"): rewards against such a reference are unreliable."""
    if reading is None:
        return {}
    read = reading.reference(sample.answer)
    dropped = dropped_tokens(sample.answer, read)
    return {"answer_read": read, **({"answer_dropped": dropped} if dropped else {})}


def partly_read(records: list[dict]) -> dict[str, dict]:
    """Per capability whose verifier reads some reference answers only in part: how many of how many
    prompts, and the first such answer with its reading (eval.json's "answers_read_in_part")."""
    prompts: dict[str, set] = {}
    partial: dict[str, dict] = {}
    for record in records:
        key = (record["prompt"], record["answer"])
        seen = prompts.setdefault(record["capability"], set())
        if record.get("answer_dropped") and key not in seen:
            found = partial.setdefault(record["capability"], {"count": 0, "answer": record["answer"], "read_as": record["answer_read"]})
            found["count"] += 1
        seen.add(key)
    return {name: {**found, "of": len(prompts[name])} for name, found in partial.items()}


def partly_read_warnings(records: list[dict]) -> list[str]:
    """One line per capability whose verifier reads some reference answers only in part, with an example."""
    return [f"warning: task {name!r}: the verifier reads {p['count']} of {p['of']} reference answers only in part "
            f"(e.g. {p['answer']!r} is read as {p['read_as']!r}); rewards against them are unreliable: "
            "see answer_read and answer_dropped in the sample records" for name, p in partly_read(records).items()]


def summarise(records: list[dict]) -> dict[str, float]:
    """Greedy accuracy, mean@n and pass@k of a set of records (one capability, or one group of it)."""
    greedy = sum(r["greedy"]["reward"] for r in records) / max(len(records), 1)
    return {"prompts": len(records), "greedy": greedy, **sample_scores([[s["reward"] for s in r["sampled"]] for r in records])}


def summarise_by(records: list[dict], column: str | None) -> dict:
    """{"all": summary} and, with a column, {"groups": {value: summary}} over the records' field `column`."""
    found = {"all": summarise(records)}
    if column:
        groups: dict[str, list[dict]] = {}
        for record in records:
            groups.setdefault(str(record["fields"].get(column, "(none)")), []).append(record)
        found["groups"] = {value: summarise(rs) for value, rs in sorted(groups.items())}
    return found


def check_group_column(caps: list[Capability], column: str | None, key: str = "--group-by") -> None:
    """Grouping needs a column that every task's test prompts carry (`key` names the option in the error)."""
    for cap in caps if column else []:
        first = cap.test_set(1)
        fields = first[0].fields if first else {}
        if column not in fields:
            raise CopdError(f"{key} {column}: task {cap.name!r} has no such column (its columns: {', '.join(fields) or 'none'})")


def score_model(policy, label: str, caps: list[Capability], samples: int, settings: EvalSettings, group_by: str | None = None,
                reporter=None, read: bool = True) -> tuple[dict, list[dict]]:
    """One model's scores on every task (greedy and sampled as before, and the summaries) and its records
    (with what the verifier read, unless `read` is False)."""
    found, records = {"greedy": {}, "sampled": {}, "scores": {}}, []
    for cap in caps:
        tests = cap.test_set(samples)
        mine = score_records(policy, cap, tests, settings, progress(reporter, f"{label} {cap.name}", len(tests)), read)
        if reporter is not None:
            reporter.stop()
        summary = summarise_by(mine, group_by)
        found["greedy"][cap.name] = summary["all"]["greedy"]
        found["sampled"][cap.name] = summary["all"][f"mean@{settings.n}"]
        found["scores"][cap.name] = summary
        records += mine
    return found, records


def progress(reporter, description: str, total: int):
    """A callback that advances the reporter's bar by the prompts just scored (a no-op without one)."""
    if reporter is None:
        return lambda done: None
    reporter.start(description, total)

    def advance(done: int) -> None:
        for _ in range(done):
            reporter.advance(description)

    return advance
