"""Samples, capabilities, and the protocols every data source implements."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from copd.errors import CopdError

if TYPE_CHECKING:
    from copd.capabilities.readings import AnswerReading

# verifier(completion, answer, **sample.fields) -> reward in [0, 1]
Verifier = Callable[..., float]


@dataclass(frozen=True)
class Sample:
    """One prompt with its reference answer; `fields` go to the verifier as keywords.

    `system` is a per-sample system prompt, `images` and `videos` are local paths of
    media attached to the prompt; text tasks leave them at their defaults.
    """

    prompt: str
    answer: str
    # hash=False keeps samples hashable even though a dict is not.
    fields: dict[str, Any] = field(default_factory=dict, hash=False)
    system: str | None = None
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()


class TrainSampler(Protocol):
    """An endless, reproducible stream of training samples that can be resumed exactly."""

    def draw(self, n: int) -> list[Sample]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SampleSource(Protocol):
    """Where a capability's data comes from (procedural generator or a file)."""

    def train_sampler(self, seed: int) -> TrainSampler: ...

    def test_set(self, n: int | None) -> list[Sample]: ...


@dataclass
class Capability:
    """A named dataset of verifiable prompts plus the verifier that scores completions."""

    name: str
    verifier: Verifier
    source: SampleSource
    # What the verifier extracts from a completion and how it reads the reference (registered
    # verifiers only), recorded beside each reward in evaluation records.
    reading: AnswerReading | None = None

    def train_sampler(self, seed: int) -> TrainSampler:
        return self.source.train_sampler(seed)

    def test_set(self, n: int | None = None) -> list[Sample]:
        """The fixed test split (identical for every seed), truncated to its first n items."""
        if n is not None and n < 0:
            raise ValueError(f"test_set: n must be >= 0, got {n}")
        return self.source.test_set(n)

    def score(self, completion: str, sample: Sample) -> float:
        reward = float(self.verifier(completion, sample.answer, **sample.fields))
        # Written this way so NaN fails too; an out-of-range reward would silently skew GRPO.
        if not 0.0 <= reward <= 1.0:
            raise CopdError(
                f"capability {self.name!r}: verifier returned {reward!r} for prompt "
                f"{sample.prompt!r}; rewards must lie in [0, 1]"
            )
        return reward


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix for unknown-name errors, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def merge_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A built-in's options: `given` over `defaults`, rejecting unknown keys and wrong types."""
    for key, value in given.items():
        if key not in defaults:
            raise CopdError(
                f"unknown option {key!r}{did_you_mean(key, defaults)}; "
                f"options: {', '.join(sorted(defaults))}"
            )
        want = type(defaults[key])
        # bool is an int subclass, but `digits: true` is surely a mistake.
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise CopdError(f"option {key!r} must be of type {want.__name__}, got {value!r}")
    return {**defaults, **given}


def check_state(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a sampler from a state written for different data or seed."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise CopdError(
                f"sampler state does not match this capability: key {key!r} is "
                f"{state.get(key)!r}, expected {value!r} (did the config or data change?)"
            )
