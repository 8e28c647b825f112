"""VLPolicy: prompts with image and video files, grouped prefill, pixels reused by teachers and updates."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from PIL import Image

import copd.multimodal.media
from copd.backends.local.factory import make_policy
from copd.backends.local.vl import VLPolicy
from copd.backends.roles import LossSpec, OPDPart, Prompt, RLPart, SamplingParams, ScoreRequest
from copd.models.sources import load_pretrained
from copd.multimodal.processor import VLProcessor
from copd.multimodal.tiny import build_tiny_vl
from tests.extras import needs


def picture(seed: int, size: int = 56) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two image files and one video (a folder of four frames)."""
    folder = tmp_path_factory.mktemp("media")
    paths = []
    for i in range(2):
        picture(i).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    (folder / "clip").mkdir()
    for i in range(4):
        picture(10 + i).save(folder / "clip" / f"frame{i}.png")
    return paths, str(folder / "clip")


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    model, processor = build_tiny_vl(seed=0, init_std=0.3)
    student = make_policy("s", model, processor, lr=1e-3, video_frames=4)
    teacher = make_policy("t", copy.deepcopy(model), processor, video_frames=4)
    return student, teacher


def prompts_of(media) -> list[Prompt]:
    images, video = media
    return [Prompt("what is it?", images=(images[0],)), Prompt("text only, longer than the others"),
            Prompt("and this?", images=(images[1],), videos=(video,))]


def test_make_policy_picks_the_vision_language_policy(pair):
    student, _ = pair
    assert isinstance(student, VLPolicy)
    text = student.format_prompt(Prompt("hi", system="be brief", images=("a.png",), videos=("v",)))
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_grouped_sampling_equals_sampling_every_copy(pair, media):
    student, _ = pair
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    grouped = student.generate(prompts_of(media), 3, greedy, seed=0)
    copies = student.generate([p for p in prompts_of(media) for _ in range(3)], 1, greedy, seed=0)
    assert torch.equal(grouped.completion_ids_B_T, copies.completion_ids_B_T)
    assert grouped.vision.rows_per_prompt == 3 and grouped.vision.images_per_prompt == [1, 0, 1]
    assert grouped.vision.tensors["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames -> 2 temporal patches
    scores_grouped, scores_copies = student.score(grouped), student.score(copies)
    torch.testing.assert_close(scores_grouped.token_logprobs_B_T, scores_copies.token_logprobs_B_T, atol=1e-5, rtol=1e-5)


def test_media_are_decoded_once_per_batch(pair, media, monkeypatch):
    """Teachers score and the student trains on the rollouts' pixels; no file is read again."""
    student, teacher = pair
    reads = []
    load_image, load_video = copd.multimodal.media.load_image, copd.multimodal.media.load_video
    monkeypatch.setattr(copd.multimodal.media, "load_image", lambda p: reads.append(p) or load_image(p))
    monkeypatch.setattr(copd.multimodal.media, "load_video", lambda p, *a: reads.append(p) or load_video(p, *a))
    rollouts = student.generate(prompts_of(media), 4, SamplingParams(max_new_tokens=5), seed=1)
    assert len(reads) == 2 + 1 + 4  # two images, one video and its four frames, for 12 rows
    scores = teacher.score(rollouts, ScoreRequest(topk=4))
    advantages = torch.randn_like(rollouts.completion_mask_B_T) * rollouts.completion_mask_B_T
    result = student.update([RLPart(rollouts, advantages)], [OPDPart(rollouts, scores, 0.1, "s<-t")], LossSpec())
    assert len(reads) == 7 and not result.skipped and result.metrics["grad_norm"] > 0
    assert 0 <= result.edge_metrics["s<-t"]["overlap_topk"] <= 1


def test_select_keeps_the_pixels_of_kept_groups(pair, media):
    student, _ = pair
    rollouts = student.generate(prompts_of(media), 2, SamplingParams(max_new_tokens=4), seed=2)
    kept = rollouts.select(torch.tensor([4, 5]))  # the third prompt: one image and one video
    assert kept.vision.images_per_prompt == [1] and kept.vision.videos_per_prompt == [1]
    pixels = rollouts.vision.tensors["pixel_values"]
    assert torch.equal(kept.vision.tensors["pixel_values"], pixels[16:32])  # image 0 owns patches 0..15
    torch.testing.assert_close(student.score(kept).token_logprobs_B_T, student.score(rollouts).token_logprobs_B_T[4:6])
    # Rows that split groups (a micro-batch of rows sorted by length) carry one prompt copy each.
    split = rollouts.select(torch.tensor([1, 2]))
    assert split.vision.rows_per_prompt == 1 and split.vision.images_per_prompt == [1, 0]
    torch.testing.assert_close(student.score(split).token_logprobs_B_T, student.score(rollouts).token_logprobs_B_T[1:3])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_micro_batched_update_has_the_one_shot_gradients(pair, media, monkeypatch, checkpointing):
    from copd.backends.local import lm_head
    from copd.backends.local.hf import enable_checkpointing

    student, teacher = pair
    student.optimizer.param_groups[0]["lr"] = 0.0  # both updates see the same weights
    rollouts = student.generate(prompts_of(media), 2, SamplingParams(max_new_tokens=5, record_topk=4), seed=3)
    part = OPDPart(rollouts, teacher.score(rollouts, ScoreRequest.support(4)), beta=0.5, edge="s<-t")
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    spec = LossSpec(opd_estimator="baseline", grad_clip=1e9)

    def gradients(budget):
        student.micro_batch_tokens = budget
        student.update([RLPart(rollouts, advantages)], [part], spec)
        return [p.grad.clone() for p in student.model.parameters() if p.grad is not None]

    reference = gradients(10**9)
    if checkpointing:
        enable_checkpointing(student.model)
        student.checkpointing = True
    monkeypatch.setattr(lm_head, "LOGITS_PER_CHUNK", 3 * student.model.get_output_embeddings().weight.shape[0])
    for a, b in zip(reference, gradients(2 * rollouts.input_ids_B_L.shape[1])):  # two rows a pass
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_supervised_steps_teach_an_answer_about_an_image(pair, media):
    student, _ = pair
    prompts, answers = prompts_of(media)[:1], ["red"]
    first = student.supervised_loss(prompts, answers).item()
    for _ in range(20):
        student.optimizer.zero_grad()
        student.supervised_loss(prompts, answers).backward()
        student.optimizer.step()
    assert student.supervised_loss(prompts, answers).item() < first / 4
    greedy = student.generate(prompts, 1, SamplingParams(max_new_tokens=6, greedy=True), seed=0)
    assert greedy.completions == ["red"]


def test_saved_branch_reloads_as_the_same_policy(pair, media, tmp_path):
    student, _ = pair
    student.save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path)
    # The same route as the student's (the tiny model's is manual): with torchvision a folder
    # loads the checkpoint's own processor, whose resampling rounds pixels differently.
    processor = VLProcessor.from_pretrained(tmp_path, route=student.tokenizer.route)
    again = make_policy("again", model, processor, video_frames=4)
    params = SamplingParams(max_new_tokens=5)
    a, b = student.generate(prompts_of(media), 2, params, seed=3), again.generate(prompts_of(media), 2, params, seed=3)
    assert torch.equal(a.input_ids_B_L, b.input_ids_B_L)


