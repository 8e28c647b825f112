"""Co-Evolving Policy Distillation (CoPD) in one file, to read top to bottom.

Two branches start from one tiny base model. Branch "sort" does GRPO on letter sorting,
branch "reversal" on string reversal. Every cycle runs S_RL explore steps (GRPO only)
and then S_OPD consolidate steps (GRPO + on-policy distillation from the other branch).
At the end the two branches are averaged into one model. Equations: docs/method.md.

    .venv/bin/python examples/minimal_copd.py                 # about 1-2 minutes on 2 cores
    .venv/bin/python examples/minimal_copd.py --cycles 1 --rl-steps 1 --opd-steps 1 \
        --warmup-steps 20 --test-size 8                        # a smoke run of seconds
    .venv/bin/python examples/minimal_copd.py --beta 0        # OPD advantage 0: independent experts
                                                              # with the same updates (method.md §8)

Everything below uses the library's pure functions directly (copd.core.*) and the
sampling loop of the local backend; the full driver (copd.driver.trainer) adds
checkpoints, logging, topologies with K > 2, baselines and more estimators.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
import warnings

import torch
import transformers

from copd.backends.local.sampling import RowNoise, completion_logits, sample_completions, token_logprobs
from copd.backends.roles import SamplingParams
from copd.capabilities import load_capability
from copd.config.schema import TinyModelConfig
from copd.core.advantages import group_advantages, opd_sampled_advantage
from copd.core.losses import aggregate_loss, clipped_pg_loss, masked_mean
from copd.core.merge import merge_state_dicts
from copd.core.overlap import topk_overlap
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
p.add_argument("--hidden", type=int, default=128, help="width of the tiny Llama")
p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
p.add_argument("--warmup-steps", type=int, default=300, help="supervised steps before RL")
p.add_argument("--warmup-lr", type=float, default=1e-3)
p.add_argument("--cycles", type=int, default=6, help="N cycles of Algorithm 1")
p.add_argument("--rl-steps", type=int, default=6, help="S_RL explore steps per cycle")
p.add_argument("--opd-steps", type=int, default=4, help="S_OPD consolidate steps per cycle")
p.add_argument("--prompts", type=int, default=16, help="RL prompts per branch per step")
p.add_argument("--group", type=int, default=8, help="G rollouts per prompt")
p.add_argument("--opd-prompts", type=int, default=16, help="teacher prompts per edge per step")
p.add_argument("--opd-samples", type=int, default=2, help="student rollouts per teacher prompt")
p.add_argument("--beta", type=float, default=0.1, help="OPD advantage scale beta")
p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the RL phase")
p.add_argument("--eps-low", type=float, default=0.2)
p.add_argument("--eps-high", type=float, default=0.28)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--max-new-tokens", type=int, default=8)
p.add_argument("--test-size", type=int, default=200, help="test prompts per capability")
p.add_argument("--save-first-update", metavar="FILE",
               help="save the base, the first RL batch and the branch after its update (a test replays it through the library)")
args = p.parse_args()
transformers.logging.set_verbosity_error()  # quiet the cache-API deprecation notes of the decode loop
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(args.seed)
torch.set_num_threads(args.threads)
start = time.perf_counter()

# ---- 1. A tiny real transformers model and two verifiable capabilities ------------------
tokenizer = build_char_tokenizer(TINY_ALPHABET)  # one token per character
tokenizer.padding_side = "left"  # prompts are left-padded so every completion starts at one column
EOS, PAD = tokenizer.eos_token_id, tokenizer.pad_token_id
tiny = TinyModelConfig(architecture="llama", hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                       intermediate_size=3 * args.hidden, max_positions=64)
base = build_tiny_model(tiny, tokenizer, seed=args.seed)
names = ["sort", "reversal"]
# Built-in generators, prompts like "sort:dbca=" -> "abcd" and "rev:dbca=" -> "acbd"; longer words
# than the defaults so the warm-started base is far from perfect and RL has room to improve.
task = {"min_len": 4, "max_len": 7, "letters": "abcdefgh"}
caps = {n: load_capability({"name": n, "builtin": n, **task}) for n in names}
print(f"model: {sum(t.numel() for t in base.parameters()) / 1e3:.0f}k parameters, vocabulary {len(tokenizer)}")

sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
greedy = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=True)
calls = itertools.count()  # each rollout call draws its own keyed noise: seed (args.seed, call), one key per row


def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def rollout(model, samples, n: int, params: SamplingParams = sampling) -> dict:
    """n completions y ~ pi(.|x) per prompt x; rows of one prompt are adjacent (a GRPO group)."""
    ids, mask = encode([s.prompt for s in samples for _ in range(n)])
    model.eval()
    noise = RowNoise(hash((args.seed, next(calls))), torch.arange(ids.shape[0]))
    sampled = sample_completions(model, ids, mask, params, EOS, PAD, noise)
    comp, comp_mask = sampled.ids_B_T, sampled.mask_B_T  # mask: 1 up to and including EOS
    return {"ids": torch.cat([ids, comp], 1), "mask": torch.cat([mask, comp_mask.long()], 1), "prompt_len": ids.shape[1],
            "comp": comp, "comp_mask": comp_mask, "texts": tokenizer.batch_decode(comp, skip_special_tokens=True)}


def logprobs(model, r: dict) -> torch.Tensor:
    """log pi(.|x, y_<t) over the vocabulary at every completion position, [B, T, V]."""
    return completion_logits(model, r["ids"], r["mask"], r["prompt_len"]).float().log_softmax(-1)


def accuracy(model, cap) -> float:
    """Greedy accuracy (%) on the capability's fixed test split."""
    tests = cap.test_set(args.test_size)
    texts = rollout(model, tests, 1, greedy)["texts"]
    return 100.0 * sum(cap.score(t, s) for t, s in zip(texts, tests)) / len(tests)


