"""What a registered verifier reads from a completion and from the reference, and a reference read in part."""

import pickle

import pytest

from copd.capabilities import load_capability
from copd.capabilities.readings import READINGS, dropped_tokens, reading_for


@pytest.mark.parametrize(("name", "completion", "fields", "extracted"), [
    ("exact", "  abc \n", {}, "abc"),
    ("numeric", "3 boxes of 1,234.50 apples", {}, "1234.5"),
    ("numeric", "no number here", {}, None),
    ("choice", "I think (C) but the answer is B.", {}, "B"),
    ("normalized", "The  Eiffel tower!", {}, "eiffel tower"),
    ("regex", "work...\nANSWER: 42 ", {}, "42"),
    ("regex", "final=7", {"answer_pattern": r"final=(\d+)"}, "7"),
])
def test_the_answer_a_verifier_takes_from_a_completion(name, completion, fields, extracted):
    assert READINGS[name].completion(completion, **fields) == extracted


@pytest.mark.parametrize(("name", "answer", "read"), [("numeric", " 12.50 ", "12.5"), ("choice", "(b)", "B"), ("exact", " x ", "x")])
def test_how_a_verifier_reads_the_reference(name, answer, read):
    assert READINGS[name].reference(answer) == read


def test_a_spec_with_a_format_reward_keeps_its_reading_and_user_functions_have_none():
    assert reading_for("numeric+format:0.2") is READINGS["numeric"]
    assert reading_for("mypkg.rewards:score") is None and reading_for("mypkg.rewards:score+format") is None


def test_math_reads_a_boxed_fraction_and_finds_a_reference_read_in_part():
    pytest.importorskip("math_verify")
    math = READINGS["math"]
    assert math.completion("so x = \\boxed{\\frac{1}{2}}") == "1/2"
    assert math.reference("\\frac{1}{2}") == "1/2" and dropped_tokens("\\frac{1}{2}", "1/2") == []
    assert dropped_tokens("n(n+1)/2", math.reference("n(n+1)/2")) == []
    # math-verify reads only the leading 2 of this reference: any completion ending in 2 would match it.
    assert math.reference("2^floor(n/2)*floor(n/2)!") == "2"
    assert dropped_tokens("2^floor(n/2)*floor(n/2)!", "2") == ["floor", "n", "floor", "n"]


def test_no_reading_drops_nothing():
    assert dropped_tokens("42", None) == []


def test_capabilities_carry_their_reading_and_still_pickle():
    cap = load_capability({"name": "a", "builtin": "addition"})
    assert cap.reading is READINGS["exact"]
    assert pickle.loads(pickle.dumps(cap)).reading.completion(" 7 ") == "7"
