"""TRL's GRPOTrainer on the same model, prompts and batch as copd's anchor step (benchmarks/smollm2.py).

TRL is an optional benchmark dependency (`pip install trl`); its defaults are kept except for
what fixes the batch (and, for a second row, gradient checkpointing, which TRL turns on by
default): 1 prompt x 8 rollouts x `new_tokens` new tokens per step, fp32, CPU.
Seconds per step come from a TrainerCallback (generation happens inside the step in TRL).
"""

from __future__ import annotations

import tempfile
import time

from copd.capabilities.verifiers import numeric


def numeric_reward(completions, answer, **_):
    """The numeric verifier copd's word problems use, on TRL's conversational completions."""
    return [numeric(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]


def measure_trl(model_dir: str, prompts: list[tuple[str, str]], new_tokens: int, steps: int, checkpointing: bool = True) -> dict:
    """Mean seconds per GRPO step over `steps` steps after one warm-up step."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    rows = [{"prompt": [{"role": "user", "content": p}], "answer": a} for p, a in prompts[: steps + 1]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=8, num_generations=8, max_completion_length=new_tokens,
            max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            learning_rate=1e-6, temperature=1.0, top_p=1.0, disable_tqdm=True, shuffle_dataset=False,
            gradient_checkpointing=checkpointing,
        )
        trainer = trl.GRPOTrainer(model=model, reward_funcs=numeric_reward, args=config, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    timed = timer.times[1:]
    label = f"trl {trl.__version__}" + ("" if checkpointing else ", no gradient checkpointing")
    return {"library": label, "step": sum(timed) / len(timed), "steps": len(timed)}
