"""`copd diagnose`: how close two models are on the states one of them visits (docs/method.md §7).

Model A is the student: it samples its own completions to the test prompts, both models
score those rollouts, and the top-k overlap, symmetric KL and mean delta are read off on
A's completion tokens. High overlap means the two are close enough to merge or distil.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from copd.backends.roles import Policy, Prompt, Rollouts, SamplingParams, Scorer, ScoreRequest
from copd.capabilities import Capability
from copd.core.losses import masked_mean
from copd.core.opd import support_diagnostics
from copd.errors import CopdError
from copd.evaluation.runs import describe_run, find_run, load_run_config

BATCH_SIZE = 64
DEFAULT_TOPK = 16  # support size when none is given: opd.topk's default
MERGE_THRESHOLD = 0.90  # docs/method.md §7: under CoPD O_k stays above 0.90 throughout training
DEFAULT_MAX_NEW_TOKENS = 16
METRICS = ("overlap", "sym_kl", "mean_delta")


def measure_pair(student: Scorer, teacher: Scorer, rollouts: Rollouts, k: int, topk: int | None) -> dict[str, float]:
    """Top-k overlap, symmetric KL on the top-`topk` support, mean delta and bytes, on the student's rollouts.

    The teacher sends its top-`topk` and its log-probs at the student's recorded top-k ids;
    the student then sends its own top-k and its log-probs on the teacher's support, so
    both sides of every KL term are known (docs/method.md §4, §7).
    """
    request = ScoreRequest.support(topk)
    teacher_scores = teacher.score(rollouts, request)
    student_scores = student.score(rollouts, ScoreRequest(k, teacher_scores.support_ids_B_T_S))
    if min(teacher_scores.topk, student_scores.topk) < k:
        raise ValueError(f"top-{k} overlap needs k ids from both sides, got {teacher_scores.topk} and {student_scores.topk}")
    mask = rollouts.completion_mask_B_T
    found = support_diagnostics(student_scores.topk_ids_B_T_K[..., :k], teacher_scores.topk_ids_B_T_K[..., :k],
                                student_scores.support_logprobs_B_T_S[..., student_scores.topk:],
                                teacher_scores.support_logprobs_B_T_S, teacher_scores.support_ids_B_T_S.long(), mask)
    delta = masked_mean(teacher_scores.token_logprobs_B_T - student_scores.token_logprobs_B_T, mask).item()
    return {**found, "delta_mean": delta, "tokens": float(mask.sum().item()),
            "score_bytes": teacher_scores.nbytes + student_scores.nbytes}


def _batch_sums(policy_a: Policy, policy_b: Policy, prompts: list[Prompt], params: SamplingParams, k: int, seed: int,
                n: int = 1) -> dict:
    """Token-weighted sums of the three metrics on one batch of A's own rollouts (n per prompt)."""
    topk = max(k, DEFAULT_TOPK)
    rollouts = policy_a.generate(prompts, n, params.recording(topk), seed)
    found = measure_pair(policy_a, policy_b, rollouts, k, topk)
    tokens = int(found["tokens"])
    values = {"overlap": found["overlap_topk"], "sym_kl": found["sym_kl"], "mean_delta": found["delta_mean"]}
    return {"tokens": tokens, **{name: v * tokens for name, v in values.items()}}


def _means(sums: dict) -> dict:
    tokens = sums["tokens"]
    return {"tokens": tokens, **{m: sums[m] / tokens if tokens else 0.0 for m in METRICS}}


