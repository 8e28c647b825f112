"""The measurements of benchmarks/memory.py, each run alone in a fresh process (see that file's docstring).

A point is a dict of plain values (so it crosses as JSON); `measure(point)` builds what the
point needs, resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) just
before the measured call, and returns the peak over that call and the call's seconds.
VmHWM rather than ru_maxrss: the latter is inherited across exec from the parent process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from pathlib import Path

import torch

from copd.backends.local import lm_head
from copd.backends.local.hf import HFPolicy
from copd.backends.roles import LossSpec, OPDPart, RLPart, Rollouts, ScoreRequest, Scores

VOCAB = 151_936  # Qwen3's, the paper's models
PROMPT = 16  # prompt tokens of every row
MIB = 2**20
# Qwen3-4B (its config.json): what `paper` builds, scaled down by its flags.
QWEN3_4B = dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, tokens=16384)
QUICK_PAPER = dict(hidden=128, layers=1, heads=2, kv_heads=1, head_dim=64, intermediate=256, tokens=256)  # seconds on a CPU
DEMO_YAML = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


# ---- memory counters ----------------------------------------------------------------
def _status(field: str) -> float:
    """A /proc/self/status figure (kB) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


def peak_mib(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MIB
    return _status("VmHWM")


def now_mib(device: str = "cpu") -> float:
    return torch.cuda.memory_allocated() / MIB if device.startswith("cuda") else _status("VmRSS")


@contextlib.contextmanager
def measured(found: dict, device: str = "cpu"):
    """Fill found with start_mib, peak_mib and seconds of the block."""
    found["start_mib"] = now_mib(device)
    reset_peak(device)
    start = time.perf_counter()
    yield found
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    found["seconds"] = time.perf_counter() - start
    found["peak_mib"] = peak_mib(device)


# ---- models, rollouts, policies -------------------------------------------------------
def qwen3(hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, intermediate=128, vocab=VOCAB, seed=0,
          dtype=torch.float32, device="cpu"):
    """A Qwen3 causal LM built from config, random weights, tied embeddings, made directly in dtype on device."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                         max_position_embeddings=65_536, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(config, dtype=dtype)


def rollouts(rows: int, width: int, vocab: int = VOCAB, seed: int = 0) -> Rollouts:
    """rows x (PROMPT + width) random ids, every completion slot a token (the same for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, PROMPT + width), generator=gen)
    return Rollouts(ids, torch.ones_like(ids), PROMPT, torch.ones(rows, width), [""] * rows)


def policy(model, mode: str, budget: int, device: str = "cpu") -> HFPolicy:
    """before: one pass per part, whole [B, T, V] log-softmax (the previous release); after: the budget and the
    chunked LM head; ckpt: after + activation checkpointing. Generation is never called: no tokenizer needed."""
    tokenizer = types.SimpleNamespace(padding_side="left", pad_token_id=0, eos_token_id=2)
    found = HFPolicy("a", model, tokenizer, lr=1e-5, device=device, gradient_checkpointing=mode == "ckpt",
                     micro_batch_tokens=10**12 if mode == "before" else budget)
    if mode == "before":
        lm_head.LOGITS_PER_CHUNK = 10**15
    return found


# ---- the measurements ---------------------------------------------------------------------
def update_point(p: dict) -> dict:
    """One RL update, or one OPD update (exact_kl, teacher's top-16 support read from p['scores'])."""
    student = policy(qwen3(seed=0), p["mode"], p["budget"])
    data = rollouts(p["rows"], p["width"], seed=1)
    if p["part"] == "rl":
        adv_B = torch.randn(p["rows"], generator=torch.Generator().manual_seed(2))
        args = ([RLPart(data, adv_B)], [], LossSpec(step_kl=False))
    else:
        scores = Scores(**torch.load(p["scores"]))
        args = ([], [OPDPart(data, scores, 0.1, "a<-b")], LossSpec(opd_estimator="exact_kl", step_kl=False))
    found = {}
    with measured(found):
        result = student.update(*args)
    return {**found, "loss": result.metrics.get("loss"), "skipped": result.skipped}


def score_point(p: dict) -> dict:
    """The teacher's scores of the OPD rollouts with its top-16 support; saved to p['save'] when given."""
    teacher = policy(qwen3(seed=3), p["mode"], p["budget"])
    data = rollouts(p["rows"], p["width"], seed=1)
    found = {}
    with measured(found):
        scores = teacher.score(data, ScoreRequest.support(16))
    if p.get("save"):
        torch.save(dataclasses.asdict(scores), p["save"])
    return found


