"""Built-in capabilities, samplers and verifiers."""

import json
import re
import textwrap

import pytest

from copd.capabilities import (
    BUILTIN_CAPABILITIES,
    CHAR_ALPHABET,
    VERIFIERS,
    Capability,
    Sample,
    load_capability,
    resolve_verifier,
)
from copd.errors import CopdError

BUILTINS = sorted(BUILTIN_CAPABILITIES)
from copd.capabilities.language import LANGUAGE_CAPABILITIES  # noqa: E402
from copd.capabilities.prompt_sources import split_key  # noqa: E402
from copd.capabilities.visual import VISUAL_CAPABILITIES  # noqa: E402


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_train_and_test_are_disjoint(name):
    # The split key of a text sample is its prompt; image and video samples add file names.
    cap = BUILTIN_CAPABILITIES[name]()
    train = {split_key(s) for s in cap.train_sampler(seed=3).draw(2000)}
    test = {split_key(s) for s in cap.test_set()}
    assert len(test) == 200
    assert not train & test


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_test_set_is_fixed_and_prefix_consistent(name):
    a = BUILTIN_CAPABILITIES[name]().test_set()
    b = BUILTIN_CAPABILITIES[name]().test_set(50)
    assert b == a[:50]


@pytest.mark.parametrize(
    "name", [n for n in BUILTINS if n not in LANGUAGE_CAPABILITIES and n not in VISUAL_CAPABILITIES]
)
def test_builtin_uses_only_char_alphabet(name):
    cap = BUILTIN_CAPABILITIES[name]()
    alphabet = set(CHAR_ALPHABET)
    for s in cap.train_sampler(seed=0).draw(500) + cap.test_set():
        assert set(s.prompt) <= alphabet and set(s.answer) <= alphabet, s


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_answers_score_one(name):
    cap = BUILTIN_CAPABILITIES[name]()
    for s in cap.train_sampler(seed=1).draw(100):
        assert cap.score(f" {s.answer}\n", s) == 1.0
        assert cap.score(s.answer + "1", s) == 0.0


def test_builtin_answers_are_correct():
    add, rev, cnt = (BUILTIN_CAPABILITIES[n]() for n in ("addition", "reversal", "count"))
    for s in add.train_sampler(0).draw(50):
        a, b = s.prompt.rstrip("=").split("+")
        assert int(s.answer) == int(a) + int(b) and int(a) < 100 and int(b) < 100
    for s in rev.train_sampler(0).draw(50):
        word = s.prompt[len("rev:") : -1]
        assert s.answer == word[::-1] and 3 <= len(word) <= 5 and set(word) <= set("abcdef")
    for s in cnt.train_sampler(0).draw(50):
        letter, word = s.prompt[len("count ") : -1].split(":")
        assert int(s.answer) == word.count(letter) and 4 <= len(word) <= 8


def test_builtin_options():
    cap = BUILTIN_CAPABILITIES["addition"](digits=1, test_size=5)
    assert all(len(s.prompt) <= 4 for s in cap.train_sampler(0).draw(100))
    # 1-digit addition has only ~10 test prompts; the split is then smaller than asked.
    assert len(BUILTIN_CAPABILITIES["addition"](digits=1, test_size=500).test_set()) < 30
    words = BUILTIN_CAPABILITIES["reversal"](min_len=2, max_len=2, letters="xy")
    assert {len(s.answer) for s in words.train_sampler(0).draw(20)} == {2}


@pytest.mark.parametrize("name", BUILTINS)
def test_draws_are_deterministic_and_seed_dependent(name):
    cap = BUILTIN_CAPABILITIES[name]()
    assert cap.train_sampler(7).draw(30) == cap.train_sampler(7).draw(30)
    assert cap.train_sampler(7).draw(30) != cap.train_sampler(8).draw(30)