def test_a_text_policy_refuses_media():
    from copd.config.schema import TinyModelConfig
    from copd.errors import CopdError
    from copd.models.sources import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer("abc")
    policy = make_policy("text", build_tiny_model(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), tokenizer),
                         tokenizer, video_frames=4)
    with pytest.raises(CopdError, match="reads text only"):
        policy.format_prompt(Prompt("x", images=("a.png",)))


@needs("peft")
def test_lora_branches_on_a_vision_language_base(media, tmp_path):
    from copd.backends.local.factory import make_lora_policy
    from copd.backends.local.lora import SharedBase, adapter_name
    from copd.backends.local.vl import VLLoraPolicy

    model, processor = build_tiny_vl(seed=0, init_std=0.3)
    shared = SharedBase(model, ["a", "b"], 4, 8.0, 0.0, "all-linear")
    a, b = (make_lora_policy(n, shared, processor, adapter_name(n), 1e-2, video_frames=4) for n in "ab")
    assert isinstance(a, VLLoraPolicy) and any("visual" in n for n, p in shared.model.named_parameters() if p.requires_grad)
    rollouts = a.generate(prompts_of(media), 2, SamplingParams(max_new_tokens=4), seed=0)
    before_b = b.score(rollouts).token_logprobs_B_T
    advantages = torch.ones_like(rollouts.completion_mask_B_T) * rollouts.completion_mask_B_T
    assert not a.update([RLPart(rollouts, advantages)], [], LossSpec()).skipped
    torch.testing.assert_close(b.score(rollouts).token_logprobs_B_T, before_b)  # b's adapter is untouched
    assert not torch.allclose(a.score(rollouts).token_logprobs_B_T, before_b)
    a.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path)
    again = make_policy("again", loaded, loaded_processor, video_frames=4)
    torch.testing.assert_close(again.score(rollouts).token_logprobs_B_T, a.score(rollouts).token_logprobs_B_T, atol=1e-5, rtol=1e-5)


def test_a_qwen3_vl_video_prompt_carries_its_timestamps(media, tmp_path):
    model, processor = build_tiny_vl(seed=0, arch="qwen3_vl", init_std=0.3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path)
    assert loaded_processor.family.model_type == "qwen3_vl"
    policy = make_policy("q3", loaded, loaded_processor, folder_fps=2.0)
    rollouts = policy.generate([Prompt("where?", videos=(media[1],))], 2, SamplingParams(max_new_tokens=4), seed=0)
    text = loaded_processor.tokenizer.decode(rollouts.input_ids_B_L[0, : rollouts.prompt_len])
    # Four frames at 2 fps make two steps, at (0 + 1) / 2 / 2 = 0.25 s and (2 + 3) / 2 / 2 = 1.25 s.
    step = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert f"<|vision_start|><0.2 seconds>{step}<1.2 seconds>{step}<|vision_end|>where?" in text
    assert rollouts.vision.tensors["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert policy.score(rollouts).token_logprobs_B_T.shape == rollouts.completion_mask_B_T.shape