# ---- 2. Supervised warm start, so that sampled rewards are not all zero ------------------
# GRPO learns only from groups whose rewards differ (docs/method.md §3): a base model
# that never samples a correct answer gives A_i = 0 everywhere. Cross-entropy on the
# answer tokens (and EOS), prompt tokens masked, on batches balanced over both tasks.
warm_samplers = [caps[n].train_sampler(args.seed + 100 + i) for i, n in enumerate(names)]
opt = torch.optim.AdamW(base.parameters(), lr=args.warmup_lr)
base.train()
loss = torch.tensor(float("nan"))
for _ in range(args.warmup_steps):
    batch = [s for sampler in warm_samplers for s in sampler.draw(16)]
    rows = [(tokenizer(s.prompt, add_special_tokens=False)["input_ids"],
             tokenizer(s.answer, add_special_tokens=False)["input_ids"] + [EOS]) for s in batch]
    width = max(len(q) + len(a) for q, a in rows)  # right-padded: positions start at 0 in every row
    ids = torch.tensor([q + a + [PAD] * (width - len(q) - len(a)) for q, a in rows])
    labels = torch.tensor([[-100] * len(q) + a + [-100] * (width - len(q) - len(a)) for q, a in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(q) + len(a) for q, a in rows])[:, None]).long()
    logits = base(input_ids=ids, attention_mask=mask).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
    opt.step()
with torch.no_grad():  # the sampled pass rate at the rollout temperature is what RL sees
    rates = {}
    for n, smp in zip(names, warm_samplers):
        probe = smp.draw(64)
        r = rollout(base, probe, 1)
        rates[n] = sum(caps[n].score(t, s) for t, s in zip(r["texts"], probe)) / len(probe)
print(f"warm start: {args.warmup_steps} steps, loss {loss.item():.3f}, sampled pass rate "
      + " ".join(f"{n} {v:.2f}" for n, v in rates.items()) + f" ({time.perf_counter() - start:.0f} s)")

# ---- 3. K = 2 branches from the same base (Algorithm 1: theta_k <- theta_0) ---------------
# Topology "pair" (docs/method.md §5): each branch is the other's teacher.
branches = {n: copy.deepcopy(base) for n in names}
teacher_of = {"sort": "reversal", "reversal": "sort"}  # edge (student <- teacher)
optims = {n: torch.optim.AdamW(m.parameters(), lr=args.lr) for n, m in branches.items()}
rl_data = {n: caps[n].train_sampler(args.seed + 200 + i) for i, n in enumerate(names)}  # x ~ D_k
opd_data = {n: caps[teacher_of[n]].train_sampler(args.seed + 300 + i) for i, n in enumerate(names)}  # x' ~ D_j


def collect_rl(name: str) -> tuple[dict, float]:
    """x ~ D_k, G rollouts per prompt, verifier rewards r_i, GRPO advantages (docs/method.md §3)."""
    samples = rl_data[name].draw(args.prompts)
    r = rollout(branches[name], samples, args.group)
    rewards = torch.tensor([caps[name].score(t, s) for t, s in zip(r["texts"], [s for s in samples for _ in range(args.group)])])
    # §3: A_i = (r_i - mean_g r) / (std_g r + eps), per group of G rollouts of one prompt.
    adv_N_G = group_advantages(rewards.view(len(samples), args.group), "grpo")
    # Every token of a rollout carries its sequence's advantage.
    r["adv"] = adv_N_G.reshape(-1, 1) * r["comp_mask"]
    return r, rewards.mean().item()


