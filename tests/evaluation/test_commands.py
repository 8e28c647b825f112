"""`copd eval --tasks FILE` with the data-file keys of a capability on the command line."""

import json

import pytest

from copd.cli.main import main
from copd.config.schema import TinyModelConfig
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from tests.cli.test_main import fails

# Half of the rows are of kind "x": a verifier that rewards the kind scores exactly 0.5 on them.
ROWS = [{"prompt": f"ab{c}", "answer": c, "kind": "x" if i % 2 else "y"} for i, c in enumerate("abcdefgh")]
VERIFIER = "def by_kind(completion, answer, kind):\n    return 1.0 if kind == 'x' else 0.0\n"


@pytest.fixture()
def model_and_files(tmp_path, monkeypatch):
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    folder = tmp_path / "model"
    build_tiny_model(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "kinds.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    plain, renamed = tmp_path / "plain.jsonl", tmp_path / "renamed.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "solution": r["answer"], "kind": r["kind"]}) + "\n" for r in ROWS))
    return folder, plain, renamed


def scores(tmp_path, argv) -> dict:
    out = tmp_path / "scores.json"
    assert main(["eval", *argv, "--samples", "8", "--out", str(out)]) == 0
    return json.loads(out.read_text())["models"]["model"]


def test_field_options_read_a_file_with_other_column_names_like_the_default_ones(model_and_files, tmp_path):
    folder, plain, renamed = model_and_files
    default = scores(tmp_path, [str(folder), "--tasks", str(plain), "--verifier", "kinds:by_kind"])
    mapped = scores(tmp_path, [str(folder), "--tasks", str(renamed), "--prompt-field", "question", "--answer-field", "solution",
                               "--verifier", "kinds:by_kind", "--fields", "kind"])
    assert default["greedy"]["plain"] == mapped["greedy"]["renamed"] == 0.5
    assert default["sampled"]["plain"] == mapped["sampled"]["renamed"] == 0.5


def test_a_missing_column_is_one_line_naming_the_file(model_and_files, capsys):
    folder, _, renamed = model_and_files
    err = fails(capsys, ["eval", str(folder), "--tasks", str(renamed), "--prompt-field", "query"])
    assert "renamed.jsonl" in err and "query" in err


def test_fields_verifier_name_their_column_reserved_and_need_a_data_file(model_and_files, capsys):
    folder, plain, _ = model_and_files
    assert "reserved" in fails(capsys, ["eval", str(folder), "--tasks", str(plain), "--fields", "answer"])
    err = fails(capsys, ["eval", str(folder), "--tasks", "count", "--prompt-field", "question"])
    assert "--prompt-field" in err and "data-file" in err


def test_the_options_are_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt-field", "--answer-field", "--system-field", "--images-field", "--videos-field", "--fields", "--verifier"):
        assert option in text
