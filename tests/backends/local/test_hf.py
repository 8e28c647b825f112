"""HFPolicy on a tiny random transformers model: sampling, scoring and updates behave."""

from __future__ import annotations

import warnings

import pytest
import torch

from copd.backends.local.hf import HFPolicy, pad_completions
from copd.backends.roles import LossSpec, OPDPart, Prompt, RLPart, SamplingParams, ScoreRequest
from copd.config.schema import TinyModelConfig
from copd.errors import CopdError
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from tests.fakes import full_distribution

PROMPTS = ["rev:abc=", "count a:aab=", "12+3="]


def tiny_policy(name="p", seed=0, lr=1e-2):
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=48)
    return HFPolicy(name, build_tiny_model(cfg, tokenizer, seed=seed), tokenizer, lr=lr)


def test_greedy_sampling_matches_transformers_generate_with_left_padding():
    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 1, SamplingParams(max_new_tokens=5, greedy=True), seed=0)
    tok = policy.tokenizer
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = policy.model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert rollouts.completions[i] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_decoding_and_scoring_use_no_deprecated_transformers_argument():
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40).
    policy = tiny_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4), seed=0)
        policy.score(rollouts, ScoreRequest(topk=3))


def test_sampling_is_reproducible_from_the_seed_and_rows_are_grouped():
    policy = tiny_policy()
    params = SamplingParams(max_new_tokens=6)
    a = policy.generate(PROMPTS, 4, params, seed=7)
    b = policy.generate(PROMPTS, 4, params, seed=7)
    assert a.completions == b.completions and a.input_ids_B_L.shape[0] == 12
    assert torch.equal(a.completion_mask_B_T, b.completion_mask_B_T)
    # Mask is 1 up to and including EOS, 0 after it.
    eos = policy.tokenizer.eos_token_id
    for row, mask in zip(a.completion_ids_B_T, a.completion_mask_B_T):
        hits = (row == eos).nonzero()
        if len(hits):
            assert mask[: hits[0, 0] + 1].all() and not mask[hits[0, 0] + 1 :].any()


def test_scores_are_sparse_and_match_the_full_distribution():
    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, record_topk=3), seed=1)
    full = full_distribution(policy, rollouts)
    plain = policy.score(rollouts)
    assert plain.support_ids_B_T_S is None and plain.nbytes == rollouts.completion_mask_B_T.numel() * 4
    torch.testing.assert_close(plain.token_logprobs_B_T, full.gather(-1, rollouts.completion_ids_B_T.unsqueeze(-1)).squeeze(-1))
    # The sampler's recorded top-k are the top-k of the distribution it sampled from.
    assert torch.equal(rollouts.topk_ids_B_T_K.long(), full.topk(3, dim=-1).indices)
    asked = policy.score(rollouts, ScoreRequest(topk=5, ids_B_T_J=rollouts.topk_ids_B_T_K))
    B, T = rollouts.completion_mask_B_T.shape
    assert asked.support_ids_B_T_S.shape == (B, T, 8) and asked.support_ids_B_T_S.dtype == torch.int32
    assert torch.equal(asked.topk_ids_B_T_K.long(), full.topk(5, dim=-1).indices)
    torch.testing.assert_close(asked.support_logprobs_B_T_S, full.gather(-1, asked.support_ids_B_T_S.long()))
    assert asked.nbytes == B * T * 4 + 2 * B * T * 8 * 4


@pytest.mark.parametrize("budget_rows, logits_per_chunk", [(2, None), (None, 7), (1, 7)])
def test_scoring_in_micro_batches_and_head_chunks_gives_the_same_scores(monkeypatch, budget_rows, logits_per_chunk):
    from copd.backends.local import lm_head

    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, record_topk=2), seed=1)
    request = ScoreRequest(topk=3, ids_B_T_J=rollouts.topk_ids_B_T_K, student_topk=True)
    whole = policy.score(rollouts, request)
    width = rollouts.input_ids_B_L.shape[1]
    policy.micro_batch_tokens = budget_rows * width if budget_rows else 10**9
    if logits_per_chunk:  # 7 logits a chunk: one position at a time through the LM head
        monkeypatch.setattr(lm_head, "LOGITS_PER_CHUNK", logits_per_chunk)
    chunked = policy.score(rollouts, request)
    mask = rollouts.completion_mask_B_T.bool()
    torch.testing.assert_close(whole.token_logprobs_B_T[mask], chunked.token_logprobs_B_T[mask])
    torch.testing.assert_close(whole.support_logprobs_B_T_S[mask], chunked.support_logprobs_B_T_S[mask])
    assert torch.equal(whole.support_ids_B_T_S[mask], chunked.support_ids_B_T_S[mask]) and chunked.topk == 3


