"""pass@k and mean@n over n sampled completions per prompt.

With n samples of a prompt of which c are correct, the unbiased estimator of the chance that
at least one of k samples is correct (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code") is

    pass@k = 1 - C(n - c, k) / C(n, k)        (k <= n),

averaged over prompts; mean@n is the mean reward over all n samples (for 0/1 rewards, the
expected pass@1). Rewards in [0, 1] count as correct when they are 1.
"""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one prompt with `correct` of `n` samples right."""
    if not 0 < k <= n or not 0 <= correct <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= correct <= n (n={n}, correct={correct}, k={k})")
    if n - correct < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)


def reported_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def sample_scores(rewards_per_prompt: list[list[float]]) -> dict[str, float]:
    """mean@n and pass@k (k in reported_ks(n)) over prompts, each with the same n rewards."""
    if not rewards_per_prompt:
        return {}
    n = len(rewards_per_prompt[0])
    if any(len(r) != n for r in rewards_per_prompt):
        raise ValueError("every prompt needs the same number of samples")
    prompts = len(rewards_per_prompt)
    scores = {f"mean@{n}": sum(sum(r) for r in rewards_per_prompt) / (n * prompts)}
    correct = [sum(1 for x in r if x >= 1.0) for r in rewards_per_prompt]
    for k in reported_ks(n):
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / prompts
    return scores