def _resume_matches(cap: Capability) -> None:
    full = cap.train_sampler(5)
    expected = full.draw(10) + full.draw(25)
    first = cap.train_sampler(5)
    head = first.draw(10)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = cap.train_sampler(5)
    resumed.load_state_dict(state)
    assert head + resumed.draw(25) == expected


@pytest.mark.parametrize("name", BUILTINS)
def test_procedural_resume_continues_exactly(name):
    _resume_matches(BUILTIN_CAPABILITIES[name]())


def test_file_sampler_epochs_resume_and_reshuffle(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": i}) + "\n" for i in range(8)))
    cap = load_capability({"name": "f", "path": str(path), "test_path": str(path)})
    _resume_matches(cap)  # 35 draws of 8 samples: crosses several epochs
    draws = cap.train_sampler(0).draw(16)
    first, second = draws[:8], draws[8:]
    assert sorted(s.prompt for s in first) == sorted(s.prompt for s in second)
    assert first != second  # reshuffled each epoch
    assert cap.train_sampler(0).draw(8) != cap.train_sampler(1).draw(8)


def test_state_from_other_seed_is_refused():
    cap = BUILTIN_CAPABILITIES["addition"]()
    state = cap.train_sampler(1).state_dict()
    with pytest.raises(CopdError, match="seed"):
        cap.train_sampler(2).load_state_dict(state)


@pytest.mark.parametrize(
    ("verifier", "completion", "answer", "reward"),
    [
        ("exact", " 42 ", "42", 1.0),
        ("exact", "41", "42", 0.0),
        ("exact", "", "42", 0.0),
        ("numeric", "the answer is 3.50", "3.5", 1.0),
        ("numeric", "2 apples then 7", "7", 1.0),
        ("numeric", "total: 1,234.5.", "1234.5", 1.0),
        ("numeric", "-3e2", "-300", 1.0),
        ("numeric", "7 then 2", "7", 0.0),
        ("numeric", "no number here", "3", 0.0),
        ("numeric", "3", "not-a-number", 0.0),
        ("numeric", "0.1000000001", "0.1", 1.0),
    ],
)
def test_verifiers(verifier, completion, answer, reward):
    assert VERIFIERS[verifier](completion, answer, unknown_field=1) == reward


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = """
        def half(completion, answer, weight=1.0):
            return 0.5 * weight if completion.strip() == answer else 0.0
        def out_of_range(completion, answer):
            return 2.0
        NOT_CALLABLE = 3
    """
    (tmp_path / "my_verifiers.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_verifiers"


def test_module_function_verifier(user_module):
    fn = resolve_verifier(f"{user_module}:half")
    # Unknown fields are dropped because `half` does not take **kwargs.
    assert fn("ok", "ok", weight=2.0, source="x") == 1.0
    cap = Capability("u", fn, None)
    assert cap.score("ok", Sample("p", "ok", {"weight": 1.0, "id": 3})) == 0.5


def test_out_of_range_reward_is_an_error(user_module):
    cap = Capability("u", resolve_verifier(f"{user_module}:out_of_range"), None)
    with pytest.raises(CopdError, match=r"\[0, 1\]"):
        cap.score("x", Sample("p", "x"))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("exat", "did you mean 'exact'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("my_verifiers:hlf", "did you mean 'half'"),
        ("my_verifiers:NOT_CALLABLE", "not callable"),
        ("my_verifiers:", "module:function"),
    ],
)
def test_resolve_verifier_errors(user_module, spec, fragment):
    with pytest.raises(CopdError, match=fragment):
        resolve_verifier(spec)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"name": "a", "builtin": "additon"}, "did you mean 'addition'"),
        ({"name": "a", "builtin": "addition", "digit": 3}, "did you mean 'digits'"),
        ({"name": "a", "builtin": "addition", "digits": "3"}, "'digits' must be of type int"),
        ({"name": "a", "builtin": "reversal", "min_len": 6}, "min_len"),
        ({"name": "a", "builtin": "count", "letters": "AB"}, "letters"),
        ({"name": "a"}, "exactly one of"),
        ({"builtin": "addition"}, "'name'"),
        ({"name": "a", "builtin": "sort", "verifier": "numeric"},
         "^capability 'a': `verifier` applies to data files; the built-in 'sort' has its own verifier$"),
        ({"name": "a", "builtin": "sort", "test_ratio": 0.5}, "`test_ratio` applies to data files"),
        ({"name": "a", "builtin": "word_problems", "max_vaule": 9}, "did you mean 'max_value'"),
        ({"name": "a", "builtin": "unit_conversion", "halves": 1}, "'halves' must be of type bool"),
        ({"name": "a", "builtin": "addition", "options": {"digit": 3}}, "did you mean 'digits'"),
    ],
)
def test_builtin_spec_errors(spec, fragment):
    with pytest.raises(CopdError, match=fragment):
        load_capability(spec)


