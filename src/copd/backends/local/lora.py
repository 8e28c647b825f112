"""LoRA branches: one frozen base model in memory, one PEFT adapter per branch.

A branch is an HFPolicy whose trainable parameters are its adapter's; before every
generate, score or update it makes its adapter the active one. A teacher therefore scores
a student's rollouts by switching adapters on the same weights, so K branches cost one
base model plus K small adapters (and their optimizer state).

A branch is saved as a standard transformers folder holding base + its weight delta
(B A * alpha / r, computed by PEFT), with the adapter itself beside it in PEFT's format.
Merging these folders against RUN/base (mean, task arithmetic, TIES) thus merges the
branches' weight deltas into the base.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from copd.backends.local.hf import HFPolicy, export_state
from copd.errors import CopdError


def _peft():
    try:
        import peft
    except ImportError:
        raise CopdError("lora.enabled needs the peft package: pip install 'copd[lora]'") from None
    return peft


def adapter_name(branch: str) -> str:
    """PEFT keeps adapters in module dicts, whose keys may not contain dots; the prefix keeps
    a short name such as "a" from matching inside PEFT's own "lora_" parameter names."""
    return "branch_" + re.sub(r"[^0-9A-Za-z_]", "_", branch)


class SharedBase:
    """The frozen base model with one LoRA adapter per branch injected by PEFT."""

    def __init__(self, model, branches: list[str], rank: int, alpha: float, dropout: float, target_modules):
        peft = _peft()
        # Taken before injection: the tensors are the frozen base weights themselves (no copy),
        # under the model's own key names, which is what a saved branch folder must use.
        self.base_state = model.state_dict()
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
        names = [adapter_name(b) for b in branches]
        if len(set(names)) != len(names):
            raise CopdError(f"branch names {branches} collide as adapter names {names}; rename a branch")
        try:
            with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                self.model = peft.get_peft_model(model, config, adapter_name=names[0])
        except ValueError as err:
            raise CopdError(f"lora: {err}") from None
        for name in names[1:]:
            self.model.add_adapter(name, config)
        self.active: str | None = None

    def use(self, adapter: str | None) -> None:
        """Compute with one adapter, or with the plain base when `adapter` is None."""
        if adapter == self.active:
            return
        lora = self.model.base_model
        if adapter is None:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            self.model.set_adapter(adapter)
        self.active = adapter

    def adapter_parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        marker = f".{adapter}."
        return [p for n, p in self.model.named_parameters() if "lora_" in n and marker in n]

    def merged_state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """The base weights with this adapter's delta added, under the base model's key names."""
        from peft.tuners.lora import LoraLayer

        merged = dict(self.base_state)
        for path, module in self.model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                base = module.get_base_layer().weight
                delta = module.get_delta_weight(adapter)
                merged[f"{path}.weight"] = (base.detach().float() + delta.detach().float()).to(base.dtype)
        return merged


class LoraPolicy(HFPolicy):
    """One branch of a SharedBase; `adapter=None` is a read-only view of the base itself."""

    def __init__(self, name: str, shared: SharedBase, tokenizer, adapter: str | None, lr: float = 1e-4, weight_decay: float = 0.0,
                 device: str = "cpu", chat_template: str = "auto", system_prompt: str | None = None, **options):
        """`options`: HFPolicy's (compute_dtype, micro_batch_tokens, gradient_checkpointing)."""
        self.shared, self.adapter = shared, adapter
        params = shared.adapter_parameters(adapter) if adapter else []
        super().__init__(name, shared.model, tokenizer, lr, weight_decay, device, chat_template, system_prompt, params=params,
                         **options)

    def activate(self) -> None:
        self.shared.use(self.adapter)

    def _adapter_only(self) -> str:
        if self.adapter is None:
            raise CopdError(f"policy {self.name!r} is the frozen base of LoRA branches and has no weights of its own")
        return self.adapter

    def parameter_counts(self) -> tuple[int, int]:
        base = sum(t.numel() for n, t in self.model.named_parameters() if "lora_" not in n)
        return sum(t.numel() for t in self.params), base

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The adapter's weights, keyed without the adapter name (so they load into another)."""
        peft = _peft()
        state = peft.get_peft_model_state_dict(self.model, adapter_name=self._adapter_only())
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        result = _peft().set_peft_model_state_dict(self.model, weights, adapter_name=self._adapter_only())
        missing = [k for k in result.missing_keys if f".{self.adapter}." in k and "lora_" in k]
        if missing:
            raise CopdError(f"branch {self.name!r}: adapter weights are missing {missing[0]}")

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.get_weights(), str(folder / "adapter.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_checkpoint(self, folder: Path) -> None:
        self.set_weights(load_file(str(folder / "adapter.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device))

    def export_weights(self, folder: Path) -> int:
        """The branch's merged weights (base + its adapter's delta) as a safetensors folder, what a rollout engine
        reloads; returns their bytes. Merged rather than the adapter: the engine then runs the plain model."""
        state = self.shared.base_state if self.adapter is None else self.shared.merged_state_dict(self.adapter)
        return export_state(self.model.get_base_model(), folder, dict(state))

    def save_pretrained(self, folder: Path) -> None:
        """A standard transformers folder (base + delta) and the PEFT adapter in folder/adapter."""
        folder.mkdir(parents=True, exist_ok=True)
        plain = self.model.get_base_model()
        if self.adapter is None:
            plain.save_pretrained(folder, state_dict=dict(self.shared.base_state), safe_serialization=True)
        else:
            plain.save_pretrained(folder, state_dict=self.shared.merged_state_dict(self.adapter), safe_serialization=True)
            adapter_dir = folder / "adapter"
            adapter_dir.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.get_weights().items()}, str(adapter_dir / "adapter_model.safetensors"))
            self.model.peft_config[self.adapter].save_pretrained(str(adapter_dir))
        self.tokenizer.save_pretrained(folder)
