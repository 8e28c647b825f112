"""Device check: the demo config end to end on a GPU, and the seam's contract there.

For anyone with a CUDA device (nothing here runs in CI):

    python benchmarks/gpu_check.py [--device cuda] [--multimodal] [--out runs/gpu-check]

1. The seam on the device: two tiny branches on `--device` sample, score and update, and
   every tensor that crosses between them (rollouts, sparse scores, weights) is on the CPU.
2. `copd train` on the demo config with run.device set to `--device`: warm start, CoPD,
   merge, evaluation; prints the greedy accuracy table and the seconds of each stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from copd.backends.local.hf import HFPolicy
from copd.backends.roles import LossSpec, OPDPart, RLPart, SamplingParams, ScoreRequest
from copd.cli.main import demo_config_path
from copd.cli.main import main as copd_main
from copd.config.schema import TinyModelConfig
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model


def on_cpu(*tensors) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def check_seam(device: str) -> None:
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    model = build_tiny_model(TinyModelConfig(), tokenizer, seed=0)
    student = HFPolicy("s", model, tokenizer, lr=1e-3, device=device)
    teacher = HFPolicy("t", copy.deepcopy(model), tokenizer, device=device)
    rollouts = student.generate(["rev:abc=", "12+3="], 4, SamplingParams(max_new_tokens=6, record_topk=16), seed=0)
    scores = teacher.score(rollouts, ScoreRequest.support(16))
    advantages = torch.linspace(-1, 1, rollouts.completion_mask_B_T.shape[0])[:, None] * rollouts.completion_mask_B_T
    result = student.update([RLPart(rollouts, advantages)], [OPDPart(rollouts, scores, 0.1, "s<-t")], LossSpec())
    weights = student.get_weights()
    ok = on_cpu(rollouts.input_ids_B_L, rollouts.completion_mask_B_T, rollouts.topk_ids_B_T_K, scores.token_logprobs_B_T,
                scores.support_ids_B_T_S, scores.support_logprobs_B_T_S, *weights.values())
    print(f"seam on {device}: model on {next(student.model.parameters()).device}, crossing tensors on the CPU: {ok}, "
          f"update skipped: {result.skipped}, edge metrics: {json.dumps(result.edge_metrics['s<-t'])}")
    if not ok or result.skipped:
        sys.exit("seam check failed")


def run_demo(device: str, multimodal: bool, out: Path) -> None:
    config = demo_config_path(multimodal)
    t0 = time.perf_counter()
    code = copd_main(["train", str(config), f"run.device={device}", f"run.out={out}"])
    if code:
        sys.exit(f"copd train exited with {code}")
    timing = json.loads((out / "timing.json").read_text())
    models = json.loads((out / "eval.json").read_text())["models"]
    print(f"demo on {device}: {time.perf_counter() - t0:.0f} s in all; {json.dumps(timing)}")
    caps = list(next(iter(models.values()))["greedy"])
    print(f"  {'model':<16}" + "".join(f"{c:>12}" for c in caps))
    for label, scores in models.items():
        print(f"  {label:<16}" + "".join(f"{100 * scores['greedy'][c]:>11.1f}%" for c in caps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--multimodal", action="store_true", help="the multimodal demo config instead of the text one")
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: torch.cuda.is_available() is False")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_seam(args.device)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty; pass another --out")
    run_demo(args.device, args.multimodal, out)


if __name__ == "__main__":
    main()
