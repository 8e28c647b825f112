"""`copd compare`: orderings computed from numbers, and a small smoke run on a tiny model."""

import json

import pytest

from copd.cli.main import main
from copd.driver.compare import orderings, parse_methods
from copd.errors import CopdError
from tests.e2e.test_text import TINY


def result_with(overall: dict) -> dict:
    return {"rows": {label: {"mean": {"overall": v}} for label, v in overall.items()}}


def test_orderings_are_computed_not_assumed():
    found = orderings(result_with({"base": 0.30, "mixed RLVR": 0.35, "static OPD a<-b": 0.33, "MOPD": 0.40,
                                   "CoPD": 0.38, "experts merged": 0.39}))
    held = {claim: ok for claim, ok, _ in found}
    # CoPD 0.38 is below the best of static OPD / MOPD (0.40): reported as not holding.
    assert held == {"CoPD > static OPD / MOPD": False, "static OPD / MOPD > mixed RLVR": True,
                    "mixed RLVR > base": True, "CoPD > mixed RLVR": True, "CoPD > experts merged": False,
                    "CoPD > base": True}
    assert ("CoPD > base", True, "38.0 vs 30.0") in found


def test_unknown_method_is_a_clear_error():
    with pytest.raises(CopdError, match="valid: copd"):
        parse_methods("copd,mopdd")


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
    md = (out / "compare.md").read_text()
    assert "| CoPD |" in md and "## Orderings" in md and "CoPD > base" in md
    # A second call reuses the finished runs instead of training again.
    mtime = (out / "runs" / "copd-seed3" / "eval.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "runs" / "copd-seed3" / "eval.json").stat().st_mtime == mtime
