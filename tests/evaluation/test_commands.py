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


def test_generation_flags_groups_pass_at_k_and_sample_records(model_and_files, tmp_path, capsys):
    folder, plain, _ = model_and_files
    out, log = tmp_path / "scores.json", tmp_path / "samples.jsonl"
    argv = ["eval", str(folder), "--tasks", str(plain), "--verifier", "kinds:by_kind", "--samples", "8", "--n", "3",
            "--max-new-tokens", "5", "--temperature", "0.7", "--group-by", "kind", "--log-samples", str(log), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # The settings used are printed, and which ones are a model folder's defaults.
    assert "generation: max_new_tokens 5, temperature 0.7, top_p 1.0, n 3, batch_size 128, seed 0" in printed
    assert "top_p, batch_size: model-folder defaults" in printed
    found = json.loads(out.read_text())
    assert found["settings"] == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 1.0, "n": 3, "batch_size": 128, "seed": 0}
    scores = found["models"]["model"]["scores"]["plain"]
    # by_kind rewards rows of kind x with 1 whatever the completion: every score of group x is 1, of y 0.
    assert scores["groups"]["x"] == {"prompts": 4, "greedy": 1.0, "mean@3": 1.0, "pass@1": 1.0, "pass@2": 1.0, "pass@3": 1.0}
    assert scores["groups"]["y"] == {"prompts": 4, "greedy": 0.0, "mean@3": 0.0, "pass@1": 0.0, "pass@2": 0.0, "pass@3": 0.0}
    assert scores["all"]["mean@3"] == 0.5 and found["models"]["model"]["sampled"]["plain"] == 0.5
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 8 and {r["model"] for r in records} == {"model"}
    first = records[0]
    assert set(first) == {"model", "capability", "prompt", "answer", "fields", "greedy", "sampled"}
    assert len(first["sampled"]) == 3 and first["greedy"]["reward"] == (1.0 if first["fields"]["kind"] == "x" else 0.0)


def test_with_one_sample_the_sampled_score_is_the_training_time_pass_rate(model_and_files, tmp_path):
    from copd.backends.local.factory import make_policy
    from copd.backends.roles import SamplingParams
    from copd.capabilities import load_capability
    from copd.evaluation.evaluate import pass_rates
    from copd.models.sources import load_pretrained

    folder, plain, _ = model_and_files
    found = scores(tmp_path, [str(folder), "--tasks", str(plain), "--verifier", "exact"])
    cap = load_capability({"name": "plain", "path": str(plain), "test_path": str(plain), "verifier": "exact"})
    model, tokenizer = load_pretrained(folder)
    policy, tests, params = make_policy("m", model, tokenizer), {"plain": cap.test_set(8)}, SamplingParams(max_new_tokens=32)
    greedy = pass_rates(policy, [cap], tests, SamplingParams(max_new_tokens=32, greedy=True))
    assert found["greedy"]["plain"] == greedy["plain"] and found["sampled"]["plain"] == pass_rates(policy, [cap], tests, params)["plain"]


@pytest.mark.parametrize(("flag", "message"), [(["--n", "0"], "--n 0: must be at least 1"),
                                               (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
                                               (["--group-by", "nope"], "--group-by nope: task 'plain' has no such column")])
def test_bad_generation_options_are_one_line_errors(model_and_files, capsys, flag, message):
    folder, plain, _ = model_and_files
    assert message in fails(capsys, ["eval", str(folder), "--tasks", str(plain), *flag])


def test_records_show_what_the_verifier_read_and_a_reference_read_in_part_is_warned_of(model_and_files, tmp_path, capsys):
    pytest.importorskip("math_verify")
    folder = model_and_files[0]
    data, log = tmp_path / "maths.jsonl", tmp_path / "samples.jsonl"
    data.write_text(json.dumps({"prompt": "abc", "answer": "\\frac{1}{2}"}) + "\n" + json.dumps({"prompt": "abd", "answer": "2^floor(n/2)*floor(n/2)!"}) + "\n")
    assert main(["eval", str(folder), "--tasks", str(data), "--verifier", "math", "--samples", "2", "--max-new-tokens", "3",
                 "--log-samples", str(log)]) == 0
    printed = capsys.readouterr().out
    assert "warning: task 'maths': the verifier reads 1 of 2 reference answers only in part" in printed
    assert "'2^floor(n/2)*floor(n/2)!' is read as '2'" in printed
    half, partial = (json.loads(line) for line in log.read_text().splitlines())
    assert half["answer_read"] == "1/2" and "answer_dropped" not in half
    assert partial["answer_read"] == "2" and partial["answer_dropped"] == ["floor", "n", "floor", "n"]
    # Every completion carries what math-verify extracted from it (None where it found no expression).
    for record in (half, partial):
        assert {"completion", "reward", "extracted"} <= set(record["greedy"]) and "extracted" in record["sampled"][0]
