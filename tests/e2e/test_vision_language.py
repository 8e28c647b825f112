"""A tiny Qwen3-VL (and Qwen2-VL, Qwen2.5-VL) end to end: text, image-file and video-folder branches, hub-and-spoke, merge, eval, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from copd.config.loader import load_config
from copd.driver.pipeline import run_training
from copd.errors import CopdError
from copd.models.sources import load_pretrained
from copd.multimodal.processor import VLProcessor
from copd.reporting.run_report import write_report

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_config(tmp_path: Path, architecture: str = "qwen3_vl") -> Path:
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(EXAMPLES / "data" / "multimodal", data)
    text = f"""
model:
  tiny: {{architecture: {architecture}, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, vision_hidden_size: 16}}
  cache_dir: {tmp_path / 'cache'}
  vision: {{video_frames: 4}}
warmup: {{enabled: false}}
capabilities:
  - {{name: sort, builtin: sort, options: {{min_len: 3, max_len: 4, letters: abc, test_size: 4}}}}
  - {{name: shapes, path: data/shapes.jsonl, prompt_field: question, images_field: image, test_ratio: 0.2}}
  - {{name: motion, path: data/motion.jsonl, prompt_field: question, videos_field: video, test_ratio: 0.2}}
branches:
  - {{name: text, capabilities: [sort]}}
  - {{name: image, capabilities: [shapes]}}
  - {{name: video, capabilities: [motion]}}
topology: {{kind: hub, hub: text}}
schedule: {{cycles: 2, rl_steps: 1, opd_steps: 1}}
rl: {{prompts_per_step: 2, rollouts_per_prompt: 2}}
opd: {{prompts_per_step: 2, rollouts_per_prompt: 2}}
sampling: {{max_new_tokens: 4}}
eval: {{samples: 3, batch_size: 2}}
run: {{out: {tmp_path / 'run'}, seed: 0}}
"""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("architecture", ["qwen3_vl", "qwen2_vl", "qwen2_5_vl"])
def test_three_modalities_train_merge_and_evaluate(tmp_path, architecture):
    path = write_config(tmp_path, architecture)
    run_dir = run_training(load_config(path), base_dir=path.parent)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    edges = {r["edge"] for r in records if r.get("edge")}
    assert edges == {"text<-image", "image<-text", "text<-video", "video<-text"}  # spokes never distil from each other
    assert {r["branch"] for r in records if r.get("branch")} == {"text", "image", "video"}
    scores = json.loads((run_dir / "eval.json").read_text())["models"]
    assert set(scores) == {"base", "branch:text", "branch:image", "branch:video", "merged"}
    assert set(scores["merged"]["greedy"]) == {"sort", "shapes", "motion"}
    model, processor = load_pretrained(run_dir / "final")
    assert model.config.model_type == architecture and isinstance(processor, VLProcessor)
    assert (run_dir / "final" / "processor_config.json").is_file()
    assert (run_dir / "final" / "preprocessor_config.json").is_file()  # the layout older tools read
    assert write_report(run_dir).is_file()


def test_a_missing_image_fails_before_anything_is_written(tmp_path):
    path = write_config(tmp_path)
    (tmp_path / "data" / "images" / "003.png").unlink()
    with pytest.raises(CopdError, match=r"shapes\.jsonl:4: .*003\.png"):
        run_training(load_config(path), base_dir=path.parent)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_video_fails_before_anything_is_written(tmp_path):
    path = write_config(tmp_path)
    frames = sorted((tmp_path / "data" / "clips" / "002").iterdir())
    frames[-1].write_bytes(b"not a picture")  # only the last frame: every frame is checked
    with pytest.raises(CopdError, match=r"motion\.jsonl:3: .*002"):
        run_training(load_config(path), base_dir=path.parent)
    assert not (tmp_path / "run").exists()


def test_a_crashed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    from copd.driver.trainer import Trainer

    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    straight_dir.mkdir()
    crashed_dir.mkdir()
    straight = run_training(load_config(write_config(straight_dir)), base_dir=straight_dir)
    crashed_path = write_config(crashed_dir)
    original_step, calls = Trainer.step, {"n": 0}

    def crash_in_cycle_two(self, phase):
        calls["n"] += 1
        if calls["n"] == 3:  # cycle 1 has 2 steps
            raise KeyboardInterrupt
        return original_step(self, phase)

    monkeypatch.setattr(Trainer, "step", crash_in_cycle_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(crashed_path), base_dir=crashed_dir)
    monkeypatch.setattr(Trainer, "step", original_step)
    resumed = run_training(load_config(crashed_path), resume=True, base_dir=crashed_dir)
    assert training_records(resumed) == training_records(straight)
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def training_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def test_a_text_model_with_image_data_fails_before_anything_is_written(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("architecture: qwen3_vl,", "architecture: llama,"))
    with pytest.raises(CopdError, match="capability 'shapes' has images or videos, but the base model reads text only"):
        run_training(load_config(path), base_dir=path.parent)
    assert not (tmp_path / "run").exists()


def test_a_video_too_short_for_the_model_fails_before_anything_is_written(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("vision: {video_frames: 4}", "vision: {video_frames: 4, video_min_frames: 6}"))
    with pytest.raises(CopdError, match=r"motion\.jsonl:1: field \"video\": video .* has 4 frames; the model needs at least 6"):
        run_training(load_config(path), base_dir=path.parent)
    assert not (tmp_path / "run").exists()
