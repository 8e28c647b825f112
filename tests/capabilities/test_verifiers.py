"""Registry verifiers math/choice/normalized/regex, the format reward, safe_verifier."""

import json
import logging
import sys
import textwrap
import threading

import pytest

from copd.capabilities import Capability, Sample, load_capability, resolve_verifier
from copd.capabilities.verifiers import ANSWER_CHECKS, VERIFIERS, safe_verifier
from copd.capabilities.verifiers_text import extract_choice, format_reward, normalize_text, with_format
from copd.errors import CopdError
from tests.extras import needs, require


@pytest.mark.parametrize(
    ("verifier", "completion", "answer", "fields", "reward"),
    [
        ("math", "\\boxed{\\frac{1}{2}}", "0.5", {}, 1.0),
        ("math", "so x = 0.5", "\\frac{1}{2}", {}, 1.0),
        ("math", "The answer is 42.", "42", {}, 1.0),
        ("math", "\\boxed{3}", "4", {}, 0.0),
        ("math", "I got 42, then corrected it to 41", "42", {}, 0.0),
        ("math", "$\\boxed{x^2+1}$", "1+x^2", {}, 1.0),
        ("math", "no idea", "3", {}, 0.0),
        ("choice", "I think (C).", "C", {}, 1.0),
        ("choice", "Answer: B", "(B)", {}, 1.0),
        ("choice", "the answer is b", "B", {}, 0.0),  # only capitals count as letters
        ("choice", "(A) is wrong, (B) too, so the answer is D.", "D", {}, 1.0),
        ("choice", "The answer is B. A careful check agrees.", "B", {}, 1.0),
        ("choice", "Maybe C) or rather E", "e", {}, 1.0),
        ("choice", "A lot of options; none fit", "A", {}, 0.0),
        ("choice", "I pick (A)", "B", {}, 0.0),
        ("choice", "no letter here", "B", {}, 0.0),
        ("choice", "Let me think.\nParis", "B", {"options": ["London", "Paris"]}, 1.0),
        ("choice", "Answer: paris.", "(B)", {"options": {"A": "London", "B": "Paris"}}, 1.0),
        ("choice", "Vitamin C", "B", {"options": ["Vitamin C", "Vitamin D"]}, 0.0),
        ("choice", "Vitamin D", "B", {"options": ["Vitamin C", "Vitamin D"]}, 1.0),
        ("normalized", "The  Eiffel Tower!", "eiffel tower", {}, 1.0),
        ("normalized", "an U.S. state", "US State", {}, 1.0),
        ("normalized", "Eiffel Towers", "eiffel tower", {}, 0.0),
        ("regex", "Thinking...\nAnswer: Paris\n", "Paris", {}, 1.0),
        ("regex", "answer: Rome\nANSWER:  Paris ", "Paris", {}, 1.0),
        ("regex", "Paris", "Paris", {}, 0.0),
        ("regex", "<a>1</a> <a>2</a>", "2", {"answer_pattern": r"<a>(.*?)</a>"}, 1.0),
        ("regex", "<a>1</a> <a>2</a>", "1", {"answer_pattern": r"<a>(.*?)</a>"}, 0.0),
    ],
)
def test_text_verifiers(verifier, completion, answer, fields, reward):
    if verifier == "math":
        require("math_verify")
    assert VERIFIERS[verifier](completion, answer, unknown_field=1, **fields) == reward
    assert resolve_verifier(verifier)(completion, answer, **fields) == reward


def test_extract_choice():
    assert extract_choice("Answer: (E), not A") == "E"
    assert extract_choice("**C**") == "C"
    assert extract_choice("A good question") is None


@needs("math_verify")
def test_math_verify_works_outside_the_main_thread():
    # math-verify's signal.alarm timeout raises ValueError off the main thread unless disabled.
    results = []
    thread = threading.Thread(target=lambda: results.append(VERIFIERS["math"]("\\boxed{7}", "7")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_math_without_math_verify_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes the import fail
    with pytest.raises(CopdError, match="pip install math-verify"):
        resolve_verifier("math+format")


def test_invalid_regex_pattern():
    with pytest.raises(CopdError, match="invalid regular expression"):
        VERIFIERS["regex"]("x", "x", answer_pattern="(")
    assert resolve_verifier("regex")("x", "x", answer_pattern="(") == 0.0


@pytest.mark.parametrize(
    ("spec", "completion", "answer", "reward"),
    [
        ("exact+format:0.2", "42", "42", 0.8),
        ("exact+format", "41 \\boxed{42}", "42", 0.1),
        ("exact+format:0", "42", "42", 1.0),
        ("numeric+format", "answer: 42", "42", 1.0),
        ("math+format", "so \\boxed{3}", "3", 1.0),
        ("math+format:0.5", "so 3", "3", 0.5),
        ("regex+format:1", "Answer: no", "yes", 1.0),
    ],
)
def test_format_combinator(spec, completion, answer, reward):
    if spec.startswith("math"):
        require("math_verify")
    assert resolve_verifier(spec)(completion, answer) == pytest.approx(reward)


def test_format_reward_and_with_format():
    assert format_reward("The final answer is \\boxed{12}") == 1.0
    assert format_reward("Answer: 12") == 1.0
    assert format_reward("12") == format_reward("\\boxed{}") == 0.0
    assert format_reward("<ans>1</ans>", pattern=r"<ans>.+</ans>") == 1.0
    fn = with_format(VERIFIERS["exact"], 0.25, pattern=r"^\d+$")
    assert fn("7", "7") == 1.0 and fn("x", "7") == 0.0 and fn("7", "8") == 0.25
    with pytest.raises(CopdError, match=r"\[0, 1\]"):
        with_format(VERIFIERS["exact"], 1.5)
    # An out-of-range inner reward reaches Capability.score, which refuses it.
    cap = Capability("c", with_format(lambda c, a: 1.5, 0.5), None)
    with pytest.raises(CopdError, match=r"\[0, 1\]"):
        cap.score("x", Sample("p", "x"))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("maths", "did you mean 'math'"),
        ("choise", "did you mean 'choice'"),
        ("normalised", "did you mean 'normalized'"),
        ("exat+format", "did you mean 'exact'"),
        ("exact+formt", "did you mean 'format'"),
        ("exact+format:2", r"in \[0, 1\]"),
        ("exact+format:heavy", r"in \[0, 1\]"),
        ("+format", "unknown verifier ''"),
    ],
)
def test_resolve_verifier_errors(spec, fragment):
    with pytest.raises(CopdError, match=fragment):
        resolve_verifier(spec)