def merge_point(p: dict) -> dict:
    """merge_branches (streaming) or the old path (every branch loaded whole, merge_state_dicts) on p['run']."""
    from copd.config.loader import load_config

    names = [f"b{k}" for k in range(p["k"])]
    branches = ", ".join(f"{{name: {n}, capabilities: [sort]}}" for n in names)
    config = load_config(DEMO_YAML, ["topology.kind=mesh", f"branches=[{branches}]"])
    run, found = Path(p["run"]), {}
    with measured(found):
        if p["mode"] == "streaming":
            from copd.driver.merging import merge_branches

            merge_branches(run, config, out=run / f"final_{p['mode']}")
        else:
            merge_in_memory(run, config, names, run / f"final_{p['mode']}")
    return found


def merge_in_memory(run: Path, config, names: list[str], out: Path) -> None:
    """What merge_branches did before it streamed: every branch loaded whole, then merge_state_dicts."""
    from copd.backends.local.factory import make_policy
    from copd.core.merge import merge_state_dicts
    from copd.models.sources import load_pretrained

    states = [load_pretrained(run / "branches" / n, config.model.dtype)[0].state_dict() for n in names]
    base_model, tokenizer = load_pretrained(run / "base", config.model.dtype)
    base_model.load_state_dict(merge_state_dicts(states, config.merge.method, base=base_model.state_dict()))
    make_policy("merged", base_model, tokenizer, **config.model.policy_options()).save_pretrained(out)


def merge_setup(p: dict) -> dict:
    """RUN/base and RUN/branches/b0..b{K-1}: a Qwen3 from config (hidden 768, vocab 8,000, p['layers'] layers), each
    branch perturbed. The embedding, the largest tensor, is about a fifth of the model (a merge stacks K of it)."""
    from copd.models.sources import build_char_tokenizer

    tokenizer = build_char_tokenizer("0123456789abcdefgh")
    model = qwen3(hidden=768, layers=p["layers"], heads=12, kv_heads=12, head_dim=64, intermediate=2048, vocab=8_000)
    run = Path(p["run"])
    model.save_pretrained(run / "base")
    tokenizer.save_pretrained(run / "base")
    for k in range(p["k"]):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
        model.save_pretrained(run / "branches" / f"b{k}")
        tokenizer.save_pretrained(run / "branches" / f"b{k}")
    return {"model_mib": sum(t.numel() * t.element_size() for t in model.parameters()) / MIB}  # tied: once


def paper_model(p: dict, device: str):
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[p["dtype"]]
    return qwen3(p["hidden"], p["layers"], p["heads"], p["kv_heads"], p["head_dim"], p["intermediate"], dtype=dtype,
                 device=device)


def paper_point(p: dict) -> dict:
    """One RL update of rows x tokens on Qwen3-4B's shapes (scaled by p), budget and checkpointing on.

    With p['search'] (CUDA only) the rows of one micro-batch (budget = rows x row length) are then
    doubled until the update runs out of p['cap_gb']: the last row count before that is the largest that fits.
    """
    device = p["device"]
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, p["cap_gb"] * 2**30 / total), device)
    student = policy(paper_model(p, device), "ckpt", p["budget"], device)
    params = sum(t.numel() for t in student.model.parameters())
    if device.startswith("cuda"):
        paper_update(student, 1, min(p["tokens"], 512), device)  # warm-up: kernels, AdamW state
    found = {"params": params, **paper_update(student, p["rows"], p["tokens"], device)}
    if p.get("search") and device.startswith("cuda"):
        found["searched"] = paper_search(student, p)
    return found


def paper_update(student: HFPolicy, rows: int, tokens: int, device: str) -> dict:
    data = rollouts(rows, tokens, seed=rows)
    adv_B = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    found = {"rows": rows, "tokens": rows * tokens}
    with measured(found, device):
        student.update([RLPart(data, adv_B)], [], LossSpec(step_kl=False))
    found["s_per_1k"] = found["seconds"] / (rows * tokens / 1000)
    return found


def paper_search(student: HFPolicy, p: dict) -> list[dict]:
    """Rows per micro-batch 1, 2, 4, ... (each one micro-batch) until out of memory."""
    found, rows = [], 1
    while rows <= p.get("max_rows", 256):
        student.micro_batch_tokens = rows * (PROMPT + p["tokens"])
        try:
            found.append(paper_update(student, rows, p["tokens"], p["device"]))
        except torch.cuda.OutOfMemoryError:
            student.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            found.append({"rows": rows, "tokens": rows * p["tokens"], "error": "out of memory"})
            break
        rows *= 2
    return found


POINTS = {"update": update_point, "score": score_point, "merge": merge_point, "merge_setup": merge_setup,
          "paper": paper_point}


def measure(p: dict) -> dict:
    """The point's measurement; an allocation refused by the memory guard reads as out of memory."""
    try:
        return {**p, **POINTS[p["kind"]](p)}
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "alloc" not in str(err) and "memory" not in str(err):
            raise
        return {**p, "error": "out of memory"}