def test_builtin_spec_uses_given_name():
    cap = load_capability({"name": "add1", "builtin": "addition", "digits": 1})
    assert cap.name == "add1"
    assert all(len(s.prompt) <= 4 for s in cap.test_set())


def test_builtin_options_beside_or_under_options_and_typed_load_the_same():
    from copd.config.schema import CapabilityConfig

    beside = load_capability({"name": "u", "builtin": "unit_conversion", "halves": False, "test_size": 5})
    under = load_capability({"name": "u", "builtin": "unit_conversion", "options": {"halves": False, "test_size": 5}})
    typed = load_capability(CapabilityConfig(name="u", builtin="unit_conversion", options={"halves": False, "test_size": 5}))
    assert beside.test_set() == under.test_set() == typed.test_set() and len(typed.test_set()) == 5


def test_language_tasks_have_correct_numeric_answers():
    words, units = (BUILTIN_CAPABILITIES[n]() for n in ("word_problems", "unit_conversion"))
    for s in words.train_sampler(seed=2).draw(50):
        assert s.prompt.endswith("Answer with the number only.")
        numbers = [int(w) for w in s.prompt.replace("?", " ").replace(".", " ").split() if w.isdigit()]
        a, b = numbers
        assert int(s.answer) in {a + b, a - b, a * b}
    factors = {(f, t): k for f, t, k in __import__("copd.capabilities.language", fromlist=["x"]).CONVERSIONS}
    for s in units.train_sampler(seed=2).draw(50):
        words_ = s.prompt.split()
        dst, amount, src = words_[2], float(words_[5]), words_[6].rstrip("?")
        assert float(s.answer) == amount * factors[(src, dst)]
    assert words.score("The answer is 19.", type(s)("q", "19")) == 1.0


def test_comparisons_add_for_more_and_subtract_for_fewer():
    for relation, combine in (("more", lambda a, b: a + b), ("fewer", lambda a, b: a - b)):
        capability = BUILTIN_CAPABILITIES["comparisons"](relations=relation)
        for s in capability.train_sampler(seed=3).draw(30):
            a, b = (int(w) for w in s.prompt.replace(".", " ").split() if w.isdigit())
            assert f" {b} {relation} " in s.prompt and s.answer == str(combine(a, b)) and int(s.answer) > 0
    both = {s.prompt.split()[7] for s in BUILTIN_CAPABILITIES["comparisons"]().train_sampler(seed=3).draw(40)}
    assert both == {"more", "fewer"}


@pytest.mark.parametrize(("options", "message"), [
    ({"relations": "more,less"}, "option 'relations': unknown less; valid: more, fewer"),
    ({"max_diff": 20}, "options need 2 <= max_diff < max_value, got 20 and 20"),
])
def test_comparisons_reject_bad_options(options, message):
    with pytest.raises(CopdError, match=re.escape(message)):
        BUILTIN_CAPABILITIES["comparisons"](**options)
