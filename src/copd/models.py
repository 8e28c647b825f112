"""Base models: build a tiny transformers model with a local character tokenizer, or load a folder.

Nothing is downloaded: the tiny model is a standard Llama or Qwen2 architecture built
from config, and its tokenizer is made with the `tokenizers` library, so both save and
load with the usual `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from copd.config import ModelConfig, TinyModelConfig
from copd.errors import CopdError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character; decoding fuses characters back without separators."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A standard transformers causal LM of a few hundred thousand to a few million parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    builders = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = builders[cfg.architecture]
    torch.manual_seed(seed)
    return model_cls(config_cls(**common))


def check_model_folder(path: str | Path) -> Path:
    """The folder of a transformers model, or a CopdError saying what is wrong with `path`."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CopdError(f"model path does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise CopdError(f"model path {folder} has no config.json; expected a transformers model folder")
    return folder


def load_pretrained(path: str | Path, dtype: str = "float32"):
    """Load a standard transformers folder (model + tokenizer)."""
    folder = check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_pretrained(model, tokenizer, folder: Path) -> None:
    """Save a model folder that AutoModelForCausalLM.from_pretrained loads (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def model_config_key(cfg: ModelConfig) -> dict:
    """What identifies a built base model in the cache."""
    return {"tiny": cfg.tiny.model_dump(), "dtype": cfg.dtype}
