"""Peak memory of one update against completion tokens per step, before and after the memory work.

    python benchmarks/memory.py                       # rl, opd, merge (15-20 minutes on 2 CPU cores)
    python benchmarks/memory.py --quick               # smoke run of all four parts, small sizes (about 5 minutes)
    python benchmarks/memory.py --parts paper --layers 2 --tokens 1024          # the paper's shapes, scaled down
    python benchmarks/memory.py --parts paper --device cuda --search            # Qwen3-4B on a GPU, 80 GB cap
    python benchmarks/memory.py --json                # JSON lines instead of tables

Parts (each measurement in its own process: benchmarks/memory_points.py):
  rl     one RL update (clipped policy gradient, random advantages) of rows of random ids
         (16 prompt + 1,024 completion tokens; --quick 256) on a tiny Qwen3 with the paper's
         vocabulary (hidden 64, 2 layers, 151,936 ids, random weights from config), at 1k, 4k,
         16k and 64k completion tokens per step;
  opd    the same for one OPD update (exact_kl estimator) on a second tiny Qwen3's scores with a
         top-16 support; the teacher's scoring pass is measured on its own too;
  merge  merging K = 2, 3, 6 branches of a ~100 MB fp32 Qwen3 saved as transformers folders:
         merge_branches (streams tensors) against the old path (every branch loaded whole, then
         copd.core.merge.merge_state_dicts);
  paper  one RL update on Qwen3-4B's architecture (random weights, bf16 where the device runs it
         natively, else fp32), 16k-token responses, the token budget and activation
         checkpointing on; --layers/--hidden/--tokens/... scale it down. On CUDA the peak is
         torch.cuda.max_memory_allocated and --search doubles the rows of one micro-batch until
         the update no longer fits --cap-gb (80).
Modes: before = the previous release (micro_batch_tokens 10**12 and lm_head.LOGITS_PER_CHUNK
10**15: one pass per part with its whole [B, T, V] fp32 log-softmax); after = the defaults
(--budget tokens per pass, LM head in chunks of 2**26 logits); ckpt = after + gradient checkpointing.
Memory is the process's peak RSS (VmHWM) during the measured call; "start" is the RSS before it
(interpreter, torch, model). It depends on glibc malloc's settings: copd keeps freed blocks below
1 GiB in the heap (copd.backends.local.allocator), which can fragment it; prefix the command with
COPD_KEEP_FREED_MEMORY=0 to measure with malloc's defaults. Each CPU child runs under RLIMIT_AS
(--max-gb plus address-space slack), and a "before" point whose [tokens, V] fp32 tensors cannot
fit --max-gb is not run but estimated (BEFORE_TENSORS). A point estimated from the previous size
to take over --max-point-s is skipped, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_points as mp

GB = 1e9
# fp32 [tokens, V] tensors alive at once in a "before" pass: (peak - start) / (tokens x V x 4 B)
# measured at 4k tokens was 2.9 for an update (the log-softmax saved for backward, its gradient
# and the logits' gradient) and 2.0 for the no-grad scoring pass (the logits, their log-softmax).
BEFORE_TENSORS = {"update": 3, "score": 2}
AS_SLACK_GB = 6  # address space beyond resident memory: libraries, thread stacks, malloc arenas
# Tokens per step, row length. Quick: 256 tokens' logits fit one chunk (every mode takes the one-shot
# path), 1,024 tokens' do not.
SIZES = {False: ([1024, 4096, 16384, 65536], 1024), True: ([256, 1024], 256)}
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
MERGE = {False: ([2, 3, 6], 3), True: ([2, 3], 1)}  # K, layers (3: ~105 MB in fp32, 1: ~51 MB)
MODES = ("before", "after", "ckpt")


def before_gb(tokens: int, kind: str) -> float:
    return BEFORE_TENSORS[kind] * tokens * mp.VOCAB * 4 / GB


def child(point: dict, args) -> dict:
    """Run one point in a fresh process under the memory guard; its JSON line back."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(point), "--max-gb", str(args.max_gb)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, **QUIET}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    found = json.loads(lines[-1]) if lines else {**point, "error": f"exit code {proc.returncode}"}
    return found if point["kind"] == "merge_setup" else emit(found, args)


