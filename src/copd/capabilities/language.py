"""Built-in capabilities in natural language for pretrained LLMs, with numeric answers.

Procedural, seedable and exactly verifiable like the character tasks, but phrased as a
person would ask them, so an instruct model (SmolLM2, Qwen) can be trained and measured on
them: arithmetic word problems and unit conversions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from copd.capabilities.capability import Capability, Sample, merge_options
from copd.capabilities.prompt_sources import ProceduralSource
from copd.capabilities.readings import READINGS
from copd.capabilities.verifiers import numeric
from copd.errors import CopdError

ANSWER_HINT = " Answer with the number only."

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Kim", "Ben", "Eva"]
ITEMS = ["apples", "books", "coins", "stickers", "pencils", "cards", "shells", "stamps"]


def _word_problem(rng: random.Random, o: dict[str, Any]) -> Sample:
    """Add, subtract or multiply small numbers inside a one-sentence story."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, o["max_value"]), rng.randint(2, o["max_value"])
    kind = rng.choice(o["ops"].split(","))
    if kind == "add":
        text, value = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        text, value = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    else:
        a, b = a % 12 + 2, b % 12 + 2
        text, value = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b
    return Sample(text + ANSWER_HINT, str(value))


# (from unit, to unit, factor): value_in_to = value_in_from * factor
CONVERSIONS = [
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("liters", "milliliters", 1000),
    ("days", "hours", 24), ("weeks", "days", 7), ("dollars", "cents", 100), ("feet", "inches", 12),
]


def _unit_conversion(rng: random.Random, o: dict[str, Any]) -> Sample:
    """Convert a whole or half quantity between two units whose factor is an integer."""
    src, dst, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(1, o["max_value"]) + (rng.choice([0, 0.5]) if o["halves"] else 0)
    value = amount * factor
    shown = int(amount) if amount == int(amount) else amount
    return Sample(f"How many {dst} are in {shown} {src}?" + ANSWER_HINT, str(int(value) if value == int(value) else value))


RELATIONS = {"more": lambda a, b: a + b, "fewer": lambda a, b: a - b}


def _comparison(rng: random.Random, o: dict[str, Any]) -> Sample:
    """One person has b more (or fewer) items than another: the two relations read almost alike
    and need opposite operations, which a small model tends to confuse."""
    first, second = rng.sample(NAMES, 2)
    item, relation = rng.choice(ITEMS), rng.choice(o["relations"].split(","))
    a, b = rng.randint(o["max_diff"] + 1, o["max_value"]), rng.randint(2, o["max_diff"])
    text = f"{first} has {a} {item}. {second} has {b} {relation} {item} than {first}. How many {item} does {second} have?"
    return Sample(text + ANSWER_HINT, str(RELATIONS[relation](a, b)))


def _check_comparison(o: dict[str, Any]) -> None:
    unknown = set(o["relations"].split(",")) - set(RELATIONS)
    if unknown:
        raise CopdError(f"option 'relations': unknown {', '.join(sorted(unknown))}; valid: {', '.join(RELATIONS)}")
    if not 2 <= o["max_diff"] < o["max_value"]:
        raise CopdError(f"options need 2 <= max_diff < max_value, got {o['max_diff']} and {o['max_value']}")


def _factory(name: str, generate: Callable[[random.Random, dict[str, Any]], Sample], defaults: dict[str, Any],
             check: Callable[[dict[str, Any]], None] = lambda o: None):
    def make(**options: Any) -> Capability:
        opts = merge_options(defaults, options)
        check(opts)
        return Capability(name, numeric, ProceduralSource(name, lambda rng: generate(rng, opts), opts["test_size"]), READINGS["numeric"])

    make.__name__ = f"make_{name}"
    return make


LANGUAGE_CAPABILITIES = {
    "word_problems": _factory("word_problems", _word_problem, {"max_value": 50, "ops": "add,sub,mul", "test_size": 200}),
    "unit_conversion": _factory("unit_conversion", _unit_conversion, {"max_value": 100, "halves": True, "test_size": 200}),
    "comparisons": _factory("comparisons", _comparison, {"relations": "more,fewer", "max_value": 20, "max_diff": 9, "test_size": 200},
                            _check_comparison),
}
