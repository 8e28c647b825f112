"""The base model: load a folder, or build a tiny model and warm-start it with supervision.

RL needs a non-zero SAMPLED pass rate at the rollout temperature on every capability (a
greedy pass rate can be high while sampling still never succeeds), so the warm start is
checked by sampling at that temperature and stops as soon as every capability reaches
`warmup.min_pass_rate`. Built bases are cached by a hash of what determines them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import string
import time
from pathlib import Path

import torch

from copd.config import Config
from copd.evaluate import pass_rates
from copd.models import build_char_tokenizer, build_tiny_model, load_base_model, load_pretrained, save_pretrained
from copd.policy.base import SamplingParams
from copd.policy.hf import HFPolicy
from copd.progress import QuietReporter, Reporter
from copd.rollout import MixtureSampler, derived_seed
from copd.tasks import CHAR_ALPHABET, Capability

TINY_ALPHABET = CHAR_ALPHABET + "".join(c for c in string.printable if c.isprintable())


def prepare_base(config: Config, capabilities: dict[str, Capability], reporter: Reporter | None = None):
    """(model, tokenizer, warmup_info) for the run's base policy pi_0."""
    reporter = reporter or QuietReporter()
    if config.model.path or config.model.gguf_file:
        model, tokenizer = load_base_model(config.model)
        return model, tokenizer, {}
    cache = Path(config.model.cache_dir).expanduser() / f"base-{base_key(config)}"
    if (cache / "config.json").is_file():
        reporter.print(f"base model from cache {cache}")
        model, tokenizer = load_pretrained(cache, config.model.dtype)
        return model, tokenizer, json.loads((cache / "warmup.json").read_text())
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    model = build_tiny_model(config.model.tiny, tokenizer, seed=config.run.seed)
    info = warm_start(model, tokenizer, config, list(capabilities.values()), reporter) if config.warmup.enabled else {}
    tmp = cache.with_name(cache.name + ".tmp")
    save_pretrained(model, tokenizer, tmp)
    (tmp / "warmup.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return model, tokenizer, info


def base_key(config: Config) -> str:
    """Everything that determines the built base: architecture, warm start, data, seed, temperature."""
    key = {
        "tiny": config.model.tiny.model_dump(),
        "warmup": config.warmup.model_dump(),
        "capabilities": [c.model_dump() for c in config.capabilities],
        # The stop rule looks at the capabilities some branch trains, so they shape the base too.
        "trained": sorted({c for b in config.branches for c in b.capabilities}),
        "seed": config.run.seed,
        "temperature": config.sampling.temperature,
        "max_new_tokens": config.sampling.max_new_tokens,
        "alphabet": TINY_ALPHABET,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def supervised_loss(model, tokenizer, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """Cross-entropy on answer tokens (and EOS) only, prompt tokens masked out."""
    rows, targets = [], []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        targets.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    mask = (labels != -100) | (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None])
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.long().to(model.device)).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(model.device))


def warm_start(model, tokenizer, config: Config, capabilities: list[Capability], reporter: Reporter) -> dict:
    """Supervised steps on balanced batches until every capability's sampled pass rate is high enough."""
    cfg, start = config.warmup, time.perf_counter()
    sampler = MixtureSampler(capabilities, derived_seed(config.run.seed, "warmup"))
    # Trained on every capability; the stop rule looks only at those some branch trains with RL.
    trained = [c for c in capabilities if any(c.name in b.capabilities for b in config.branches)]
    checks = {c.name: c.train_sampler(derived_seed(config.run.seed, "warmup-check", c.name)).draw(cfg.check_samples) for c in trained}
    params = SamplingParams.from_config(config.sampling)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    history, step = [], 0
    reporter.start("warm start", cfg.max_steps)
    while step < cfg.max_steps:
        model.train()
        batch = sampler.draw(cfg.batch_size)
        loss = supervised_loss(model, tokenizer, [s.prompt for _, s in batch], [s.answer for _, s in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % cfg.check_every == 0:
            probe = HFPolicy("warmup", model, tokenizer, device=str(model.device))
            rates = pass_rates(probe, trained, checks, params, seed=derived_seed(config.run.seed, "check", step))
            history.append({"step": step, "loss": loss.item(), "pass_rate": rates})
            reporter.advance("warm start", " ".join(f"{k} {v:.2f}" for k, v in rates.items()))
            if min(rates.values()) >= cfg.min_pass_rate:
                break
        else:
            reporter.advance("warm start", f"loss {loss.item():.3f}")
    reporter.stop()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "history": history}


def clone_model(model):
    """An independent copy of the base for each branch (theta_k <- theta_0)."""
    return copy.deepcopy(model)
