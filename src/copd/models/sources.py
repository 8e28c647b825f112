"""Base models: build a tiny transformers model with a local character tokenizer, or load a folder.

Nothing is downloaded: the tiny model is a standard Llama or Qwen2 architecture built
from config, and its tokenizer is made with the `tokenizers` library, so both save and
load with the usual `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, PreTrainedTokenizerFast

from copd.capabilities import CHAR_ALPHABET
from copd.config.schema import ModelConfig, TinyModelConfig
from copd.errors import CopdError
from copd.multimodal.processor import VLProcessor, is_vision_language

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The tiny model's characters: the built-in tasks' first (their ids do not move), then every printable one.
TINY_ALPHABET = CHAR_ALPHABET + "".join(c for c in string.printable if c.isprintable())
_TINY_CHARACTERS = frozenset(TINY_ALPHABET)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
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


def tiny_alphabet_problem(text: str) -> str | None:
    """None when the tiny model's character tokenizer encodes all of `text`, else the first character it
    would read as <unk> (anything outside printable ASCII: accents, tabs and newlines too)."""
    bad = next((c for c in text if c not in _TINY_CHARACTERS), None)
    if bad is None:
        return None
    return (f"character {bad!r} (U+{ord(bad):04X}) is not in the tiny model's alphabet (printable ASCII; its tokenizer "
            "would read it as <unk>); keep the text to printable ASCII, or set model.path to a pretrained model")


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
    """Load a standard transformers folder: (model, tokenizer), or (model, VLProcessor) for Qwen2-VL, Qwen2.5-VL or Qwen3-VL."""
    return _load(check_model_folder(path), dtype)


def _load(source: str | Path, dtype: str):
    """(model, tokenizer), or (model, VLProcessor) for a vision-language model."""
    config = AutoConfig.from_pretrained(source)
    if is_vision_language(config):
        model = own_memory(AutoModelForImageTextToText.from_pretrained(source, dtype=DTYPES[dtype]))
        return model, VLProcessor.from_pretrained(source)
    tokenizer = load_tokenizer(source)
    model = own_memory(AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype]))
    return model, tokenizer


def load_tokenizer(source: str | Path):
    """A text model's tokenizer, padding with EOS when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def own_memory(model):
    """The model with its weights copied out of the file's memory map, in ordinary memory.

    Kernels take other code paths on mmapped memory and round differently, so a resumed run
    (whose base is read from disk) would drift from the uninterrupted one.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


def is_hub_id(path: str) -> bool:
    """"org/name" or "name" as the Hugging Face hub spells ids (never a path that exists here)."""
    return bool(_HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def gguf_path(cfg: ModelConfig) -> Path:
    """model.gguf_file, read relative to model.path when both are given (as transformers does)."""
    gguf = Path(cfg.gguf_file).expanduser()
    return Path(cfg.path).expanduser() / gguf if cfg.path and not gguf.is_absolute() else gguf


def check_model_source(cfg: ModelConfig) -> None:
    """Fail before anything is written when model.path / model.gguf_file cannot be a model."""
    if cfg.gguf_file:
        gguf = gguf_path(cfg)
        if not gguf.is_file():
            raise CopdError(f"model.gguf_file: no such file: {gguf}")
        if gguf.suffix.lower() != ".gguf":
            raise CopdError(f"model.gguf_file: {gguf} does not end in .gguf")
    elif cfg.path and not is_hub_id(cfg.path):
        check_model_folder(cfg.path)


def load_base_model(cfg: ModelConfig):
    """The user's pretrained model: a local folder, a GGUF file (converted once), or a hub id."""
    check_model_source(cfg)
    if cfg.gguf_file:
        return _load(_converted_gguf(gguf_path(cfg), Path(cfg.cache_dir).expanduser()), cfg.dtype)
    if not is_hub_id(cfg.path):
        return load_pretrained(cfg.path, cfg.dtype)
    try:
        return _load(cfg.path, cfg.dtype)
    except OSError as err:  # no network, unknown id, gated repo...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CopdError(f"model.path {cfg.path!r} is not a local folder, and loading it from the Hugging Face hub failed: {reason}") from None


def _converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A dequantised safetensors folder of `gguf` in the cache, keyed by the file's identity."""
    from copd.models.fetch import convert_gguf

    stat = gguf.resolve().stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / "gguf" / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging)
        staging.rename(target)
    return target


def save_pretrained(model, tokenizer, folder: Path) -> None:
    """Save a model folder that AutoModelForCausalLM.from_pretrained loads (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
