"""Rollout engines for a run: checked before the run folder is written, started beside the branches, closed at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from copd.backends.engine.branch import EngineBranch
from copd.backends.engine.process import EngineProcess, check_engine_python
from copd.backends.engine.sampler import EngineSampler, TextPrompts
from copd.backends.roles import BranchRoles
from copd.errors import CopdError


def uses_engine(config) -> bool:
    return "vllm" in (config.sampling.engine, config.sampling.eval_engine)


def engine_python(config) -> str:
    return config.sampling.vllm.python or sys.executable


def check_engine(config) -> None:
    """With sampling.engine or eval_engine vllm: an interpreter that has vLLM (a one-line error otherwise)."""
    if uses_engine(config):
        check_engine_python(engine_python(config))


def check_engine_model(config, processing=None) -> None:
    """A vision-language model cannot go through the engine here (docs/scale.md, "A rollout engine"): say so before the run starts.

    Without `processing` (before the base is loaded) the config tells: a tiny vision-language
    architecture, or a model folder whose config.json names a vision-language family.
    """
    from copd.multimodal.processor import VLProcessor

    if not uses_engine(config):
        return
    if isinstance(processing, VLProcessor) if processing is not None else _configured_vision(config.model):
        raise CopdError("sampling.engine: vllm samples text models only in copd for now (vLLM's image and video processors "
                        "need torchvision, which the CPU build of vLLM cannot import); use sampling.engine: hf for "
                        "vision-language models")


def _configured_vision(model) -> bool:
    from copd.multimodal.families import FAMILIES

    if model.path:
        found = Path(model.path).expanduser() / "config.json"
        return found.is_file() and json.loads(found.read_text()).get("model_type") in FAMILIES
    return not model.gguf_file and model.tiny.architecture not in ("llama", "qwen2")


def engine_options(config, model_folder: Path) -> dict:
    """What the engine process is started with (copd/backends/engine/vllm_server.py)."""
    vllm, model = config.sampling.vllm, config.model
    dtype = vllm.dtype
    if dtype == "auto":
        dtype = model.compute_dtype if model.compute_dtype != "float32" else model.dtype
    # vLLM refuses more log-probs per token than it was started with (20 by default); the
    # student's top-k of a sparse support (opd.topk) must fit.
    max_logprobs = max(20, config.opd.topk or 0)
    return {"model": str(model_folder), "dtype": dtype, "enforce_eager": vllm.enforce_eager, "sleep": vllm.sleep,
            "max_logprobs": max_logprobs,
            "gpu_memory_utilization": vllm.gpu_memory_utilization, "max_model_len": vllm.max_model_len,
            "env": {"VLLM_CPU_KVCACHE_SPACE": f"{vllm.kv_cache_gib:g}", **vllm.env}}


def start_engine(config, name: str, model_folder: Path, log_folder: Path, tokenizer, env: dict | None = None,
                 wait: bool = True) -> EngineSampler:
    """An engine process for one branch (or for evaluation), loaded from `model_folder`; `env` added to its environment.
    With wait=False it is still loading: `.engine.ready()` waits for it."""
    options = engine_options(config, model_folder)
    options["env"].update(env or {})
    process = EngineProcess(name, engine_python(config), options, log_folder / f"{name}.log", config.sampling.vllm.start_timeout,
                            wait)
    return EngineSampler(name, process, TextPrompts.of(tokenizer, config.model.chat_template, config.model.system_prompt))


def local_engines(config, run_dir: Path, policies: dict) -> dict[str, BranchRoles]:
    """Each in-process branch with its own engine, started from the run's base folder; teachers score with the learner."""
    roles = {}
    try:
        for name, policy in policies.items():  # every engine starts loading before any is waited for
            engine = start_engine(config, name, run_dir / "base", run_dir / "engines", policy.tokenizer, wait=False)
            branch = EngineBranch(name, policy, engine)
            roles[name] = BranchRoles(sampler=branch, scorer=policy, learner=branch)
        for r in roles.values():
            r.sampler.engine.ready()
    except BaseException:
        close_engines(roles)
        raise
    return roles


def close_engines(roles: dict[str, BranchRoles]) -> None:
    for r in roles.values():
        if isinstance(r.sampler, EngineBranch):
            r.sampler.close()


class FolderSampler:
    """An engine sampling with the weights of a model folder (evaluation of base, branches and merged)."""

    def __init__(self, engine, folder: Path, loaded: list):
        self.engine, self.folder, self.loaded = engine, folder, loaded  # loaded: [folder the engine holds], shared

    def generate(self, prompts, n, params, seed):
        if self.loaded[:1] != [self.folder]:
            self.engine.reload(self.folder)
            self.loaded[:] = [self.folder]
        return self.engine.generate(prompts, n, params, seed)


def evaluation_engines(config, run_dir: Path, branches: dict[str, BranchRoles], tokenizer, stack) -> dict[str, FolderSampler]:
    """The models eval.json scores (base, each branch, merged), each sampled from its folder by one engine:
    the first branch's, or (when the branches sample with copd's own decoder) one started for this and closed by `stack`."""
    engine = next((r.sampler.engine for r in branches.values() if isinstance(r.sampler, EngineBranch)), None)
    if engine is None:
        engine = start_engine(config, "eval", run_dir / "base", run_dir / "engines", tokenizer)
        stack.callback(engine.close)
    loaded: list = []
    folders = {"base": run_dir / "base", **{f"branch:{n}": run_dir / "branches" / n for n in branches}, "merged": run_dir / "final"}
    return {label: FolderSampler(engine, folder, loaded) for label, folder in folders.items()}
