"""Saved weights read one tensor at a time: transformers folders and the LoRA adapters beside them.

Merging K branches must not hold K models in memory. BranchWeights reads a folder's
safetensors headers once (names, shapes, dtypes: no tensor data) and each tensor only when
asked, opening its file for that one read. LoraAdapter holds a branch's small PEFT adapter and
gives the weight delta PEFT would add to one base weight, so a LoRA branch's full weights can
be rebuilt from the base without reading its own big files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from copd.errors import CopdError

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# safetensors' names of the dtypes a model folder may hold (an unlisted one reads as None).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class BranchWeights:
    """The tensors of one saved model folder (model.safetensors, or shards listed by an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._file_of = self._files()
        self._header = self._headers()  # key -> (shape, safetensors dtype name)

    def _files(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, AttributeError):
                weight_map = None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CopdError(f"cannot merge: {index} has no weight_map")
            return {key: self.folder / name for key, name in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            raise CopdError(f"cannot merge: {self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)

    def _headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        header = {}
        for path in sorted(set(self._file_of.values())):
            if not path.is_file():
                raise CopdError(f"cannot merge: {path} (a shard listed in {self.folder / INDEX_FILE}) is missing")
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    if self._file_of.get(key) == path:
                        piece = f.get_slice(key)
                        header[key] = (tuple(piece.get_shape()), piece.get_dtype())
        for key, path in self._file_of.items():
            if key not in header:
                raise CopdError(f"cannot merge: {path} has no tensor {key!r}, which {self.folder / INDEX_FILE} lists there")
        return header

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._header[key][0]

    def dtype(self, key: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self._header[key][1])

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, in the dtype it was saved in, in memory of its own."""
        # Opened for this read alone: a handle kept open for the whole merge would keep each
        # file mapped, and the pages read counted as resident, K files at a time.
        with safe_open(str(self._file_of[key]), "pt") as f:
            return f.get_tensor(key)


# adapter_config.json fields that leave a plain LoRA delta, (B @ A) * lora_alpha / r on a
# Linear weight. Any other field with a truthy value (use_dora, use_rslora, fan_in_fan_out,
# modules_to_save, rank_pattern, alpha_pattern, lora_bias, a variant a newer PEFT adds) changes
# the delta or adds weights of its own, so such an adapter is not read here.
_PLAIN_LORA_FIELDS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "task_type", "inference_mode", "base_model_name_or_path", "revision", "peft_version",
    "auto_mapping", "bias", "init_lora_weights", "megatron_core", "qalora_group_size", "eva_config", "corda_config",
    "loftq_config",
}
_PREFIX, _A, _B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


class LoraAdapter:
    """A branch's PEFT adapter: the weight delta it adds to each targeted base weight."""

    def __init__(self, folder: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float):
        self.folder, self._pairs, self.scaling = folder, pairs, scaling

    @classmethod
    def read(cls, branch_folder: Path) -> LoraAdapter | None:
        """branch_folder/adapter, or None when absent or not a plain LoRA this class reproduces exactly."""
        folder = Path(branch_folder) / "adapter"
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not (config_file.is_file() and weights_file.is_file()):
            return None
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            return None  # the full weights beside it are read instead
        if not isinstance(config, dict) or not _is_plain_lora(config):
            return None
        pairs = _lora_pairs(load_file(str(weights_file)))
        # PEFT's scaling for a plain LoRA: the same Python division, so the same float.
        return None if pairs is None else cls(folder, pairs, config["lora_alpha"] / config["r"])

    def targets(self):
        """The base model's weight keys (state-dict names) this adapter changes, as a set-like view."""
        return self._pairs.keys()

    def delta_shape(self, key: str) -> tuple[int, ...]:
        lora_A, lora_B = self._pairs[key]
        return (lora_B.shape[0], lora_A.shape[1])

    def delta(self, key: str) -> torch.Tensor:
        """PEFT's lora.Linear.get_delta_weight, step by step, as it runs on a CPU."""
        lora_A, lora_B = self._pairs[key]
        dtype = lora_B.dtype
        # PEFT multiplies half-precision adapters on a CPU in float32 and casts the product back.
        cast_to_fp32 = dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            lora_A, lora_B = lora_A.float(), lora_B.float()
        delta = (lora_B @ lora_A) * self.scaling
        return delta.to(dtype=dtype) if cast_to_fp32 else delta


def _is_plain_lora(config: dict) -> bool:
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        return False
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)) or config["r"] <= 0:
        return False
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        return False  # PiSSA, OLoRA, LoftQ... rewrite the base weights when the adapter is made
    return not any(value for field, value in config.items() if field not in _PLAIN_LORA_FIELDS)


def _lora_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{base weight key: (lora_A, lora_B)} from PEFT's saved names, or None for any other tensor
    (embedding adapters, DoRA magnitudes, biases) or an A without its B."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if not name.startswith(_PREFIX) or not name.endswith((_A, _B)) or tensor.dim() != 2:
            return None
        module, half = name[len(_PREFIX):-len(_A)], name[-len(_A):]
        halves.setdefault(f"{module}.weight", {})[half] = tensor
    if any(len(pair) != 2 or pair[_A].shape[0] != pair[_B].shape[1] for pair in halves.values()):
        return None
    return {key: (pair[_A], pair[_B]) for key, pair in halves.items()}


def model_keys_by_saved_name(model: torch.nn.Module) -> dict[str, list[str]] | None:
    """{name save_pretrained gives a tensor: the model's state-dict keys of that tensor}.

    Several keys share one tensor where weights are tied (lm_head.weight and
    embed_tokens.weight). None when transformers converts weights on saving by more than a
    renaming (experts fused into one tensor, say): a saved tensor is then no one model tensor.
    """
    state = model.state_dict()
    sharing: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        sharing.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)), []).append(key)
    aliases = {key: keys for keys in sharing.values() for key in keys}
    # Shape-only stand-ins: a renaming hands the same object back under its saved name.
    stand_ins = {key: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for key, tensor in state.items()}
    saved = _as_saved(model, stand_ins)
    if saved is None:
        return None
    key_of = {id(tensor): key for key, tensor in stand_ins.items()}
    keys_by_name = {}
    for name, tensor in saved.items():
        if id(tensor) not in key_of:
            return None
        keys_by_name[name] = aliases[key_of[id(tensor)]]
    return keys_by_name


def _as_saved(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The state dict under the names save_pretrained writes (transformers 5 converts some models' weights on saving)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers saves the state dict's own names
        return state
    try:
        return revert_weight_conversion(model, dict(state))
    except Exception:  # a conversion that cannot run on shape-only stand-ins: the caller reads whole folders instead
        return None
