"""`copd diagnose`: overlap, symmetric KL and mean delta of two tiny models on the first one's rollouts."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import yaml

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import SamplingParams
from copd.capabilities import load_capability
from copd.config.schema import TinyModelConfig
from copd.core.overlap import mean_delta, symmetric_kl, topk_overlap
from copd.errors import CopdError
from copd.evaluation.diagnose import DEFAULT_TOPK, add_parser, cmd_diagnose, diagnose_models, measure_pair, run_diagnose
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from tests.fakes import full_distribution

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6)


def tiny_policy(name="p", seed=0, alphabet=TINY_ALPHABET):
    tokenizer = build_char_tokenizer(alphabet)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=48)
    return HFPolicy(name, build_tiny_model(cfg, tokenizer, seed=seed), tokenizer)


def caps(test_size=8):
    return [
        load_capability({"name": n, "builtin": n, "test_size": test_size}) for n in ("reversal", "count")
    ]


def test_a_model_against_itself_overlaps_fully():
    a = tiny_policy(seed=0)
    result = diagnose_models(a, a, caps(), samples=8, params=PARAMS, k=4, seed=0)
    assert result["k"] == 4 and set(result["per_capability"]) == {"reversal", "count"}
    for row in [*result["per_capability"].values(), result["overall"]]:
        assert row["tokens"] > 0
        assert row["overlap"] == 1.0
        assert row["sym_kl"] == pytest.approx(0.0, abs=1e-6)
        assert row["mean_delta"] == 0.0


def test_two_different_models_differ():
    result = diagnose_models(tiny_policy(seed=0), tiny_policy(seed=1), caps(), 8, PARAMS, k=4, seed=0)
    overall = result["overall"]
    assert 0.0 <= overall["overlap"] < 1.0 and overall["sym_kl"] > 0.0
    per = result["per_capability"].values()
    assert overall["tokens"] == sum(r["tokens"] for r in per)
    weighted = sum(r["overlap"] * r["tokens"] for r in per) / overall["tokens"]
    assert overall["overlap"] == pytest.approx(weighted)


def test_numbers_match_the_full_vocabulary_oracle_on_the_same_rollouts():
    a, b = tiny_policy(seed=0), tiny_policy(seed=1)
    cap = caps()[0]
    result = diagnose_models(a, b, [cap], 8, PARAMS, k=3, seed=5)["per_capability"]["reversal"]
    params = dataclasses.replace(PARAMS, record_topk=DEFAULT_TOPK)
    rollouts = a.generate([s.prompt for s in cap.test_set(8)], 1, params, seed=5)  # one batch: seed + 0
    sa, sb = full_distribution(a, rollouts), full_distribution(b, rollouts)
    mask = rollouts.completion_mask_B_T
    token = lambda d: d.gather(-1, rollouts.completion_ids_B_T.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    assert result["tokens"] == rollouts.num_tokens
    assert result["overlap"] == pytest.approx(topk_overlap(sa, sb, mask, 3).item())  # exact from the two id lists
    full_kl = symmetric_kl(sa, sb, mask).item()
    assert 0 < result["sym_kl"] <= full_kl + 1e-6  # the top-16 support gives a lower bound
    assert result["mean_delta"] == pytest.approx(mean_delta(token(sb), token(sa), mask).item())
    whole = measure_pair(a, b, rollouts, 3, topk=None)  # the whole vocabulary as support: exact
    assert whole["sym_kl"] == pytest.approx(full_kl, rel=1e-5)


def test_run_diagnose_on_saved_folders_prints_and_writes_json(tmp_path, capsys):
    tiny_policy(seed=0).save_pretrained(tmp_path / "a")
    tiny_policy(seed=1).save_pretrained(tmp_path / "b")
    out = tmp_path / "diag" / "d.json"
    result = run_diagnose(str(tmp_path / "a"), str(tmp_path / "b"), "reversal,count", 4, 4, 0, str(out))
    saved = json.loads(out.read_text())
    assert saved["overall"] == pytest.approx(result["overall"]) and saved["k"] == 4
    assert saved["settings"]["max_new_tokens"] == 16 and saved["settings"]["n"] == 1 and set(saved["per_capability"]) == {"reversal", "count"}
    printed = capsys.readouterr().out
    assert "top-4 overlap" in printed and "overall" in printed and "verdict: overall top-4 overlap" in printed
    assert ("close enough to merge" in printed) == (result["overall"]["overlap"] >= 0.90)
    # --n 2 --max-new-tokens 4: two rollouts of at most 4 tokens per prompt, 8 prompts over two tasks.
    given = {"n": 2, "max_new_tokens": 4, "temperature": None, "top_p": None, "batch_size": None}
    twice = run_diagnose(str(tmp_path / "a"), str(tmp_path / "b"), "reversal,count", 4, 4, 0, None, None, given)
    assert 8 < twice["overall"]["tokens"] <= 2 * 8 * 4
    assert "generation: max_new_tokens 4, temperature 1.0, top_p 1.0, n 2, batch_size 64" in capsys.readouterr().out


def test_run_diagnose_uses_the_run_directory_settings(tmp_path):
    run = tmp_path / "run"
    config = {
        "model": {"path": None},
        "warmup": {"enabled": False},
        "capabilities": [{"name": "rv", "builtin": "reversal", "options": {"test_size": 4}}],
        "branches": [{"name": "rev", "capabilities": ["rv"]}],
        "schedule": {"plan": "experts"},  # one branch: nothing to distil between
        "sampling": {"max_new_tokens": 2},
        "run": {"out": str(run)},
    }
    (run / "branches").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    policy = tiny_policy(seed=0)
    policy.save_pretrained(run / "branches" / "rev")
    policy.save_pretrained(run / "final")
    result = run_diagnose(str(run / "branches" / "rev"), str(run / "final"), "rv", 64, 2, 0, None)
    assert list(result["per_capability"]) == ["rv"]  # the run's own capability name resolves
    assert result["overall"]["tokens"] <= 4 * 2 and result["overall"]["overlap"] == 1.0


def test_vision_language_models_are_diagnosed_on_their_images_and_videos(tmp_path):
    from copd.backends.local.factory import make_policy
    from copd.multimodal.tiny import build_tiny_vl

    media = {"media_dir": str(tmp_path / "media"), "test_size": 3}
    vl_caps = [load_capability({"name": n, "builtin": n, **media}) for n in ("shapes", "motion")]
    a = make_policy("a", *build_tiny_vl(seed=0, init_std=0.3))
    b = make_policy("b", *build_tiny_vl(seed=1, init_std=0.3))
    seen = []
    generate = a.generate
    a.generate = lambda prompts, *args: seen.append(generate(prompts, *args)) or seen[-1]
    result = diagnose_models(a, b, vl_caps, 3, PARAMS, k=4, seed=0)
    assert [sorted(r.vision.tensors) for r in seen] == [["image_grid_thw", "pixel_values"],
                                                       ["pixel_values_videos", "video_grid_thw"]]
    assert all(r["tokens"] > 0 for r in result["per_capability"].values())
    assert diagnose_models(a, a, vl_caps, 3, PARAMS, k=4, seed=0)["overall"]["overlap"] == 1.0


def test_errors_are_copd_errors(tmp_path):
    tiny_policy(seed=0).save_pretrained(tmp_path / "a")
    tiny_policy(seed=0, alphabet="abc").save_pretrained(tmp_path / "abc")
    (tmp_path / "empty").mkdir()
    a = str(tmp_path / "a")
    with pytest.raises(CopdError, match="does not exist"):
        run_diagnose(a, str(tmp_path / "missing"), "reversal", 4, 4, 0, None)
    with pytest.raises(CopdError, match="no config.json"):
        run_diagnose(str(tmp_path / "empty"), a, "reversal", 4, 4, 0, None)
    with pytest.raises(CopdError, match="different tokenizers"):
        run_diagnose(a, str(tmp_path / "abc"), "reversal", 4, 4, 0, None)
    with pytest.raises(CopdError, match="--tasks"):
        run_diagnose(a, a, "nosuchtask", 4, 4, 0, None)
    with pytest.raises(CopdError, match="--k"):
        run_diagnose(a, a, "reversal", 4, 0, 0, None)


def test_add_parser_registers_the_command():
    parser = argparse.ArgumentParser(prog="copd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diagnose", "a", "b", "--tasks", "reversal"])
    assert (args.command, args.model_a, args.model_b, args.tasks) == ("diagnose", "a", "b", "reversal")
    assert (args.samples, args.k, args.seed, args.out) == (64, 4, 0, None)
    assert args.func is cmd_diagnose
    args = parser.parse_args(["diagnose", "a", "b", "--tasks", "x.jsonl", "--samples", "8", "--k", "2", "--out", "o.json"])
    assert (args.samples, args.k, args.out) == (8, 2, "o.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["diagnose", "a", "b"])  # --tasks is required
