"""--resume compares configs through the schema: a run saved before a key existed still resumes."""

import pytest
import yaml

from copd.config.loader import dump_config
from copd.driver.pipeline import check_run_dir
from copd.errors import CopdError
from tests.fakes import make_config


def test_a_saved_config_without_newer_keys_resumes(tmp_path):
    config = make_config(tmp_path)
    dump_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for key in ("topk", "diagnostics_every"):  # keys a run saved by an earlier version lacks
        del saved["opd"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(config, tmp_path, resume=True)


def test_a_different_config_does_not_resume(tmp_path):
    config = make_config(tmp_path)
    dump_config(config, tmp_path / "config.yaml")
    other = make_config(tmp_path, opd={"topk": 8})
    with pytest.raises(CopdError, match="section 'opd' differs"):
        check_run_dir(other, tmp_path, resume=True)
