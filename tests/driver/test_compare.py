"""`copd compare`: orderings computed from numbers, and a small smoke run on a tiny model."""

import json

import pytest

from copd.cli.main import main
from copd.driver.compare import orderings, parse_methods
from copd.errors import CopdError
from tests.e2e.test_text import TINY


def result_with(overall: dict) -> dict:
    """compare.json rows: {label: (method, mean overall)}; the base row has no method."""
    rows = {}
    for label, (method, value) in overall.items():
        rows[label] = {"mean": {"overall": value}, **({"method": method} if method else {})}
    return {"rows": rows}


def test_orderings_are_computed_not_assumed():
    found = orderings(result_with({"base": (None, 0.30), "mixed RLVR": ("mixed", 0.35), "static OPD a<-b": ("static_opd", 0.33),
                                   "MOPD": ("mopd", 0.40), "CoPD": ("copd", 0.38), "experts merged": ("experts_merge", 0.39),
                                   "expert a": ("experts", 0.99)}))
    held = {claim: ok for claim, ok, _ in found}
    # CoPD 0.38 is below the best of static OPD / MOPD (0.40): reported as not holding.
    assert held == {"CoPD > static OPD / MOPD": False, "static OPD / MOPD > mixed RLVR": True,
                    "mixed RLVR > base": True, "CoPD > mixed RLVR": True, "CoPD > experts merged": False,
                    "CoPD > base": True}
    assert ("CoPD > base", True, "38.0 vs 30.0") in found


def test_closeness_is_each_runs_last_measurement_averaged_over_its_edges(tmp_path):
    from copd.driver.compare import closeness, closeness_claim

    def run(name, seed, rows):
        folder = tmp_path / "runs" / f"{name}-seed{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def edge(step, label, overlap, kl):
        return {"step": step, "type": "edge", "edge": label, "overlap_topk": overlap, "sym_kl": kl}

    for seed, late in ((0, 0.8), (1, 0.6)):
        run("copd", seed, [edge(1, "a<-b", 0.9, 0.1), edge(2, "a<-b", late, 0.4), edge(2, "b<-a", 0.7, 0.2),
                           {"step": 2, "type": "branch", "branch": "a"}])
        run("experts", seed, [edge(2, "b<-a", 0.5, 3.0)])
    near = closeness(["copd", "experts"], [0, 1], tmp_path)
    # copd: seed 0 (0.8 + 0.7) / 2 = 0.75, seed 1 (0.6 + 0.7) / 2 = 0.65; sym KL (0.4 + 0.2) / 2 = 0.3 on both.
    assert near["copd"]["seeds"]["0"] == pytest.approx({"overlap_topk": 0.75, "sym_kl": 0.3, "step": 2})
    assert near["copd"]["mean"]["overlap_topk"] == pytest.approx(0.70)
    assert near["copd"]["std"]["overlap_topk"] == pytest.approx(0.0707107, abs=1e-6)
    assert closeness_claim({"closeness": near}) == ("CoPD's branches end closer than the experts", True,
                                                    "overlap 0.700 vs 0.500, sym KL 0.300 vs 3.000")
    assert closeness_claim({"closeness": {"copd": near["copd"]}}) is None  # no experts run: no claim


def test_unknown_method_is_a_clear_error():
    with pytest.raises(CopdError, match=r"^--methods: unknown method 'mopdd' \(did you mean 'mopd'\?\); valid: copd, "):
        parse_methods("copd,mopdd")
    with pytest.raises(CopdError, match="none given"):
        parse_methods(" , ")


def test_cli_unknown_method_fails_before_anything_is_written(tmp_path, capsys):
    from tests.cli.test_main import fails, write_config

    err = fails(capsys, ["compare", str(write_config(tmp_path)), "--methods", "copd,expert", "--out", str(tmp_path / "cmp"), "--quiet"])
    assert "did you mean 'experts'?" in err and not (tmp_path / "cmp").exists()


def test_a_method_whose_plan_cannot_be_built_fails_before_training(tmp_path, capsys):
    from tests.cli.test_main import fails, write_config

    # Three experts: the `pair` topology cannot connect them.
    caps = [{"name": n, "builtin": n} for n in ("addition", "reversal", "count")]
    branches = [{"name": n[:3], "capabilities": [n]} for n in ("addition", "reversal", "count")]
    path = write_config(tmp_path, capabilities=caps, branches=branches)
    err = fails(capsys, ["compare", str(path), "--methods", "mixed,copd", "--out", str(tmp_path / "cmp"), "--quiet"])
    assert "method 'copd'" in err and "'pair' needs exactly 2 branches" in err
    assert not (tmp_path / "cmp").exists()


def test_labels_ranks_and_groups_come_from_the_methods():
    from copd.config.methods import METHODS, ORDERINGS
    from copd.reporting.compare_report import score_table

    groups = {m.group for m in METHODS.values()} | {"base"}
    assert {g for claim in ORDERINGS for g in claim} <= groups
    rows = {"base": {"run": "copd", "mean": {"overall": 0.1}, "std": {"overall": 0.0}}}
    for name in ("copd", "mixed", "experts_merge", "experts"):
        label = METHODS[name].label + (" a" if name == "experts" else "")
        rows[label] = {"run": METHODS[name].run, "method": name, "mean": {"overall": 0.5}, "std": {"overall": 0.0}}
    table = score_table({"capabilities": [], "seeds": [0], "rows": rows})
    assert [line.split(" | ")[0][2:] for line in table[2:]] == ["base", "expert a", "experts merged", "mixed RLVR", "CoPD"]


def test_compare_smoke_on_a_tiny_model(tmp_path, capsys):
    raw = json.loads(json.dumps(TINY))
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["schedule"] = {"cycles": 1, "rl_steps": 1, "opd_steps": 1}
    raw["run"] = {"seed": 3}
    import yaml

    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    args = ["compare", str(config), "--methods", "copd,experts,experts_merge,mopd", "--seeds", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["rows"]) == {"base", "CoPD", "expert rev", "expert cnt", "experts merged", "MOPD"}
    assert set(result["compute"]) == {f"{r}-seed{s}" for r in ("copd", "experts", "mopd") for s in (3, 4)}
    row = result["rows"]["CoPD"]
    assert set(row["seeds"]) == {"3", "4"}
    values = [row["seeds"][s]["overall"] for s in ("3", "4")]
    assert row["mean"]["overall"] == pytest.approx(sum(values) / 2)
    assert result["compute"]["experts-seed3"]["updates"] == 2 * 2  # 2 experts x 1 cycle x (1 + 1) steps
    # MOPD distils from the experts run's experts (1 step) and counts their updates as its own.
    assert result["compute"]["mopd-seed3"]["updates"] == 2 * 2 + 1
    assert yaml.safe_load((out / "runs" / "mopd-seed3" / "config.yaml").read_text())["schedule"]["experts_from"] == str(out / "runs" / "experts-seed3")
    md = (out / "compare.md").read_text()
    assert "| CoPD |" in md and "## Orderings" in md and "CoPD > base" in md
    assert "## How close the branches end" in md and "| experts (probed) | 2 |" in md
    assert set(result["closeness"]) == {"copd", "experts"}
    # A second call reuses the finished runs instead of training again.
    mtime = (out / "runs" / "copd-seed3" / "eval.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "runs" / "copd-seed3" / "eval.json").stat().st_mtime == mtime
