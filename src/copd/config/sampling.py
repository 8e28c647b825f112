"""The `sampling` section: how rollouts are drawn, and by which engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from copd.config.fields import Section, one_of
from copd.core.correction import ROLLOUT_CORRECTIONS

CorrectionName = one_of(ROLLOUT_CORRECTIONS, "rollout correction")


class VLLMConfig(Section):
    """The vLLM engine of each branch (sampling.engine: vllm): its own process, in its own Python environment."""

    python: str | None = Field(None, description="the Python interpreter of an environment with vLLM installed (`make vllm` builds .venv-vllm/bin/python, a CPU build); unset: this interpreter, when it has vLLM")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="the engine's weights and compute; auto: model.compute_dtype when it is not float32, else model.dtype")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="on a GPU: the fraction of its memory the engine may take (weights and KV cache), beside its colocated learner")
    kv_cache_gib: float = Field(2.0, gt=0, description="on a CPU: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int | None = Field(None, gt=0, description="longest prompt + completion the engine plans for (default: the model's own limit)")
    sleep: bool = Field(False, description="on a GPU shared with the learner: the engine sleeps between samplings (weights to host memory, KV cache freed; vLLM's sleep mode) so the update has the memory")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of the engine process, e.g. {VLLM_CPU_OMP_THREADS_BIND: 0-1}")
    enforce_eager: bool = Field(True, description="no CUDA graphs (a faster start, slower decoding on a GPU)")
    correction: CorrectionName = Field("tis", description="how each token's loss makes up for the engine sampling from its own log-probs rather than the learner's: tis (truncated importance sampling, weight min(pi_learner/pi_engine, correction_cap)), mask (drop tokens whose ratio is outside [1/cap, cap]) or none")
    correction_cap: float = Field(2.0, gt=1, description="the cap of the importance ratio (tis) or of its band (mask)")
    start_timeout: float = Field(600.0, gt=0, description="seconds the engine may take to load the model before the run stops")


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0, description="rollout temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(8, gt=0, description="maximum completion length")
    engine: Literal["hf", "vllm"] = Field("hf", description="who samples the rollouts: hf (copd's own transformers decoding in the learner, the reference) or vllm (a vLLM engine per branch, in its own process, synced with the branch's weights after every update; text models only)")
    eval_engine: Literal["hf", "vllm"] = Field("hf", description="who samples for evaluation (eval.json): hf keeps scores comparable across runs whatever engine trained them; vllm evaluates every model (base, branches, merged) through one vLLM engine")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
