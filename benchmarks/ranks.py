"""A branch over 1, 2 and 4 ranks (FSDP2 over gloo, on this CPU): what each rank holds, and the step time.

    python benchmarks/ranks.py                 # SmolLM2-135M's shape, random weights; about 5 min on 2 cores
    python benchmarks/ranks.py --ranks 1 2 --layers 4    # a quick look

Each rank is a process (torch.multiprocessing) of one torch thread, holding a ShardedPolicy
(copd.backends.local.sharded) of a LLaMA built from config at SmolLM2-135M's shape (576
hidden, 30 layers, 49152 vocabulary, tied head). Every rank count trains on the same RL
part (--prompts groups of 8 rollouts, --tokens completion tokens, random ids), one update
after a warm-up one. Printed per rank count: the bytes of parameters, gradients and AdamW
moments one rank holds (its shards), the process's peak RSS, and the median update time.
On a 2-core machine four ranks share two cores, so the step time says how much the
collectives cost here, not how the ranks scale on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import provenance, table

MIB = 2**20


def smollm2_shape(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)


def rl_part(prompts: int, prompt_len: int, new_tokens: int, vocab: int):
    from copd.backends.roles import RLPart, Rollouts

    gen = torch.Generator().manual_seed(0)
    rows = prompts * 8
    prompt_ids = torch.randint(5, vocab, (prompts, prompt_len), generator=gen).repeat_interleave(8, 0)
    completion = torch.randint(5, vocab, (rows, new_tokens), generator=gen)
    ids = torch.cat([prompt_ids, completion], 1)
    rollouts = Rollouts(ids, torch.ones_like(ids), prompt_len, torch.ones(rows, new_tokens), [""] * rows)
    return RLPart(rollouts, torch.randn(rows, generator=gen))


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors if t is not None)


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    from transformers import LlamaForCausalLM

    from copd.backends.local.sharded import ShardedPolicy, join_group
    from copd.backends.roles import LossSpec
    from copd.models.sources import build_char_tokenizer

    torch.set_num_threads(1)
    mesh = join_group("127.0.0.1", port, rank, world, "cpu", 600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_shape(args.layers))
    policy = ShardedPolicy("b", model, build_char_tokenizer("abc"), 1e-5, micro_batch_tokens=args.budget, mesh=mesh)
    part = rl_part(args.prompts, args.prompt_len, args.tokens, model.config.vocab_size)
    seconds = []
    for _ in range(args.repeats + 1):  # the first update builds AdamW's moments and warms the allocator
        t0 = time.perf_counter()
        policy.update([part], [], LossSpec())
        seconds.append(time.perf_counter() - t0)
    moments = [t for state in policy.optimizer.state.values() for k, t in state.items() if k != "step"]
    found = {"params": local_bytes(policy.params), "grads": local_bytes([p.grad for p in policy.params]),
             "adam": local_bytes(moments), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "update": statistics.median(seconds[1:])}
    Path(out, f"{rank}.json").write_text(json.dumps(found))
    policy.close()


def measure(world: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(world, port, args, out), nprocs=world)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the largest rank's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30: SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=2, help="prompt groups of 8 rollouts in the update")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per rollout")
    parser.add_argument("--budget", type=int, default=512, help="model.micro_batch_tokens")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(provenance())
    results = {world: measure(world, args) for world in args.ranks}
    one = results[args.ranks[0]]
    rows = [[str(w), f"{r['params'] / MIB:,.0f}", f"{r['grads'] / MIB:,.0f}", f"{r['adam'] / MIB:,.0f}",
             f"{(r['params'] + r['grads'] + r['adam']) / (one['params'] + one['grads'] + one['adam']):.2f}",
             f"{r['peak_rss'] / MIB:,.0f}", f"{r['update']:.2f}", f"{r['update'] / one['update']:.2f}x"]
             for w, r in results.items()]
    print(f"LLaMA at SmolLM2-135M's shape, {args.layers} layers, fp32; update of {args.prompts}x8 rollouts, "
          f"{args.prompt_len}+{args.tokens} tokens, budget {args.budget}; one torch thread per rank, {os.cpu_count()} cores")
    print(table(["ranks", "params MiB/rank", "grads MiB/rank", "AdamW MiB/rank", "state vs 1 rank", "peak RSS MiB",
                 "update s", "vs 1 rank"], rows))


if __name__ == "__main__":
    main()
