"""A vLLM engine for one copd branch, run as its own process in vLLM's own Python environment.

copd starts this file with the interpreter named by `sampling.vllm.python`, so vLLM's
pins (torch, transformers) never constrain copd's. It imports nothing of copd: only the
standard library and vLLM. It connects back to copd over a Unix socket (the address in
argv, the key in COPD_ENGINE_KEY), loads the model, says "ready", then answers requests,
one at a time, until "close":

    ("generate", {...}) -> per sample: (completion ids, their log-probs, top-k ids per position)
    ("reload", {"path": folder}) -> seconds; the weights of a safetensors folder, then the prefix cache reset
    ("close", {}) -> None

Log-probs are vLLM's raw ones: the log-softmax of the model's logits before temperature
and top-p, which is what the learner computes on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Client


def engine(options: dict):
    from vllm import LLM

    return LLM(
        model=options["model"],
        dtype=options["dtype"],
        enforce_eager=options["enforce_eager"],
        gpu_memory_utilization=options["gpu_memory_utilization"],
        max_model_len=options["max_model_len"],
        max_logprobs=options["max_logprobs"],
        enable_prefix_caching=True,
        enable_sleep_mode=options["sleep"],
        # The tokenizer's EOS is the only stop, as in copd's own decoding: no extra stop ids or
        # default sampling settings from generation_config.json.
        generation_config="vllm",
        logprobs_mode="raw_logprobs",
        seed=0,
        # One process: the engine core and its worker run here (vLLM's default spawns two more,
        # each importing vLLM again, which doubles the start on a small machine).
        distributed_executor_backend="uni",
    )


def sample_seed(seed: int, prompt: int, sample: int, n: int) -> int:
    """A distinct, reproducible seed per sample of a request (one vLLM request per sample)."""
    return (seed * 1_000_003 + prompt * n + sample) % (2**63)


def generate(llm, request: dict) -> list[tuple[list[int], list[float], list[list[int]] | None]]:
    from vllm import SamplingParams

    n, k = request["n"], request["topk"]
    prompts, params = [], []
    for i, ids in enumerate(request["prompt_ids"]):
        for j in range(n):
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(
                n=1, temperature=0.0 if request["greedy"] else request["temperature"], top_p=request["top_p"],
                max_tokens=request["max_tokens"], seed=sample_seed(request["seed"], i, j, n), logprobs=k,
                stop_token_ids=request["stop_ids"], detokenize=False,
            ))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [answer(out.outputs[0], k) for out in outputs]


def answer(completion, k: int):
    ids = list(completion.token_ids)
    logprobs = [position[token].logprob for token, position in zip(ids, completion.logprobs)]
    topk = None
    if k:
        ranked = lambda position: sorted(position.items(), key=lambda item: item[1].rank)  # noqa: E731
        topk = [[token for token, lp in ranked(position) if lp.rank <= k][:k] for position in completion.logprobs]
    return ids, logprobs, topk


def retie_output_embeddings(worker) -> None:
    """Tie the output head to the input embeddings again after a reload (models with tied embeddings).

    A checkpoint of a tied model holds the embeddings only; an in-place reload fills them and
    puts the head's old tensors back, so the engine would score with the old head. Tying it
    again, then redoing the head's post-load processing (the CPU build keeps a prepared GEMM
    of it), gives the head the new weights.
    """
    runner = getattr(worker, "worker", worker).model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    config = getattr(model, "config", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(config, "tie_word_embeddings", False) and embed is not None and hasattr(model, "lm_head"):
        head = model.lm_head.tie_weights(embed)
        head.quant_method.process_weights_after_loading(head)


class Engine:
    def __init__(self, options: dict):
        self.sleep = options["sleep"]
        self.llm = engine(options)
        if self.sleep:
            self.llm.sleep(level=1)
        self.awake = not self.sleep

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    def rest(self) -> None:
        """With sleep mode (a GPU shared with the learner): weights to host memory, KV cache freed."""
        if self.sleep and self.awake:
            self.llm.sleep(level=1)
            self.awake = False

    def generate(self, request: dict):
        self.wake()
        try:
            return generate(self.llm, request)
        finally:
            self.rest()

    def reload(self, request: dict) -> float:
        t0 = time.perf_counter()
        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": request["path"]})
        self.llm.collective_rpc(retie_output_embeddings)
        self.llm.reset_prefix_cache()
        self.rest()
        return time.perf_counter() - t0


def serve(connection, options: dict) -> None:
    try:
        server = Engine(options)
    except Exception:
        connection.send(("error", traceback.format_exc()))
        return
    connection.send(("ok", {"vllm": __import__("vllm").__version__, "python": sys.executable}))
    while True:
        command, request = connection.recv()
        if command == "close":
            connection.send(("ok", None))
            return
        try:
            connection.send(("ok", getattr(server, command)(request)))
        except Exception:
            connection.send(("error", traceback.format_exc()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="the Unix socket copd listens on")
    parser.add_argument("options", help="the engine's settings, as JSON")
    args = parser.parse_args()
    options = json.loads(args.options)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for name, value in options.get("env", {}).items():
        os.environ[name] = str(value)
    connection = Client(args.address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("COPD_ENGINE_KEY")))
    try:
        serve(connection, options)
    finally:
        connection.close()


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process, which re-imports this file
    main()
