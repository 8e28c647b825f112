"""The `copd` command line: demo, train, eval, merge, compare, diagnose, report.

User mistakes (CopdError) print one line and exit 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from copd.errors import CopdError

EPILOG = "Config overrides use dotted keys with YAML values, e.g. schedule.cycles=4 branches.0.beta=0.05"


def demo_config_path(multimodal: bool = False) -> Path:
    name = "demo_multimodal.yaml" if multimodal else "demo.yaml"
    return Path(str(resources.files("copd") / "configs" / name))


def _quiet_libraries() -> None:
    """Keep the terminal for copd's own progress display."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _setup(args) -> None:
    _quiet_libraries()
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_train(args) -> int:
    from copd.config.loader import load_config
    from copd.driver.pipeline import run_training
    from copd.reporting.progress import default_reporter

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.out={args.resume}")
    config = load_config(args.config, overrides)
    reporter = default_reporter(args.quiet)
    if config.run.threads:
        import torch

        torch.set_num_threads(config.run.threads)
    start = time.perf_counter()
    run_dir = run_training(config, resume=bool(args.resume), reporter=reporter, base_dir=Path(args.config).resolve().parent)
    _print_summary(run_dir, time.perf_counter() - start)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    args.config = str(demo_config_path(args.multimodal))
    args.overrides = [*args.overrides, f"run.out={out}"]
    args.resume = None
    return cmd_train(args)


def _print_summary(run_dir: Path, seconds: float) -> None:
    path = run_dir / "eval.json"
    if not path.is_file():
        return
    models = json.loads(path.read_text())["models"]
    caps = list(next(iter(models.values()))["greedy"])
    print(f"\nfinished in {seconds:.0f} s; greedy accuracy on test splits:")
    print(f"  {'model':<16}" + "".join(f"{c:>12}" for c in caps))
    for label, scores in models.items():
        print(f"  {label:<16}" + "".join(f"{100 * scores['greedy'][c]:>11.1f}%" for c in caps))


def cmd_eval(args) -> int:
    from copd.evaluation.commands import SETTING_FLAGS, data_file_keys, run_eval
    from copd.reporting.progress import default_reporter

    given = {key: getattr(args, key) for key in SETTING_FLAGS}
    run_eval(args.target, args.tasks, args.samples, data_file_keys(args), args.out, args.seed, given, args.group_by,
             args.log_samples, default_reporter(args.quiet))
    return 0


def cmd_merge(args) -> int:
    from copd.config.loader import load_config
    from copd.driver.merging import merge_branches

    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():  # a run without branches/ yet gets merge_branches' own error
        found = " (no such folder)" if not run_dir.is_dir() else " (it holds a model: config.json)" if (run_dir / "config.json").is_file() else ""
        raise CopdError(f"merge: {run_dir} is not a run directory{found}; expected {run_dir / 'config.yaml'} and "
                        f"{run_dir / 'branches'}/: give the folder copd train wrote")
    config = load_config(run_dir / "config.yaml")
    out = Path(args.out) if args.out else run_dir / f"merged-{args.method}"
    if out.exists() and any(out.iterdir()):
        raise CopdError(f"{out} already exists and is not empty; choose another --out")
    merge_branches(run_dir, config, method=args.method, out=out)
    print(f"merged model ({args.method}): {out}")
    return 0


def cmd_compare(args) -> int:
    from copd.config.loader import load_config
    from copd.driver.compare import parse_methods, run_compare
    from copd.reporting.progress import default_reporter

    methods = parse_methods(args.methods)
    base = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    report = run_compare(base, methods, args.seeds, out, default_reporter(args.quiet), Path(args.config).resolve().parent)
    print((out / "compare.md").read_text().split("## Compute")[0])
    print(f"comparison: {report}")
    return 0