def test_rl_update_raises_the_probability_of_positive_advantage_samples():
    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4), seed=2)
    before = policy.score(rollouts).token_logprobs_B_T
    adv = torch.tensor([1.0, -1.0] * 3)[:, None] * rollouts.completion_mask_B_T
    result = policy.update([RLPart(rollouts, adv)], [], LossSpec())
    after = policy.score(rollouts).token_logprobs_B_T
    mask = rollouts.completion_mask_B_T
    change = ((after - before) * mask).sum(-1)
    assert (change[0::2] > 0).all() and (change[1::2] < 0).all()
    assert result.metrics["approx_kl"] > 0 and not result.skipped


@pytest.mark.parametrize("topk", [None, 4])  # the whole vocabulary (exact), and a top-4 support
def test_exact_kl_distillation_moves_the_student_towards_the_teacher(topk):
    student, teacher = tiny_policy("s", seed=0), tiny_policy("t", seed=1)
    rollouts = student.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, record_topk=topk or 0), seed=3)
    part = OPDPart(rollouts, teacher.score(rollouts, ScoreRequest.support(topk)), beta=1.0, edge="s<-t")
    spec = LossSpec(opd_estimator="exact_kl")
    first = student.update([], [part], spec).edge_metrics["s<-t"]
    for _ in range(5):
        last = student.update([], [part], spec).edge_metrics["s<-t"]
    assert last["sym_kl"] < first["sym_kl"]


def test_non_finite_loss_skips_the_update_and_keeps_weights():
    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4), seed=4)
    before = policy.get_weights()
    adv = torch.full_like(rollouts.completion_mask_B_T, float("nan"))
    result = policy.update([RLPart(rollouts, adv)], [], LossSpec())
    assert result.skipped
    for key, value in policy.get_weights().items():
        assert torch.equal(value, before[key])


def test_chat_template_wraps_prompts_with_the_system_prompt_when_the_tokenizer_has_one():
    policy = tiny_policy()
    assert not policy.use_chat and policy.format_prompt("rev:abc=") == "rev:abc="
    tokenizer = policy.tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    chat = HFPolicy("c", policy.model, tokenizer, system_prompt="be brief")
    assert chat.use_chat and chat.format_prompt("rev:abc=") == "s:be brief u:rev:abc= a:"
    rollouts = chat.generate(["rev:abc="], 2, SamplingParams(max_new_tokens=3), seed=0)
    assert rollouts.prompt_len == len("s:be brief u:rev:abc= a:")
    assert HFPolicy("off", policy.model, tokenizer, chat_template="off").format_prompt("x") == "x"
    # A sample's own system message wins over the configured one.
    assert chat.format_prompt(Prompt("x", system="think")) == "s:think u:x a:"
    assert HFPolicy("nosys", policy.model, tokenizer).format_prompt(Prompt("x", system="think")) == "s:think u:x a:"


def test_a_text_model_refuses_prompts_that_carry_images():
    policy = tiny_policy()
    with pytest.raises(CopdError, match="reads text only"):
        policy.generate([Prompt("what is this?", images=("cat.png",))], 1, SamplingParams(max_new_tokens=2), seed=0)