def test_safe_verifier_counts_failures_and_logs_once(caplog):
    def broken(completion, answer, **fields):
        raise ZeroDivisionError("boom")

    fn = safe_verifier(broken, "broken")
    with caplog.at_level(logging.WARNING, logger="copd.verifiers"):
        assert [fn("x", "y") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert fn.failures == 3
    records = [r for r in caplog.records if r.name == "copd.verifiers"]
    assert len(records) == 1
    assert "'broken'" in records[0].getMessage()
    assert "ZeroDivisionError: boom" in caplog.text  # the traceback
    assert fn.__name__ == "broken"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = """
        def crash(completion, answer):
            return 1 / 0
        def bad_type(completion, answer):
            return None
    """
    (tmp_path / "extra_verifiers.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "extra_verifiers"


def test_user_verifier_that_raises_scores_zero(user_module, caplog):
    cap = Capability("u", resolve_verifier(f"{user_module}:crash"), None)
    with caplog.at_level(logging.WARNING, logger="copd.verifiers"):
        assert cap.score("x", Sample("p", "x", {"extra": 1})) == 0.0
    assert cap.verifier.failures == 1 and "extra_verifiers:crash" in caplog.text
    assert resolve_verifier(f"{user_module}:bad_type")("x", "x") == 0.0
    combined = resolve_verifier(f"{user_module}:crash+format:0.3")
    assert combined("Answer: x", "x") == 0.3
    assert combined.__wrapped__.failures == 1 and not hasattr(combined, "failures")


@needs("math_verify")
def test_answer_checks_follow_the_base_verifier(tmp_path):
    assert ANSWER_CHECKS.get("numeric+format:0.2")("abc") == "is not a number"
    assert ANSWER_CHECKS.get("choice")("(b)") is None
    assert ANSWER_CHECKS.get("choice")("F") is not None
    assert ANSWER_CHECKS.get("math")("\\frac{1}{2}") is None
    assert ANSWER_CHECKS.get("normalized")("The.") is not None
    assert ANSWER_CHECKS.get("exact+format") is None
    rows = [{"prompt": "q1", "answer": "B", "options": ["x", "y"]}, {"prompt": "q2", "answer": "Z"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(CopdError, match=r"mc.jsonl:2.*not a letter"):
        load_capability({"name": "mc", "path": str(path), "verifier": "choice+format"})
    path.write_text(json.dumps(rows[0]))
    cap = load_capability(
        {"name": "mc", "path": str(path), "test_path": str(path), "verifier": "choice+format"}
    )
    sample = cap.test_set()[0]
    assert cap.score("Answer: y", sample) == 1.0
    assert cap.score("(B)", sample) == pytest.approx(0.9)
    assert normalize_text(" A  Tale, of the Cities! ") == "tale of cities"


def test_a_verifier_beside_the_config_imports_with_its_siblings_and_leaves_sys_path_alone(tmp_path):
    folder = tmp_path / "cfg"
    (folder / "beside_cfg_pkg").mkdir(parents=True)
    (folder / "beside_cfg_pkg" / "__init__.py").write_text("")
    (folder / "beside_cfg_helpers.py").write_text("BONUS = 0.25\n")
    (folder / "beside_cfg_pkg" / "rewards.py").write_text("from beside_cfg_helpers import BONUS\n\ndef score(c, a):\n    return BONUS\n")
    before = list(sys.path)
    assert resolve_verifier("beside_cfg_pkg.rewards:score", folder)("x", "y") == 0.25
    assert sys.path == before


@pytest.mark.parametrize(("source", "fragment"), [
    ("import no_such_dependency_xyz\n", "(ModuleNotFoundError: No module named 'no_such_dependency_xyz')"),  # the module's own import
    ("raise RuntimeError('broken')\n", "(RuntimeError: broken)"),
])
def test_a_verifier_module_that_fails_to_import_names_its_own_error(tmp_path, source, fragment):
    name = f"failing_verifier_{len(source)}"
    (tmp_path / f"{name}.py").write_text(source)
    with pytest.raises(CopdError) as info:
        resolve_verifier(f"{name}:score", tmp_path)
    assert f"cannot import module {name!r} {fragment}" in str(info.value)


def test_a_missing_submodule_names_the_package_found(tmp_path):
    (tmp_path / "found_pkg_xyz").mkdir()
    (tmp_path / "found_pkg_xyz" / "__init__.py").write_text("")
    with pytest.raises(CopdError, match=r"package 'found_pkg_xyz' \(.*found_pkg_xyz\) has no module 'rewardz'"):
        resolve_verifier("found_pkg_xyz.rewardz:score", tmp_path)