def cmd_report(args) -> int:
    from copd.reporting.run_report import write_report

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise CopdError(f"run directory not found: {run_dir}")
    print(f"report: {write_report(run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copd",
        description="Co-Evolving Policy Distillation: train capability branches with RLVR (GRPO), "
        "distil them into each other on-policy, merge them into one model.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"copd {__import__('copd').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from copd.evaluation.diagnose import add_parser as add_diagnose
    from copd.models.fetch import add_parser as add_models

    parsers = [*_add_run_commands(sub), *_add_result_commands(sub)]
    diagnose = add_diagnose(sub)
    add_models(sub)

    report = sub.add_parser("report", help="(re)write RUN/report.md and RUN/plots/")
    report.add_argument("run", metavar="RUN", help="a run directory")
    report.set_defaults(func=cmd_report)
    for p in (*parsers, diagnose, report):
        p.add_argument("--threads", type=int, help="torch CPU threads")
    return parser


def _add_run_commands(sub) -> list[argparse.ArgumentParser]:
    """`copd demo` and `copd train`."""
    demo = sub.add_parser("demo", help="run the embedded demo end to end (tiny model, CPU, a few minutes)", epilog=EPILOG)
    demo.add_argument("--out", help="run directory (default: runs/demo-TIMESTAMP)")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.add_argument("--multimodal", action="store_true",
                      help="a tiny Qwen3-VL with text, image and video branches (hub and spokes) instead of the text demo")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="run the plan of a YAML config", epilog=EPILOG)
    train.add_argument("config", help="YAML config (see examples/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress display")
    train.set_defaults(func=cmd_train)
    return [demo, train]


def _add_result_commands(sub) -> list[argparse.ArgumentParser]:
    """`copd eval`, `copd merge` and `copd compare`."""
    from copd.config.methods import METHODS
    from copd.core.merge import MERGE_METHODS
    from copd.evaluation.commands import add_data_file_options, add_generation_options

    ev = sub.add_parser("eval", help="score a run or a model folder on capabilities' test splits")
    ev.add_argument("target", metavar="RUN_OR_MODEL", help="a run directory (base, branches, final, merged-*) or a transformers model folder; "
                    "a folder inside a run is scored on that run's capabilities and settings")
    ev.add_argument("--tasks", required=True,
                    help="comma-separated capability names (the run's own, or built-in) or data files (.jsonl, .json, .parquet, .csv)")
    ev.add_argument("--samples", type=int, default=200, help="test prompts per capability (default 200)")
    add_data_file_options(ev)
    add_generation_options(ev)
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled completions")
    ev.add_argument("--group-by", metavar="COLUMN", help="also score per value of this data column (e.g. category)")
    ev.add_argument("--log-samples", metavar="FILE", help="write every prompt's completions, reference answer and rewards here (JSON lines)")
    ev.add_argument("--out", help="write the scores and the generation settings as JSON here")
    ev.add_argument("--quiet", action="store_true", help="no progress display")
    ev.set_defaults(func=cmd_eval)

    merge = sub.add_parser("merge", help="merge a run's branches with another method")
    merge.add_argument("run", metavar="RUN", help="a finished run directory")
    merge.add_argument("--method", default="mean", choices=list(MERGE_METHODS), help="merge method")
    merge.add_argument("--out", help="output model folder (default: RUN/merged-METHOD)")
    merge.set_defaults(func=cmd_merge)

    compare = sub.add_parser("compare", help="train CoPD and the baselines on the same data and base; one table", epilog=EPILOG)
    compare.add_argument("config", help="YAML config of the CoPD run the baselines are derived from")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    compare.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods of {', '.join(METHODS)} (default: all)")
    compare.add_argument("--seeds", type=int, default=3, help="seeds run.seed, run.seed+1, ... (default 3)")
    compare.add_argument("--out", help="comparison directory (default: runs/compare-TIMESTAMP); finished runs in it are reused")
    compare.add_argument("--quiet", action="store_true", help="no progress display")
    compare.set_defaults(func=cmd_compare)
    return [ev, merge, compare]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup(args)
        return args.func(args)
    except CopdError as err:
        print(f"copd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("copd: interrupted; a run continues from its last cycle checkpoint with --resume RUN", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
