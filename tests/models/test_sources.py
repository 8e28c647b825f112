"""Where the base model comes from: a folder, a GGUF file (converted once), or a hub id."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from copd.config.schema import ModelConfig
from copd.driver.pipeline import run_training
from copd.errors import CopdError
from copd.models import fetch
from copd.models.sources import is_hub_id, load_base_model
from tests.cli.test_main import fails, write_config
from tests.e2e.test_text import tiny_config
from tests.extras import require
from tests.tiny_gguf import tiny_qwen2, write_tiny_gguf

require("gguf")


@pytest.fixture
def gguf_file(tmp_path):
    source = tiny_qwen2()
    return source, write_tiny_gguf(source, tmp_path / "tiny.gguf")


def test_gguf_file_loads_the_same_model_and_converts_once(gguf_file, tmp_path, monkeypatch):
    source, path = gguf_file
    cfg = ModelConfig(gguf_file=str(path), cache_dir=str(tmp_path / "cache"))
    model, tokenizer = load_base_model(cfg)
    ids = tokenizer("12+3=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits)
    assert tokenizer.decode(ids[0]) == "12+3="
    # The second load reads the cached folder: converting again would fail here.
    monkeypatch.setattr(fetch, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again, _ = load_base_model(ModelConfig(path=str(tmp_path), gguf_file="tiny.gguf", cache_dir=str(tmp_path / "cache")))
    torch.testing.assert_close(again.state_dict()["lm_head.weight"], source.state_dict()["lm_head.weight"])


def test_a_run_on_a_gguf_base_writes_standard_folders(gguf_file, tmp_path):
    _, path = gguf_file
    config = tiny_config(tmp_path, "run", schedule={"cycles": 1, "rl_steps": 1, "opd_steps": 1}, eval={"samples": 4})
    config.model.gguf_file = str(path)
    run_dir = run_training(config)
    for folder in ("base", "branches/rev", "final"):
        assert AutoModelForCausalLM.from_pretrained(run_dir / folder).config.model_type == "qwen2"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"gguf_file": "missing.gguf"}, "model.gguf_file: no such file"),
        ({"path": "org/model-that-is-not-cached"}, "loading it from the Hugging Face hub failed"),
    ],
)
def test_bad_model_sources_fail_cleanly_and_write_nothing(tmp_path, capsys, monkeypatch, model, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so setenv is too late
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, model={**model, "cache_dir": str(tmp_path / "cache")})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert message in err and not (tmp_path / "run").exists()


def test_gguf_file_needs_the_gguf_suffix(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CopdError, match="does not end in .gguf"):
        load_base_model(ModelConfig(gguf_file=str(tmp_path / "weights.bin")))


def test_hub_ids_are_names_that_are_not_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("gpt2")
    assert not is_hub_id("/abs/folder") and not is_hub_id("./rel") and not is_hub_id("~/models/x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert not is_hub_id("org/local")  # an existing folder always wins