def diagnose_models(
    policy_a: Policy,
    policy_b: Policy,
    capabilities: list[Capability],
    samples: int,
    params: SamplingParams,
    k: int,
    seed: int,
    n: int = 1,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Overlap of B with A on A's rollouts of each capability's first `samples` test prompts.

    Per capability and overall (token-weighted): top-k overlap O_k (A student, B teacher),
    symmetric KL, mean delta = log p_B - log p_A at A's sampled tokens, and the token count.
    """
    per_cap: dict[str, dict] = {}
    total = {"tokens": 0, **dict.fromkeys(METRICS, 0.0)}
    for cap in capabilities:
        prompts = [Prompt.of(s) for s in cap.test_set(samples)]  # with their images, videos and system prompt
        sums = {"tokens": 0, **dict.fromkeys(METRICS, 0.0)}
        for start in range(0, len(prompts), batch_size):
            batch = _batch_sums(policy_a, policy_b, prompts[start : start + batch_size], params, k, seed + start, n)
            sums = {key: sums[key] + batch[key] for key in sums}
        per_cap[cap.name] = _means(sums)
        total = {key: total[key] + sums[key] for key in total}
    return {"k": k, "per_capability": per_cap, "overall": _means(total)}


def verdict(result: dict, threshold: float = MERGE_THRESHOLD) -> str:
    """One line: is the overall top-k overlap above the merge-readiness threshold?"""
    k, overlap = result["k"], result["overall"]["overlap"]
    if overlap >= threshold:
        return f"overall top-{k} overlap {overlap:.2f} >= {threshold:.2f}: close enough to merge or distil"
    return (
        f"overall top-{k} overlap {overlap:.2f} < {threshold:.2f}: far apart; distillation gains are likely "
        "smaller (docs/method.md §7: gain correlates with overlap)"
    )


def _load_pair(model_a: str, model_b: str, options: dict):
    """Both policies (prompting and vision `options` of the run), or a CopdError when a folder is missing or the
    vocabularies differ."""
    from copd.backends.local.factory import make_policy
    from copd.models.sources import check_model_folder, load_pretrained

    folders = [check_model_folder(model_a), check_model_folder(model_b)]
    (ma, ta), (mb, tb) = load_pretrained(folders[0]), load_pretrained(folders[1])
    if ta.get_vocab() != tb.get_vocab():
        raise CopdError(f"{folders[0]} and {folders[1]} have different tokenizers; diagnose needs one shared vocabulary")
    size_a, size_b = ma.get_output_embeddings().weight.shape[0], mb.get_output_embeddings().weight.shape[0]
    if size_a != size_b:
        raise CopdError(f"{folders[0]} and {folders[1]} have different output sizes ({size_a} vs {size_b} logits)")
    return make_policy("A", ma, ta, **options), make_policy("B", mb, tb, **options), folders, size_a


def _print_table(result: dict) -> None:
    k = result["k"]
    print(f"  {'capability':<16}{'tokens':>8}{f'top-{k} overlap':>16}{'sym KL':>10}{'mean delta':>12}")
    rows = {**result["per_capability"], "overall": result["overall"]}
    for name, r in rows.items():
        print(f"  {name:<16}{r['tokens']:>8}{r['overlap']:>16.3f}{r['sym_kl']:>10.3f}{r['mean_delta']:>12.3f}")


def run_diagnose(model_a: str, model_b: str, tasks: str, samples: int, k: int, seed: int, out: str | None,
                 data_keys: dict | None = None, given: dict | None = None) -> dict:
    """Load two model folders, diagnose B against A's rollouts, print a table and a verdict."""
    from copd.evaluation.commands import FOLDER_DEFAULTS, describe_settings, eval_settings, resolve_tasks

    if samples < 1:
        raise CopdError(f"--samples must be >= 1, got {samples}")
    # The run that holds MODEL_A (else MODEL_B), as `copd eval` finds it: its capabilities, settings and prompting.
    run_dir = find_run([model_a, model_b])
    run_config = load_run_config(run_dir)
    if run_dir is not None:
        print(describe_run(run_dir, run_config))
    # The run's chat template, system prompt and video sampling, so both models see its prompts.
    options = run_config.model.policy_options() if run_config else {}
    policy_a, policy_b, folders, vocab = _load_pair(model_a, model_b, options)
    if not 1 <= k <= vocab:
        raise CopdError(f"--k must be between 1 and the vocabulary size {vocab}, got {k}")
    caps = resolve_tasks(tasks, data_keys, run_config)
    # A model folder's default here: diagnose's own shorter completions.
    defaults = {**FOLDER_DEFAULTS, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    # A model folder's or a run's: one rollout per prompt in batches of BATCH_SIZE unless asked, as before these flags.
    asked = {"n": 1, "batch_size": BATCH_SIZE, **{key: v for key, v in (given or {}).items() if v is not None}}
    settings, fallback = eval_settings(asked, run_config, seed, defaults)
    print(describe_settings(settings, fallback))
    params = settings.sampling()
    result = diagnose_models(policy_a, policy_b, caps, samples, params, k, seed, settings.n, settings.batch_size)
    print(f"diagnose: B={folders[1]} on the rollouts of A={folders[0]} (up to {samples} test prompts per capability)")
    _print_table(result)
    result["verdict"] = verdict(result)
    print(f"verdict: {result['verdict']}")
    if out:
        meta = {"model_a": str(folders[0]), "model_b": str(folders[1]), "samples": samples, "seed": seed}
        meta["settings"] = dataclasses.asdict(settings)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**meta, **result}, indent=1))
        print(f"diagnostics: {out}")
    return result


def cmd_diagnose(args) -> int:
    from copd.evaluation.commands import SETTING_FLAGS, data_file_keys

    given = {key: getattr(args, key) for key in SETTING_FLAGS}
    run_diagnose(args.model_a, args.model_b, args.tasks, args.samples, args.k, args.seed, args.out, data_file_keys(args), given)
    return 0


def add_parser(sub):
    """Register `copd diagnose` on an argparse subparsers object; returns the new parser."""
    p = sub.add_parser(
        "diagnose",
        help="top-k overlap, symmetric KL and mean delta of two models on MODEL_A's own rollouts (merge readiness)",
        description="MODEL_A samples one completion per test prompt; both models score it. Reports per capability "
        f"and overall; an overall top-k overlap >= {MERGE_THRESHOLD:.2f} counts as close enough to merge or distil.",
    )
    p.add_argument("model_a", metavar="MODEL_A", help="transformers model folder of the student (its rollouts are scored)")
    p.add_argument("model_b", metavar="MODEL_B", help="transformers model folder of the teacher (same tokenizer as MODEL_A)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated capability names (a run's own or built-in) or data files (.jsonl, .json, .parquet, .csv)")
    p.add_argument("--samples", type=int, default=64, help="test prompts per capability (default 64)")
    p.add_argument("--k", type=int, default=4, help="k of the top-k overlap (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of MODEL_A's sampling (default 0)")
    p.add_argument("--out", help="write the diagnostics as JSON here")
    from copd.evaluation.commands import add_data_file_options, add_generation_options

    add_data_file_options(p)
    add_generation_options(p, {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "batch_size": BATCH_SIZE})
    p.set_defaults(func=cmd_diagnose)
    return p
