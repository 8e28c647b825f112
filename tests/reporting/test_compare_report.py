"""compare.md from compare.json: row order and groups come from the methods (copd.config.methods)."""

from copd.config.loader import validate_config
from copd.config.methods import BASE_ROW, METHODS
from copd.driver.compare import orderings
from copd.reporting.compare_report import score_table, write_compare_report

BASE = validate_config({
    "capabilities": [{"name": "sort", "builtin": "sort"}, {"name": "reversal", "builtin": "reversal"}],
    "branches": [{"name": "s", "capabilities": ["sort"]}, {"name": "r", "capabilities": ["reversal"]}],
})

# The order compare.md has always had: rows by the first of these prefixes they start with, then by label.
PREFIX_ORDER = ["base", "expert", "mixed RLVR", "static OPD", "MOPD", "experts merged", "CoPD no merge", "CoPD one-way",
                "CoPD overlap trigger", "CoPD"]


def result_of(methods=tuple(METHODS)) -> dict:
    rows = {BASE_ROW: {"run": METHODS[methods[0]].run, "mean": {"overall": 0.1}, "std": {"overall": 0.0}}}
    for i, name in enumerate(methods):
        for label in METHODS[name].outputs(METHODS[name].transform(BASE)):
            rows[label] = {"run": METHODS[name].run, "method": name, "mean": {"overall": 0.2 + 0.01 * i}, "std": {"overall": 0.0}}
    return {"capabilities": [], "seeds": [0], "rows": rows, "compute": {}, "orderings": []}


def labels_in(table: list[str]) -> list[str]:
    return [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]


def test_rows_keep_their_order():
    result = result_of()
    by_prefix = sorted(result["rows"], key=lambda name: (next(i for i, p in enumerate(PREFIX_ORDER) if name.startswith(p)), name))
    assert labels_in(score_table(result)) == by_prefix
    assert by_prefix[:4] == ["base", "expert r", "expert s", "experts merged"]


def test_every_method_has_a_label_rank_and_its_rows_start_with_the_label():
    for name, method in METHODS.items():
        rows = method.outputs(method.transform(BASE))
        assert rows and all(label.startswith(method.label) for label in rows), name


def test_orderings_compare_groups_of_rows():
    held = {claim: ok for claim, ok, _ in orderings(result_of())}
    # Later methods score higher here: mopd (0.28) beats copd (0.20); static OPD's rows count with MOPD's.
    assert held["CoPD > static OPD / MOPD"] is False and held["CoPD overlap trigger > CoPD"] is True
    assert set(held) == {"CoPD > static OPD / MOPD", "static OPD / MOPD > mixed RLVR", "mixed RLVR > base", "CoPD > mixed RLVR",
                         "CoPD > experts merged", "CoPD > CoPD one-way", "CoPD > base", "CoPD overlap trigger > CoPD"}


def test_report_without_runs(tmp_path):
    result = result_of(("copd", "mopd"))
    result["orderings"] = [{"claim": c, "held": h, "numbers": n} for c, h, n in orderings(result)]
    text = write_compare_report(tmp_path, result).read_text()
    assert "| base |" in text and text.index("| MOPD |") < text.index("| CoPD |")
    assert "- did NOT hold: CoPD > static OPD / MOPD (20.0 vs 21.0)" in text
    assert "Scored with" not in text  # compare.json from before eval settings were recorded


def test_report_states_the_generation_settings_the_runs_were_scored_with(tmp_path):
    result = {**result_of(("copd",)), "eval_settings": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 1.0, "n": 4, "batch_size": 8}}
    text = write_compare_report(tmp_path, result).read_text()
    assert "Scored with max_new_tokens 64, temperature 0.7, top_p 1.0, n 4; mean@n, pass@k and groups" in text


def test_held_out_curves_average_over_seeds_per_run_branch_and_capability(tmp_path):
    import json

    from copd.reporting.compare_report import held_out_curves

    for seed, accuracy in ((0, 0.25), (1, 0.75)):
        run = tmp_path / "runs" / f"experts-seed{seed}"
        run.mkdir(parents=True)
        records = [{"type": "branch", "step": 1, "branch": "s", "reward": 0.5},
                   {"type": "eval", "step": 0, "branch": "s", "greedy/sort": 0.0},
                   {"type": "eval", "step": 2, "branch": "s", "greedy/sort": accuracy}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert held_out_curves(tmp_path) == {"sort": {"experts s": [(0, 0.0), (2, 0.5)]}}
    result = result_of(("experts",))
    text = write_compare_report(tmp_path, result).read_text()
    assert "![heldout](plots/heldout.png)" in text and "K times as many steps" in text
    assert (tmp_path / "plots" / "heldout.png").read_bytes()[:4] == b"\x89PNG"