def emit(found: dict, args) -> dict:
    """--json: print the measurement (or skip note) at once, one line."""
    if args.json:
        print(json.dumps(found), flush=True)
    return found


def guarded(point: dict, args) -> dict:
    """The point run, or (a "before" pass that cannot fit) its estimate."""
    if point["mode"] == "before":
        need = before_gb(point["rows"] * point["width"], point["kind"])
        if need > args.max_gb:
            return emit({**point, "error": "does not fit", "needs_gb": need}, args)
    return child(point, args)


def update_rows(part: str, args, workdir: Path) -> list[dict]:
    """One table row per size: every mode's update (and for opd the teacher's scoring pass)."""
    table = []
    tokens_list, width = SIZES[args.quick]
    for tokens in args.tokens_list or tokens_list:
        rows = max(1, tokens // width)
        common = {"part": part, "rows": rows, "width": width, "budget": args.budget}
        row = {"tokens": rows * width, "shape": f"{rows}x{width}"}
        slow = too_slow({**common, "kind": "update", "mode": "after"}, table, args, quiet=True)
        if part == "opd" and slow:  # no update will read the teacher's scores
            row["score_after"] = row["score_before"] = slow
        elif part == "opd":
            save = str(workdir / f"scores_{tokens}.pt")
            row["score_after"] = child({**common, "kind": "score", "mode": "after", "save": save}, args)
            row["score_before"] = guarded({**common, "kind": "score", "mode": "before"}, args)
            common["scores"] = save
        for mode in args.modes:
            if mode == "ckpt" and rows * width > args.ckpt_max_tokens:
                continue
            point = {**common, "kind": "update", "mode": mode}
            row[mode] = too_slow(point, table, args) or guarded(point, args)
        table.append(row)
    return table


def too_slow(point: dict, table: list[dict], args, quiet: bool = False) -> dict | None:
    """A skip note when the same mode's last point, scaled by tokens, says this one would take over --max-point-s."""
    done = [r[point["mode"]] for r in table if "seconds" in r.get(point["mode"], {})]
    if not done:
        return None
    last = done[-1]
    estimate = last["seconds"] * point["rows"] / last["rows"]
    if estimate <= args.max_point_s:
        return None
    found = {**point, "error": f"skipped (~{estimate / 60:.0f} min)", "estimate_s": estimate}
    return found if quiet else emit(found, args)


def merge_rows(args, workdir: Path) -> list[dict]:
    ks, layers = MERGE[args.quick]
    run = str(workdir / "merge")  # base and max(ks) branches; a K-branch merge reads the first K
    setup = child({"kind": "merge_setup", "mode": "setup", "k": max(ks), "layers": layers, "run": run}, args)
    table = []
    for k in ks:
        row = {"k": k, "model_mib": setup.get("model_mib")}
        for mode in ("streaming", "in_memory"):
            row[mode] = child({"kind": "merge", "mode": mode, "k": k, "run": run}, args)
        table.append(row)
    return table


def paper_point(args) -> dict:
    """The paper part's point from the flags (dtype auto: bf16 where it is native, else fp32)."""
    dtype = args.dtype
    if dtype == "auto":
        from copd.backends.local.precision import bf16_speedup

        dtype = "bfloat16" if args.device.startswith("cuda") or bf16_speedup("cpu") > 1.1 else "float32"
    scale = mp.QUICK_PAPER if args.quick else mp.QWEN3_4B
    shape = {k: scale[k] if getattr(args, k) is None else getattr(args, k) for k in mp.QWEN3_4B}  # tokens too
    return {"kind": "paper", "mode": "ckpt", "device": args.device, "dtype": dtype, **shape, "rows": args.rows,
            "budget": args.budget, "search": args.search, "cap_gb": args.cap_gb}


# ---- report ---------------------------------------------------------------------------------------
def mb(found: dict | None, key: str = "peak_mib") -> str:
    if not found:
        return "-"
    if found.get("error") == "does not fit":
        return f"does not fit (~{found['needs_gb']:.0f} GB)"
    return found.get("error") or f"{found[key]:,.0f}"


def secs(found: dict | None) -> str:
    return "-" if not found or "seconds" not in found else f"{found['seconds']:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(r) for r in rows])


def update_table(part: str, rows: list[dict]) -> str:
    header = ["tokens", "rows x len", "start MB", "before MB", "after MB", "after+ckpt MB", "before s", "after s", "ckpt s"]
    header += ["score before MB", "score after MB", "score s"] if part == "opd" else []
    body = []
    for r in rows:
        start = next((r[m] for m in MODES if r.get(m) and "start_mib" in r[m]), None)
        cells = [f"{r['tokens']:,}", r["shape"], mb(start, "start_mib"), mb(r.get("before")), mb(r.get("after")),
                 mb(r.get("ckpt")), secs(r.get("before")), secs(r.get("after")), secs(r.get("ckpt"))]
        if part == "opd":
            cells += [mb(r["score_before"]), mb(r["score_after"]), secs(r["score_after"])]
        body.append(cells)
    return table(header, body)


def unfit_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        for key, found in r.items():
            if isinstance(found, dict) and found.get("error") == "does not fit":
                n, each = BEFORE_TENSORS[found["kind"]], r["tokens"] * mp.VOCAB * 4 / GB
                lines.append(f"{r['tokens']:,} tokens, {key}: does not fit: needs about {found['needs_gb']:.0f} GB "
                             f"({n} fp32 [{r['tokens']:,} x {mp.VOCAB:,}] tensors of {each:.1f} GB)")
    return lines


def merge_table(rows: list[dict]) -> str:
    body = [[str(r["k"]), f"{r['model_mib'] or 0:,.0f}", mb(r["streaming"], "start_mib"), mb(r["streaming"]),
             mb(r["in_memory"]), secs(r["streaming"]), secs(r["in_memory"])] for r in rows]
    return table(["K", "model MB", "start MB", "streaming MB", "in-memory (before) MB", "streaming s", "in-memory s"], body)


def paper_table(found: dict) -> str:
    """The update at --rows, then (--search) each row count of one micro-batch."""
    body = []
    for p in [found, *found.get("searched", [])]:
        budget = found["budget"] if p is found else p["rows"] * (mp.PROMPT + found["tokens"])
        body.append([found["device"], found["dtype"], f"{found['layers']}x{found['hidden']}",
                     f"{found.get('params', 0) / 1e9:.2f}B", f"{p['rows']}x{found['tokens']:,}", f"{budget:,}",
                     mb(p, "start_mib") if "start_mib" in p else "-", mb(p), secs(p),
                     f"{p['s_per_1k']:.2f}" if "s_per_1k" in p else "-"])
    return table(["device", "dtype", "layers x hidden", "params", "rows x tokens", "budget", "start MB", "peak MB",
                  "seconds", "s / 1k tokens"], body)


def provenance() -> str:
    from copd.backends.local.precision import bf16_speedup
    from copd.reporting.environment import describe_environment, environment_line

    return f"{environment_line(describe_environment())}; bf16 matmul {bf16_speedup('cpu'):.3g}x fp32"


def report(results: dict, args) -> None:
    keep = os.environ.get("COPD_KEEP_FREED_MEMORY", "1") != "0"
    print(f"copd memory benchmark ({'quick' if args.quick else 'full'}): {provenance()}; "
          f"budget {args.budget:,} tokens, guard {args.max_gb:.0f} GB, malloc keeps freed memory: {keep}\n")
    titles = {"rl": "One RL update", "opd": "One OPD update (exact_kl, teacher top-16 support)"}
    for part in ("rl", "opd"):
        if part in results:
            print(f"{titles[part]}: peak RSS (MB = MiB) and seconds\n\n{update_table(part, results[part])}")
            print("".join(line + "\n" for line in unfit_lines(results[part])))
    if keep and ("rl" in results or "opd" in results):
        print("Peaks with malloc keeping freed memory vary from run to run by up to GBs (heap fragmentation);\n"
              "COPD_KEEP_FREED_MEMORY=0 measures what the update allocates.\n")
    if "merge" in results:
        print(f"Merging K branches (mean): peak RSS\n\n{merge_table(results['merge'])}\n")
    if "paper" in results:
        print(f"Paper shapes (Qwen3-4B architecture, random weights): one RL update, checkpointing on\n\n"
              f"{paper_table(results['paper'])}\n")


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", help="comma-separated: rl, opd, merge, paper (default rl,opd,merge; --quick all four)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--json", action="store_true", help="JSON lines, one per measurement")
    parser.add_argument("--budget", type=int, default=16384, help="micro_batch_tokens of the after modes")
    parser.add_argument("--sizes", dest="tokens_list", type=lambda s: [int(x) for x in s.split(",")],
                        help="rl/opd completion tokens per step (default 1024,4096,16384,65536)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="rl/opd: before,after,ckpt")
    parser.add_argument("--ckpt-max-tokens", type=int, default=4096,
                        help="rl/opd: ckpt mode up to this many tokens (the tiny model's activations are a few MB)")
    parser.add_argument("--max-point-s", type=float, default=300, help="skip a point estimated to take longer")
    available = _mem_available_gb()
    parser.add_argument("--max-gb", type=float, default=round(0.8 * available, 1),
                        help="memory guard per CPU child (default 80%% of available memory)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    paper = parser.add_argument_group("paper")
    paper.add_argument("--device", default="cpu")
    paper.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    for name, value in mp.QWEN3_4B.items():  # --tokens: completion tokens per row
        flag, quick = "--" + name.replace("_", "-"), mp.QUICK_PAPER[name]
        paper.add_argument(flag, type=int, help=f"Qwen3-4B: {value}; --quick {quick}")
    paper.add_argument("--rows", type=int, default=1)
    paper.add_argument("--search", action="store_true", help="CUDA: double the rows of one micro-batch until OOM")
    paper.add_argument("--cap-gb", type=float, default=80.0, help="CUDA memory cap for --search (GiB)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024 / GB


def run_single(args) -> None:
    """Child: the memory guard, then one point, one JSON line."""
    point = json.loads(args.single)
    if not point.get("device", "cpu").startswith("cuda"):  # CUDA reserves far more address space than it uses
        limit = int((args.max_gb + AS_SLACK_GB) * GB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.threads:
        mp.torch.set_num_threads(args.threads)
    print(json.dumps(mp.measure(point)), flush=True)


def run(args) -> dict:
    """Every asked part's measurements (children), by part."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="copd-memory-") as tmp:
        for part in args.parts.split(","):
            if part in ("rl", "opd"):
                results[part] = update_rows(part, args, Path(tmp))
            elif part == "merge":
                results[part] = merge_rows(args, Path(tmp))
            elif part == "paper":
                results[part] = child(paper_point(args), args)
            else:
                raise SystemExit(f"unknown part {part!r}: choose from rl, opd, merge, paper")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.single:
        return run_single(args)
    args.parts = args.parts or ("rl,opd,merge,paper" if args.quick else "rl,opd,merge")
    results = run(args)
    if args.json:
        print(json.dumps({"environment": provenance()}))
    else:
        report(results, args)


if __name__ == "__main__":
    main()
