"""The two data sources behind a Capability: a seeded endless generator and a finite list."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from copd.capabilities.capability import Sample, check_state
from copd.errors import CopdError

# A sample is in the test split iff sha1(split_key(sample)) % TEST_MODULUS == 0 (about 10%).
TEST_MODULUS = 10
# Fixed seed of the procedural test generator, so the test split is the same for every run.
TEST_SEED = "copd-test"
# Give up after this many prompts in a row land on the wrong side of the split: with a tiny
# option space (say one possible prompt) the generator could otherwise loop forever.
MAX_MISSES = 10_000

Generate = Callable[[random.Random], Sample]


def split_key(sample: Sample) -> str:
    """What decides a procedural sample's split: its prompt, plus its media file names.

    Image questions share one wording, so the media tell them apart; file names rather than
    paths keep the split independent of where the media folder lives. A text-only sample's
    key is its prompt, so text splits are the same as when only prompts counted.
    """
    media = [f"\nimage {PurePosixPath(p).name}" for p in sample.images]
    media += [f"\nvideo {PurePosixPath(p).name}" for p in sample.videos]
    return sample.prompt + "".join(media)


def is_test_prompt(key: str) -> bool:
    """Whether a split key (see split_key) is in the test split.

    Stable across processes and Python versions (unlike hash()), so splits never drift.
    """
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return int(digest, 16) % TEST_MODULUS == 0


def _rng(seed: object, counter: int) -> random.Random:
    # One fresh generator per (seed, counter): resuming needs only the counter, and string
    # seeds are hashed with sha512 by `random`, so they are reproducible across processes.
    return random.Random(f"{seed}:{counter}")


class ProceduralSampler:
    """Training samples from generate(rng(seed, counter)), skipping test-split samples."""

    def __init__(self, name: str, generate: Generate, seed: int) -> None:
        self._name, self._generate, self._seed = name, generate, seed
        self._counter = 0

    def draw(self, n: int) -> list[Sample]:
        out: list[Sample] = []
        misses = 0
        while len(out) < n:
            sample = self._generate(_rng(self._seed, self._counter))
            self._counter += 1
            if not is_test_prompt(split_key(sample)):
                out.append(sample)
                misses = 0
                continue
            misses += 1
            if misses > MAX_MISSES:
                raise CopdError(
                    f"capability {self._name!r}: its options allow almost no training prompts "
                    "outside the test split; widen the options"
                )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "procedural", "seed": self._seed, "counter": self._counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"kind": "procedural", "seed": self._seed})
        self._counter = int(state["counter"])


@dataclass
class ProceduralSource:
    """Endless generator; the test split is the first `test_size` distinct test split keys."""

    name: str
    generate: Generate
    test_size: int
    _test: list[Sample] | None = field(default=None, init=False, repr=False)

    def train_sampler(self, seed: int) -> ProceduralSampler:
        return ProceduralSampler(self.name, self.generate, seed)

    def test_set(self, n: int | None) -> list[Sample]:
        if self._test is None:
            self._test = self._build_test()
        return list(self._test if n is None else self._test[:n])

    def _build_test(self) -> list[Sample]:
        # May return fewer than test_size items when the option space has fewer test prompts.
        found: dict[str, Sample] = {}
        counter = misses = 0
        while len(found) < self.test_size and misses < MAX_MISSES:
            sample = self.generate(_rng(TEST_SEED, counter))
            counter += 1
            key = split_key(sample)
            if is_test_prompt(key) and key not in found:
                found[key] = sample
                misses = 0
            else:
                misses += 1
        return list(found.values())


class FileSampler:
    """Walks a seeded shuffle of a finite list, reshuffling (differently) each epoch."""

    def __init__(self, name: str, samples: list[Sample], seed: int) -> None:
        if not samples:
            raise CopdError(f"capability {name!r}: no training samples")
        self._samples, self._seed = samples, seed
        self._epoch = self._pos = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        # Derived from (seed, epoch) alone, so the state to resume is just (epoch, pos).
        order = list(range(len(self._samples)))
        random.Random(f"{self._seed}:{epoch}").shuffle(order)
        return order

    def draw(self, n: int) -> list[Sample]:
        out: list[Sample] = []
        while len(out) < n:
            if self._pos == len(self._order):
                self._epoch, self._pos = self._epoch + 1, 0
                self._order = self._shuffled(self._epoch)
            take = min(n - len(out), len(self._order) - self._pos)
            out.extend(self._samples[i] for i in self._order[self._pos : self._pos + take])
            self._pos += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "seed": self._seed,
            "size": len(self._samples),
            "epoch": self._epoch,
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, {"kind": "file", "seed": self._seed, "size": len(self._samples)})
        self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffled(self._epoch)


@dataclass
class FileSource:
    """A finite dataset already split into disjoint train and test lists."""

    name: str
    train: list[Sample]
    test: list[Sample]

    def train_sampler(self, seed: int) -> FileSampler:
        return FileSampler(self.name, self.train, seed)

    def test_set(self, n: int | None) -> list[Sample]:
        return list(self.test if n is None else self.test[:n])
