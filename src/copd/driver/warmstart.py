"""The base model: load a folder, or build a tiny model and warm-start it with supervision.

RL needs a non-zero SAMPLED pass rate at the rollout temperature on every capability (a
greedy pass rate can be high while sampling still never succeeds), so the warm start is
checked by sampling at that temperature and stops as soon as every capability reaches
`warmup.min_pass_rate`. Built bases are cached by a hash of what determines them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from copd.backends.local.factory import make_policy
from copd.backends.roles import Prompt, SamplingParams
from copd.capabilities import Capability
from copd.capabilities.rows import TextCheck
from copd.config.schema import Config, TinyModelConfig
from copd.driver.rollout import MixtureSampler, derived_seed
from copd.evaluation.evaluate import pass_rates
from copd.models.sources import (
    TINY_ALPHABET,
    build_char_tokenizer,
    build_tiny_model,
    load_base_model,
    load_pretrained,
    save_pretrained,
    tiny_alphabet_problem,
)
from copd.reporting.progress import QuietReporter, Reporter


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
    model, tokenizer = TINY_BUILDERS[config.model.tiny.architecture](config.model.tiny, config.run.seed)
    info = warm_start(model, tokenizer, config, list(capabilities.values()), reporter) if config.warmup.enabled else {}
    tmp = cache.with_name(cache.name + ".tmp")
    save_pretrained(model, tokenizer, tmp)
    (tmp / "warmup.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return model, tokenizer, info


def _tiny_text(cfg: TinyModelConfig, seed: int):
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    return build_tiny_model(cfg, tokenizer, seed=seed), tokenizer


def _tiny_vision_language(cfg: TinyModelConfig, seed: int):
    from copd.multimodal.tiny import build_tiny_vl

    return build_tiny_vl(seed=seed, hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads,
                         vision_dim=cfg.vision_hidden_size, vision_layers=cfg.vision_layers, arch=cfg.architecture,
                         intermediate=cfg.intermediate_size)


# model.tiny.architecture -> (model, tokenizer or VLProcessor) built from config, nothing downloaded.
TINY_BUILDERS: dict[str, Callable[[TinyModelConfig, int], tuple]] = {
    "llama": _tiny_text,
    "qwen2": _tiny_text,
    "qwen2_vl": _tiny_vision_language,
    "qwen2_5_vl": _tiny_vision_language,
    "qwen3_vl": _tiny_vision_language,
}


def model_text_check(config: Config) -> TextCheck | None:
    """What every prompt and answer must satisfy for the run's base model: the character tokenizer
    of a built tiny text model encodes TINY_ALPHABET only; every other tokenizer encodes any text."""
    built = not (config.model.path or config.model.gguf_file)
    return tiny_alphabet_problem if built and TINY_BUILDERS[config.model.tiny.architecture] is _tiny_text else None


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
    if TINY_BUILDERS[config.model.tiny.architecture] is _tiny_vision_language:
        key["vision"] = config.model.vision.model_dump()  # frames and resolution shape what the warm start saw
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def warm_start(model, tokenizer, config: Config, capabilities: list[Capability], reporter: Reporter) -> dict:
    """Supervised steps on balanced batches until every capability's sampled pass rate is high enough.

    With warmup.per_capability, a capability that has reached the rate at a check leaves
    the mixture for good, the batches are balanced over the rest, and the warm start ends
    once every RL-trained capability has left.
    """
    cfg, start = config.warmup, time.perf_counter()
    mixture = list(capabilities)
    sampler = MixtureSampler(mixture, derived_seed(config.run.seed, "warmup"))
    # Formats prompts (and reads images) exactly as the branches will; its model is `model`. Its
    # optimizer is torch's default AdamW (unfused, weight decay 0.01), which cached bases were built with.
    # Short prompts and answers: no activation checkpointing (its cache handling is for scoring passes).
    options = {**config.model.policy_options(), "gradient_checkpointing": False}
    policy = make_policy("warmup", model, tokenizer, cfg.lr, 0.01, str(model.device), fused=False, **options)
    # Trained on every capability; the stop rule looks only at those some branch trains with RL.
    trained = [c for c in capabilities if any(c.name in b.capabilities for b in config.branches)]
    checks = {c.name: c.train_sampler(derived_seed(config.run.seed, "warmup-check", c.name)).draw(cfg.check_samples) for c in trained}
    params = SamplingParams.from_config(config.sampling)
    history, step, done = [], 0, []
    reporter.start("warm start", cfg.max_steps)
    while step < cfg.max_steps:
        batch = sampler.draw(cfg.batch_size)
        loss = policy.supervised_step([Prompt.of(s) for _, s in batch], [s.answer for _, s in batch], grad_clip=1.0)
        step += 1
        if step % cfg.check_every == 0:
            rates = pass_rates(policy, trained, checks, params, seed=derived_seed(config.run.seed, "check", step))
            history.append({"step": step, "loss": loss, "pass_rate": rates})
            reporter.advance("warm start", " ".join(f"{k} {v:.2f}" for k, v in rates.items()))
            if not cfg.per_capability and min(rates.values()) >= cfg.min_pass_rate:
                break
            reached = [c.name for c in mixture if rates.get(c.name, 0.0) >= cfg.min_pass_rate] if cfg.per_capability else []
            if reached:
                done += reached
                if all(c.name in done for c in trained):
                    break
                mixture = [c for c in mixture if c.name not in done]
                sampler = MixtureSampler(mixture, derived_seed(config.run.seed, "warmup", *done))
        else:
            reporter.advance("warm start", f"loss {loss:.3f}")
    reporter.stop()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "history": history, "left_early": done}