def collect_opd(name: str) -> dict:
    """The STUDENT samples on the TEACHER's prompts; the teacher scores those tokens (docs/method.md §4)."""
    student, teacher = branches[name], branches[teacher_of[name]]
    r = rollout(student, opd_data[name].draw(args.opd_prompts), args.opd_samples)  # x' ~ D_j, y ~ pi_s(.|x')
    with torch.no_grad():  # both are fixed here: the advantage is a constant in the update
        s_dist, t_dist = logprobs(student, r), logprobs(teacher, r)
    s_tok, t_tok = token_logprobs(s_dist, r["comp"]), token_logprobs(t_dist, r["comp"])  # log pi(y_t | x', y_<t)
    # §4: A_t = beta * (log pi_t(y_t) - log pi_s(y_t)) at the sampled tokens: a one-sample
    # estimate of -beta * KL(pi_s || pi_t) at that position, fed to the same loss as GRPO's.
    r["adv"] = opd_sampled_advantage(t_tok, s_tok, r["comp_mask"], args.beta)
    # §7 diagnostics on the student's states: mean delta and the top-4 overlap O_4.
    r["delta"] = masked_mean(t_tok - s_tok, r["comp_mask"]).item()
    r["overlap"] = topk_overlap(s_dist, t_dist, r["comp_mask"], 4).item()
    return r


def pg_loss(model, r: dict) -> torch.Tensor:
    """Clipped token loss with the rollouts' advantages, token-mean aggregation (docs/method.md §3)."""
    model.train()
    new = token_logprobs(logprobs(model, r), r["comp"])  # log pi_theta(y_t | ...), carries the gradient
    old = new.detach()  # one update per batch: pi_old = pi_theta, so rho_t = 1 in value
    # §3: l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t), rho_t = pi_theta / pi_old.
    loss_B_T, _ = clipped_pg_loss(new, old, r["adv"], args.eps_low, args.eps_high)
    # §3 token_mean: sum of token losses over the batch / number of completion tokens.
    return aggregate_loss(loss_B_T, r["comp_mask"], "token_mean")


def update(name: str, losses: list[torch.Tensor]) -> None:
    """One AdamW step of theta_k on the sum of its parts (RL, and OPD in Phase II)."""
    optims[name].zero_grad(set_to_none=True)
    sum(losses).backward()
    torch.nn.utils.clip_grad_norm_(branches[name].parameters(), 1.0)
    optims[name].step()


def save_first_update(path: str, name: str, r: dict) -> None:
    """--save-first-update: the update's input and output, which the library's learner must reproduce."""
    batch = {k: r[k] for k in ("ids", "mask", "prompt_len", "comp_mask", "adv", "texts")}
    torch.save({"args": vars(args), "base": base.state_dict(), "batch": batch, "after": branches[name].state_dict()}, path)


# ---- 4. Algorithm 1 (docs/method.md §2) ---------------------------------------------------
for cycle in range(1, args.cycles + 1):
    # Phase I, explore: S_RL steps of GRPO, each branch on its own data only.
    for step in range(args.rl_steps):
        shown = []
        for name in names:
            r, reward = collect_rl(name)
            update(name, [pg_loss(branches[name], r)])
            if args.save_first_update and (cycle, step, name) == (1, 0, names[0]):
                save_first_update(args.save_first_update, name, r)
            shown.append(f"{name} r={reward:.2f}")
        print(f"cycle {cycle} explore      " + "  ".join(shown))
    # Phase II, consolidate: S_OPD steps of GRPO + OPD from the other branch.
    for _ in range(args.opd_steps):
        # Snapshot semantics: every rollout is sampled and every teacher scores BEFORE any
        # branch updates, so teachers are the branches as they were at the start of the
        # step and the order of the updates below does not matter.
        rl = {name: collect_rl(name) for name in names}
        opd = {name: collect_opd(name) for name in names}
        shown = []
        for name in names:
            (r, reward), o = rl[name], opd[name]
            # One update on L_RL + L_OPD (§2): the two losses' gradients add up.
            update(name, [pg_loss(branches[name], r), pg_loss(branches[name], o)])
            shown.append(f"{name} r={reward:.2f} delta={o['delta']:+.2f} O_4={o['overlap']:.2f}")
        print(f"cycle {cycle} consolidate  " + "  ".join(shown))

# ---- 5. Merge by parameter averaging: theta* = (1/K) sum_k theta_k (docs/method.md §6) -----
merged = copy.deepcopy(base)
merged.load_state_dict(merge_state_dicts([branches[n].state_dict() for n in names], method="mean"))

# ---- 6. Greedy accuracy on both capabilities' test splits ----------------------------------
with torch.no_grad():
    for label, model in [("base", base), *((f"branch {n}", branches[n]) for n in names), ("merged", merged)]:
        print(f"accuracy {label}: " + " ".join(f"{n}={accuracy(model, caps[n]):.1f}%" for n in names))
print(f"total {time.perf_counter() - start:.1f} s")
