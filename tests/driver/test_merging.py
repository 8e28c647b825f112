"""merge_branches streams branch weights from disk and writes the same bytes as merging whole state dicts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import copd.driver.merging as merging
from copd.backends.local.factory import make_policy
from copd.config.schema import TinyModelConfig
from copd.core.merge import MERGE_METHODS, merge_state_dicts
from copd.driver.lazy_weights import BranchWeights, LoraAdapter
from copd.driver.merging import merge_branches
from copd.errors import CopdError
from copd.models.sources import build_char_tokenizer, build_tiny_model, load_pretrained
from tests.extras import needs
from tests.fakes import make_config

NAMES = ("add", "rev", "cnt")
BRANCHES = [{"name": "add", "capabilities": ["addition"], "weight": 1.0},
            {"name": "rev", "capabilities": ["reversal"], "weight": 2.0},
            {"name": "cnt", "capabilities": ["count"], "weight": 0.5}]
TINY = TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=32)


def run_config(run: Path, method: str, dtype: str = "float32", **sections):
    merge = {"method": method, "scale": 0.7, "density": 0.3}
    return make_config(run, BRANCHES, merge=merge, model={"dtype": dtype}, **sections)


def tiny_base():
    tokenizer = build_char_tokenizer("0123456789+=abc")
    torch.manual_seed(0)
    return build_tiny_model(TINY, tokenizer), tokenizer  # ties lm_head.weight to embed_tokens.weight


def full_run(run: Path, max_shard_size: str | None = None, model=None, tokenizer=None) -> Path:
    """RUN/base and RUN/branches/NAME: the base perturbed by a different noise per branch."""
    if model is None:
        model, tokenizer = tiny_base()
    save(model, tokenizer, run / "base")
    for k, name in enumerate(NAMES):
        branch = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for param in branch.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        save(branch, tokenizer, run / "branches" / name, max_shard_size)
    return run


def save(model, tokenizer, folder: Path, max_shard_size: str | None = None) -> None:
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)


def merge_in_memory(run: Path, config, out: Path) -> None:
    """What merge_branches did before it streamed: every branch loaded whole, then merge_state_dicts."""
    method = config.merge.method
    spec = MERGE_METHODS[method]
    states = [load_pretrained(run / "branches" / name, config.model.dtype)[0].state_dict() for name in NAMES]
    base_model, tokenizer = load_pretrained(run / "base", config.model.dtype)
    options = {k: getattr(config.merge, k) for k in spec.defaults}
    weights = [b.weight for b in config.branches] if spec.weights != "forbidden" else None
    if weights is not None and spec.weights == "optional":
        weights = [w / sum(weights) for w in weights]
    base_model.load_state_dict(merge_state_dicts(states, method, weights=weights, base=base_model.state_dict(), **options))
    make_policy("merged", base_model, tokenizer, **config.model.policy_options()).save_pretrained(out)


def assert_same_files(ours: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.fixture
def reads(monkeypatch):
    """Every (folder name, tensor name) BranchWeights.tensor reads, in order; no whole-model fallback."""
    seen = []
    original = BranchWeights.tensor

    def tensor(self, key):
        seen.append((self.folder.name, key))
        return original(self, key)

    def no_fallback(*args):
        raise AssertionError("merged loaded models instead of streaming")

    monkeypatch.setattr(BranchWeights, "tensor", tensor)
    monkeypatch.setattr(merging, "_merge_loaded", no_fallback)
    return seen


@pytest.mark.parametrize("method, dtype", [("mean", "float32"), ("weighted", "float32"), ("task_arithmetic", "float32"),
                                           ("ties", "float32"), ("task_arithmetic", "bfloat16"), ("ties", "bfloat16")])
def test_streaming_writes_the_bytes_of_the_in_memory_merge(tmp_path, reads, method, dtype):
    run = full_run(tmp_path / "run")
    config = run_config(run, method, dtype)
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    # Key by key, each branch's tensor read once: never more than one key's tensors at a time.
    keys = BranchWeights(run / "base").keys()
    assert "lm_head.weight" not in keys  # the tied duplicate is not saved, and is merged with embed_tokens
    assert reads == [(name, key) for key in keys for name in NAMES]


def test_sharded_branch_folders(tmp_path, reads):
    run = full_run(tmp_path / "run", max_shard_size="20KB")
    index = json.loads((run / "branches" / "rev" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = run_config(run, "ties")
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config, out=tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "reference")


def test_a_missing_or_misshapen_tensor_is_named_before_any_tensor_is_read(tmp_path, reads):
    run = full_run(tmp_path / "run")
    config = run_config(run, "mean")
    branch_file = run / "branches" / "rev" / "model.safetensors"
    tensors = load_file(branch_file)
    key = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, branch_file, metadata={"format": "pt"})
    with pytest.raises(CopdError, match=rf"branches/rev lacks the tensor '{key}'"):
        merge_branches(run, config)
    save_file({**tensors, key: torch.zeros(3, 4)}, branch_file, metadata={"format": "pt"})
    with pytest.raises(CopdError, match=rf"'{key}' has shape \[3, 4\] in .*branches/rev"):
        merge_branches(run, config)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, branch_file, metadata={"format": "pt"})
    with pytest.raises(CopdError, match="branches/rev has a tensor 'extra.weight'"):
        merge_branches(run, config)
    assert reads == []


def test_a_folder_without_safetensors(tmp_path):
    run = full_run(tmp_path / "run")
    (run / "branches" / "cnt" / "model.safetensors").unlink()
    with pytest.raises(CopdError, match="branches/cnt has neither model.safetensors"):
        merge_branches(run, run_config(run, "mean"))


def test_renamed_weights_of_a_vision_language_model(tmp_path, reads):
    from copd.multimodal.tiny import build_tiny_vl

    # transformers 5 keeps Qwen2-VL's text weights under model.language_model.* but saves them as model.*.
    model, processor = build_tiny_vl(seed=0, hidden=32, vision_dim=16)
    run = full_run(tmp_path / "run", model=model, tokenizer=processor)
    config = run_config(run, "ties")
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    assert len(reads) == 3 * len(BranchWeights(run / "base").keys())


def test_weights_transformers_converts_on_loading_are_merged_from_loaded_models(tmp_path, monkeypatch):
    from transformers import MixtralConfig, MixtralForCausalLM

    # Mixtral's saved per-expert weights are fused into one tensor per layer when loaded.
    tokenizer = build_char_tokenizer("0123456789+=abc")
    torch.manual_seed(0)
    mixtral = MixtralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    run = full_run(tmp_path / "run", model=MixtralForCausalLM(mixtral), tokenizer=tokenizer)
    config = run_config(run, "ties")
    merge_in_memory(run, config, tmp_path / "reference")
    fallbacks = []
    original = merging._merge_loaded
    monkeypatch.setattr(merging, "_merge_loaded", lambda *args: fallbacks.append(1) or original(*args))
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    assert fallbacks == [1]


def lora_run(run: Path, saved_dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA run's folders, saved by LoraPolicy itself: base + delta, and the adapter beside it."""
    from copd.backends.local.lora import LoraPolicy, SharedBase, adapter_name

    model, tokenizer = tiny_base()
    shared = SharedBase(model.to(saved_dtype), list(NAMES), rank=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    LoraPolicy("base", shared, tokenizer, None).save_pretrained(run / "base")
    for k, name in enumerate(NAMES):
        policy = LoraPolicy(name, shared, tokenizer, adapter_name(name))
        generator = torch.Generator().manual_seed(k + 1)
        noise = {key: 0.3 * torch.randn(v.shape, generator=generator).to(v.dtype) for key, v in policy.get_weights().items()}
        policy.set_weights(noise)  # B is no longer zero: every branch moves away from the base
        policy.save_pretrained(run / "branches" / name)
    return run


@needs("peft")
@pytest.mark.parametrize("method", ["mean", "weighted", "task_arithmetic", "ties"])
def test_lora_branches_merge_through_their_adapters(tmp_path, reads, method):
    run = lora_run(tmp_path / "run")
    config = run_config(run, method, lora={"enabled": True, "r": 4, "alpha": 8.0})
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    assert reads == []  # neither the branches' nor the base's tensors: the model and adapters sufficed


@needs("peft")
@pytest.mark.parametrize("saved, loaded", [("bfloat16", "bfloat16"), ("bfloat16", "float32")])
def test_lora_branches_in_bfloat16(tmp_path, reads, saved, loaded):
    run = lora_run(tmp_path / "run", getattr(torch, saved))
    config = run_config(run, "task_arithmetic", loaded, lora={"enabled": True, "r": 4, "alpha": 8.0})
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    # Loaded in another dtype than saved, the base is read as saved to rebuild each branch's weight.
    assert {folder for folder, _ in reads} <= {"base"} and bool(reads) == (saved != loaded)


@needs("peft")
def test_an_adapter_it_does_not_reproduce_falls_back_to_the_full_folders(tmp_path, reads):
    run = lora_run(tmp_path / "run")
    adapter_config = run / "branches" / "rev" / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "use_rslora": True}))
    assert LoraAdapter.read(run / "branches" / "rev") is None and LoraAdapter.read(run / "branches" / "add") is not None
    config = run_config(run, "ties", lora={"enabled": True, "r": 4, "alpha": 8.0})
    merge_in_memory(run, config, tmp_path / "reference")
    merge_branches(run, config)
    assert_same_files(run / "final", tmp_path / "reference")
    assert {folder for folder, _ in reads} == set(NAMES)


@needs("peft")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls a transformers method deprecated in v5
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_delta_is_pefts_own(tmp_path, dtype):
    import peft

    model, _ = tiny_base()
    config = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules="all-linear")
    wrapped = peft.get_peft_model(model.to(dtype), config, autocast_adapter_dtype=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    wrapped.save_pretrained(tmp_path)
    adapter_dir = tmp_path / "branch" / "adapter"
    adapter_dir.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / name).rename(adapter_dir / name)
    adapter = LoraAdapter.read(tmp_path / "branch")
    layers = {f"{path}.weight": m for path, m in wrapped.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}
    assert set(adapter.targets()) == set(layers) and layers
    for key, layer in layers.items():
        expected = layer.get_delta_weight("default")
        assert expected.dtype == dtype and torch.equal(adapter.delta(key), expected), key
