"""Fakes shared by the tests: a Policy without a model, and a small run config for it."""

import copy
import json
import random

import torch

from copd.backends.roles import Rollouts, Scores, UpdateResult
from copd.config.loader import validate_config

V, T, P = 5, 3, 2  # vocab, completion length, prompt length


def solve(prompt: str) -> str:
    """The right answer of a built-in prompt (addition, reversal, count)."""
    if prompt.startswith("rev:"):
        return prompt[4:-1][::-1]
    if prompt.startswith("count "):
        letter, word = prompt[6:-1].split(":")
        return str(word.count(letter))
    a, b = prompt[:-1].split("+")
    return str(int(a) + int(b))


class FakePolicy:
    """A Policy without a model: a 'skill' float and a [V] logits vector are the whole state."""

    def __init__(self, name, log, skill=0.5, logits=None, crash_after=None, skip=lambda n: False):
        self.name, self.log, self.crash_after, self.skip = name, log, crash_after, skip
        self.state = {"skill": skill, "logits": logits or [0.1 * i for i in range(V)], "updates": 0}

    def _logp(self):
        return torch.log_softmax(torch.tensor(self.state["logits"], dtype=torch.float64), -1)

    def generate(self, prompts, n, params, seed):
        prompts = [getattr(p, "text", p) for p in prompts]  # Prompt objects or plain strings
        completions, ids = [], []
        for prompt in prompts:
            for j in range(n):
                rng = random.Random(f"{seed}|{prompt}|{j}")
                completions.append(solve(prompt) if rng.random() < self.state["skill"] else "x")
                ids.append([rng.randrange(V) for _ in range(T)])
        B = len(completions)
        k = min(params.record_topk, V)
        topk = self._logp().topk(k).indices.int().expand(B, T, k) if k else None
        r = Rollouts(torch.cat([torch.zeros(B, P, dtype=torch.long), torch.tensor(ids)], 1),
                     torch.ones(B, P + T, dtype=torch.long), P, torch.ones(B, T), completions, topk_ids_B_T_K=topk)
        r.made_by, r.prompts = self.name, list(prompts)
        self.log.append(("generate", self.name, n, tuple(prompts)))
        return r

    def score(self, rollouts, request=None):
        self.log.append(("score", self.name))
        logp = self._logp()
        ids = rollouts.completion_ids_B_T
        if request is None or not request.wants_support:
            return Scores(logp[ids])
        k = min(request.topk, V)
        support = [logp.topk(k).indices.expand(*ids.shape, k)] if k else []
        if request.student_topk and rollouts.topk_ids_B_T_K is not None:
            support.append(rollouts.topk_ids_B_T_K.long())
        if request.ids_B_T_J is not None:
            support.append(request.ids_B_T_J.long())
        support = torch.cat(support, -1)
        return Scores(logp[ids], support.int(), logp[support], k)

    def update(self, rl, opd, spec):
        self.state["updates"] += 1
        n = self.state["updates"]
        self.log.append(("update", self.name, [p.rollouts.made_by for p in rl],
                         [(p.edge, p.beta, p.rollouts.made_by, p.rollouts.prompts) for p in opd]))
        if self.crash_after is not None and n > self.crash_after:
            raise RuntimeError("simulated crash")
        if self.skip(n):
            return UpdateResult({"loss": float("nan")}, {}, skipped=True)
        logp, edges, tokens = self._logp(), {}, 0
        for part in (p.resolved() for p in rl):
            self.state["skill"] = round(self.state["skill"] + 0.01 * part.advantages_B_T.shape[0], 6)
            first = int(part.rollouts.completion_ids_B_T[0, 0])
            self.state["logits"][first] += 0.01
            tokens += part.rollouts.num_tokens
        new = torch.tensor(self.state["logits"], dtype=torch.float64)
        for part in opd:
            delta = part.teacher.token_logprobs_B_T - logp[part.rollouts.completion_ids_B_T]
            edge = {"delta_mean": float(delta.mean()), "tokens": part.rollouts.num_tokens}
            if part.teacher.support_ids_B_T_S is None:  # sampled tokens' log-probs only
                new = new + 0.1 * (1 + part.beta) * float(delta.mean())
            else:
                teacher = teacher_distribution(part.teacher)
                new = new + 0.1 * (1 + part.beta) * (teacher - logp)
                kl = float(((logp.exp() - teacher.exp()) * (logp - teacher)).sum())
                same = len(set(logp.topk(2).indices.tolist()) & set(teacher.topk(2).indices.tolist())) / 2
                edge.update(overlap_topk=same, sym_kl=kl)
            edges[part.edge] = edge
            tokens += part.rollouts.num_tokens
        self.state["logits"] = new.tolist()
        return UpdateResult({"loss": float(-logp.max()), "tokens": float(tokens)}, edges)

    def get_weights(self):
        return {"logits": torch.tensor(self.state["logits"], dtype=torch.float64)}

    def set_weights(self, weights):
        self.state["logits"] = weights["logits"].tolist()

    def save_checkpoint(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps(self.state))

    def load_checkpoint(self, folder):
        self.state = json.loads((folder / "state.json").read_text())

    save_pretrained = save_checkpoint


BRANCHES = [{"name": "add", "capabilities": ["addition"], "beta": 0.1},
            {"name": "rev", "capabilities": ["reversal"], "beta": 0.3}]


def make_config(out, branches=BRANCHES, **sections):
    raw = {
        "capabilities": [{"name": "addition", "builtin": "addition"}, {"name": "reversal", "builtin": "reversal"},
                         {"name": "count", "builtin": "count"}],
        "branches": copy.deepcopy(branches),
        "schedule": {"cycles": 2, "rl_steps": 2, "opd_steps": 2},
        "rl": {"prompts_per_step": 2, "rollouts_per_prompt": 4},
        "opd": {"prompts_per_step": 2, "rollouts_per_prompt": 3},
        "optim": {"max_nan_in_row": 3},
        "run": {"out": str(out), "seed": 7, "keep_checkpoints": 2},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_config(raw)


def teacher_distribution(scores: Scores) -> torch.Tensor:
    """The fake teacher's [V] log-probs, from a support that covers the whole (tiny) vocabulary."""
    ids, logprobs = scores.support_ids_B_T_S[0, 0].long(), scores.support_logprobs_B_T_S[0, 0]
    assert set(ids.tolist()) == set(range(V)), "the fake's opd.topk must cover its vocabulary"
    return torch.full((V,), float("-inf"), dtype=logprobs.dtype).scatter(0, ids, logprobs)


@torch.no_grad()
def full_distribution(policy, rollouts) -> torch.Tensor:
    """The test oracle: a local policy's log-probs over the whole vocabulary at every completion position, [B, T, V]."""
    policy.activate()
    policy.model.eval()
    return policy._dist(rollouts).cpu()