def test_bf16_compute_is_mixed_precision_weights_and_updates_stay_float32():
    policy = tiny_policy()
    policy.compute_dtype = "bfloat16"
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4), seed=0)
    fp32 = tiny_policy()
    # Same weights, different compute: log-probs agree to bf16 precision, not exactly.
    low, high = policy.score(rollouts).token_logprobs_B_T, fp32.score(rollouts).token_logprobs_B_T
    assert not torch.equal(low, high)
    torch.testing.assert_close(low, high, atol=0.1, rtol=0.05)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    advantages = torch.ones_like(rollouts.completion_mask_B_T) * rollouts.completion_mask_B_T
    result = policy.update([RLPart(rollouts, advantages)], [], LossSpec())
    assert not result.skipped
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_a_group_shares_one_prompt_pass_with_the_same_logits_and_gradients():
    from copd.backends.local.sampling import completion_logits, group_size

    policy = tiny_policy()
    rollouts = policy.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6), seed=3)
    ids, mask, plen = rollouts.input_ids_B_L, rollouts.attention_mask_B_L, rollouts.prompt_len
    assert group_size(ids[:, :plen], mask[:, :plen]) == 4
    weights = torch.randn(ids.shape[0], ids.shape[1] - plen, len(policy.tokenizer))

    def run(rows):
        policy.model.zero_grad()
        logits = torch.cat([completion_logits(policy.model, ids[r:r + 1], mask[r:r + 1], plen) for r in rows]) if rows else \
            completion_logits(policy.model, ids, mask, plen)
        (logits.log_softmax(-1) * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in policy.model.parameters()]

    shared, shared_grads = run(None)  # 3 prompt passes for 12 rows
    alone, alone_grads = run(list(range(ids.shape[0])))  # every row on its own
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, alone_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert group_size(ids[[0, 4, 1]][:, :plen], mask[[0, 4, 1]][:, :plen]) == 1  # no repeated prompt: no sharing


def test_sampling_draws_tokens_with_their_probabilities_and_never_a_cut_one():
    from copd.backends.local.sampling import RowNoise, next_tokens, sample_categorical

    probs = torch.tensor([[0.0, 0.1, 0.2, 0.7, 0.0]]).expand(200_000, 5).contiguous()
    noise = RowNoise(0, torch.arange(200_000))
    counts = torch.bincount(sample_categorical(probs, noise.uniform(0)), minlength=5) / 200_000
    torch.testing.assert_close(counts, probs[0], atol=0.005, rtol=0)
    assert counts[0] == 0 and counts[4] == 0
    # top_p = 0.6 keeps only the 0.7 token; temperature changes nothing about that.
    logits = probs[:1000].log()
    drawn = next_tokens(logits, SamplingParams(temperature=0.7, top_p=0.6), noise.uniform(1)[:1000])
    assert torch.equal(drawn, torch.full((1000,), 3))


def test_row_noise_is_uniform_and_keyed_by_seed_row_and_position_only():
    from copd.backends.local.sampling import RowNoise

    u = RowNoise(7, torch.arange(100_000)).uniform(3)
    assert u.shape == (100_000, 1) and u.min() >= 0 and u.max() < 1
    # Uniform: each tenth of [0, 1) holds a tenth of the draws, and positions are not correlated.
    torch.testing.assert_close(torch.histc(u, 10, 0, 1) / 100_000, torch.full((10,), 0.1), atol=0.005, rtol=0)
    v = RowNoise(7, torch.arange(100_000)).uniform(4)
    assert abs(torch.corrcoef(torch.cat([u, v], 1).T)[0, 1]) < 0.02
    # A row's draws do not depend on the rows around it: rows 40..49 alone, or picked out of the batch.
    alone = RowNoise(7, torch.arange(40, 50)).uniform(3)
    assert torch.equal(alone, u[40:50]) and torch.equal(RowNoise(7, torch.arange(100)).rows(slice(40, 50)).uniform(3), alone)
    assert not torch.equal(RowNoise(8, torch.arange(40, 50)).uniform(3), alone)


def test_a_share_of_the_prompts_samples_what_the_whole_step_samples_for_them():
    policy = tiny_policy()
    prompts = ["1+2=", "33+4=", "5+60=", "7+8="]
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    whole = policy.generate(prompts, 2, params, seed=3)
    share = policy.generate_share(prompts, 2, params, seed=3, share=range(2, 4))
    assert share.prompt_len == whole.prompt_len  # prompts padded to the longest of all
    assert torch.equal(share.input_ids_B_L[:, : share.prompt_len], whole.input_ids_B_L[4:, : whole.prompt_len])
    width = share.completion_ids_B_T.shape[1]
    assert torch.equal(share.completion_ids_B_T, whole.completion_ids_B_T[4:, :width])
    assert share.completions == whole.completions[4:]
    # The shares joined are the whole step's rollouts, tensor for tensor.
    joined = pad_completions([policy.generate_share(prompts, 2, params, 3, range(2)), share], policy.tokenizer.pad_token_id)
    for name in ("input_ids_B_L", "attention_mask_B_L", "completion_mask_B_T"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert joined.completions == whole.completions and joined.prompt_len == whole.prompt_len
