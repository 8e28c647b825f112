"""User JSONL capabilities: loading, splitting, and every error path."""

import json

import pytest

from copd.capabilities import load_capability
from copd.errors import CopdError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "source": "gen"} for i in range(50)]
    return _write(tmp_path / "train.jsonl", rows)


def test_loads_fields_and_converts_numeric_answers(data):
    cap = load_capability({"name": "t", "path": str(data), "verifier": "numeric"})
    sample = cap.test_set(1)[0]
    assert sample.answer == str(int(sample.prompt[1:]))
    assert sample.fields == {"source": "gen"}
    assert cap.score(f"it is {sample.answer}", sample) == 1.0


def test_ratio_split_is_disjoint_deterministic_and_seeded(data):
    spec = {"name": "t", "path": str(data), "test_ratio": 0.2}
    cap = load_capability(spec)
    test = {s.prompt for s in cap.test_set()}
    train = {s.prompt for s in cap.train_sampler(0).draw(200)}
    assert len(test) == 10 and len(train) == 40 and not test & train
    assert cap.test_set() == load_capability(spec).test_set()
    other = load_capability({**spec, "split_seed": 1}).test_set()
    assert {s.prompt for s in other} != test
    assert cap.test_set(3) == cap.test_set()[:3]


def test_duplicate_prompts_stay_on_one_side(tmp_path):
    rows = [{"prompt": f"q{i % 10}", "answer": "a"} for i in range(40)]
    cap = load_capability({"name": "t", "path": str(_write(tmp_path / "d.jsonl", rows))})
    test = {s.prompt for s in cap.test_set()}
    assert len(test) == 1 and len(cap.test_set()) == 4
    assert not test & {s.prompt for s in cap.train_sampler(0).draw(100)}


def test_custom_fields_test_path_and_relative_paths(tmp_path):
    _write(tmp_path / "tr.jsonl", [{"question": "a", "solution": "1", "answer": "x"}] * 3)
    _write(tmp_path / "te.jsonl", [{"question": "b", "solution": "2"}])
    spec = {
        "name": "t",
        "path": "tr.jsonl",
        "test_path": "te.jsonl",
        "prompt_field": "question",
        "answer_field": "solution",
    }
    cap = load_capability(spec, base_dir=tmp_path)
    assert [s.prompt for s in cap.test_set()] == ["b"]
    # A field named "answer" would collide with the verifier's argument: it is left out.
    assert cap.train_sampler(0).draw(1)[0].fields == {}
    assert cap.score("1", cap.train_sampler(0).draw(1)[0]) == 1.0


def test_ratio_zero_means_no_test_split(data):
    cap = load_capability({"name": "t", "path": str(data), "test_ratio": 0})
    assert cap.test_set() == [] and len(cap.train_sampler(0).draw(50)) == 50


# (file lines, 1-based line number expected in the message, message fragment)
LINE_ERRORS = [
    (['{"prompt": "a", "answer": "1"}', "{not json"], 2, "invalid JSON"),
    (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b"}'], 3, 'missing field "answer"'),
    (['{"answer": "1"}'], 1, 'missing field "prompt"'),
    (['{"prompt": 5, "answer": "1"}'], 1, 'field "prompt" must be a string'),
    (['{"prompt": "a", "answer": null}'], 1, "string or a number"),
    (['{"prompt": "a", "answer": true}'], 1, "string or a number"),
    (['["prompt", "answer"]'], 1, "expected a JSON object"),
]


@pytest.mark.parametrize(("lines", "lineno", "fragment"), LINE_ERRORS)
def test_line_errors_name_file_and_line(tmp_path, lines, lineno, fragment):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(CopdError, match=fragment) as info:
        load_capability({"name": "t", "path": str(path)})
    assert f"bad.jsonl:{lineno}:" in str(info.value)
    assert "\n" not in str(info.value)


def test_numeric_verifier_checks_answers_at_load(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "x"}]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CopdError, match="not a number") as info:
        load_capability({"name": "t", "path": str(path), "verifier": "numeric"})
    assert "bad.jsonl:2:" in str(info.value)


def test_bad_test_file_names_that_file(tmp_path, data):
    test = _write(tmp_path / "held.jsonl", ['{"prompt": "a", "answer": "1"}', "oops"])
    with pytest.raises(CopdError, match=r"held\.jsonl:2: invalid JSON"):
        load_capability({"name": "t", "path": str(data), "test_path": str(test)})


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n\xff\xfe\n')
    with pytest.raises(CopdError, match=r"bin\.jsonl:2: not valid UTF-8"):
        load_capability({"name": "t", "path": str(path)})


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: d / "missing.jsonl", r"missing\.jsonl: file not found"),
        (lambda d: _write(d / "empty.jsonl", ["", "  "]), r"empty\.jsonl: no samples"),
        (lambda d: d, "not a file"),
        (lambda d: _write(d / "one.jsonl", ['{"prompt": "a", "answer": 1}']), r"only 1"),
    ],
)
def test_file_errors_name_the_file(tmp_path, setup, fragment):
    path = setup(tmp_path)
    with pytest.raises(CopdError, match=fragment) as info:
        load_capability({"name": "t", "path": str(path)})
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"verifier": "exat"}, "key 'verifier': unknown verifier 'exat' \\(did you mean 'exact'"),
        ({"verifier": "nope_mod_q:f"}, "key 'verifier'.*cannot import"),
        ({"test_ration": 0.2}, "unknown key 'test_ration' \\(did you mean 'test_ratio'"),
        ({"test_ratio": 1.0}, "key 'test_ratio': Input should be less than 1"),
        ({"test_ratio": "a lot"}, "key 'test_ratio': Input should be a valid number"),
        ({"split_seed": True}, "key 'split_seed': must be an integer, got True"),
        ({"test_path": "x.jsonl", "test_ratio": 0.2}, "give `test_path` or `test_ratio`, not both"),
        ({"prompt_field": ""}, "key 'prompt_field': must not be empty"),
        ({"builtin": "addition"}, "exactly one of"),
    ],
)
def test_spec_errors_name_the_key(data, extra, fragment):
    with pytest.raises(CopdError, match=fragment) as info:
        load_capability({"name": "mine", "path": str(data), **extra})
    assert "'mine'" in str(info.value)
