"""User datasets beyond JSONL: .json/.parquet/.csv files, `dataset:` sources, field mapping."""

import json
import re
import sys

import pytest
from PIL import Image

from tests.extras import require

datasets = require("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from copd.capabilities import Sample, load_capability  # noqa: E402
from copd.capabilities.loader import capability_config  # noqa: E402
from copd.config.schema import CapabilityConfig  # noqa: E402
from copd.errors import CopdError  # noqa: E402

ROWS = [{"question": f"q{i}", "answer": i, "topic": "math", "level": i % 3} for i in range(20)]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # Keeps the Arrow caches `datasets` writes out of the home folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _all(cap):
    return cap.train_sampler(0).draw(len(cap.source.train)) + cap.test_set()


def _spec(**keys):
    return {"name": "t", "prompt_field": "question", **keys}


def _error(spec, base_dir=None):
    with pytest.raises(CopdError) as info:
        load_capability(spec, base_dir)
    message = str(info.value)
    assert "\n" not in message and "capability 't'" in message
    return message


def test_parquet_reads_samples_fields_and_numeric_answers(tmp_path):
    path = _parquet(tmp_path / "data.parquet", ROWS)
    cap = load_capability(_spec(path=str(path), verifier="numeric"))
    samples = sorted(_all(cap), key=lambda s: int(s.prompt[1:]))
    assert [s.prompt for s in samples] == [f"q{i}" for i in range(20)]
    assert samples[7].answer == "7" and samples[7].fields == {"topic": "math", "level": 1}
    assert (samples[7].system, samples[7].images, samples[7].videos) == (None, (), ())
    assert cap.score("it is 7", samples[7]) == 1.0


def test_csv_cells_are_text(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer,note\nq1,2.0,x\nq2,3,\n")
    cap = load_capability(_spec(path=str(path), test_path=str(path)))
    assert [(s.answer, s.fields) for s in cap.test_set()] == [
        ("2.0", {"note": "x"}),
        ("3", {"note": ""}),
    ]


@pytest.mark.parametrize("layout", ["list", "lines"])
def test_json_list_or_lines(tmp_path, layout):
    path = tmp_path / "data.json"
    if layout == "list":
        path.write_text(json.dumps(ROWS, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cap = load_capability(_spec(path="data.json", test_ratio=0.25), base_dir=tmp_path)
    assert len(cap.test_set()) == 5 and len(cap.source.train) == 15
    assert {s.answer for s in _all(cap)} == {str(i) for i in range(20)}


def _picture(path, frames=1):
    # Media files are checked when a capability loads, so they must exist and be readable.
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(frames)]
    images[0].save(path, save_all=frames > 1, append_images=images[1:])
    return path


def test_system_images_videos_mapping(tmp_path):
    _picture(tmp_path / "d/img/a.png")
    _picture(tmp_path / "d/v/1.gif", frames=4)
    absolute = _picture(tmp_path / "abs/2/frame1.png").parent  # a folder of frames (a video needs 4)
    for i in (2, 3, 4):
        _picture(absolute / f"frame{i}.png")
    rows = [
        {"question": "a", "answer": "1", "sys": "be brief", "img": "img/a.png", "vid": None},
        {"question": "b", "answer": "2", "sys": None, "img": None, "vid": ["v/1.gif", str(absolute)]},
    ]
    path = _parquet(tmp_path / "d" / "mm.parquet", rows)
    spec = _spec(path=str(path), test_path=str(path), system_field="sys")
    cap = load_capability({**spec, "images_field": "img", "videos_field": "vid"})
    a, b = cap.test_set()
    assert a == Sample("a", "1", {}, system="be brief", images=(str(tmp_path / "d/img/a.png"),))
    assert b.system is None and b.images == ()
    assert b.videos == (str(tmp_path / "d/v/1.gif"), str(absolute))
    rows[1]["vid"] = ["v/1.gif", "https://example.com/3.mp4"]
    _parquet(path, rows)
    with pytest.raises(CopdError, match=r'row 2: field "vid": https://example.com/3.mp4 is a URL; .* give its path'):
        load_capability({**spec, "images_field": "img", "videos_field": "vid"})


def test_fields_selects_verifier_keywords(tmp_path):
    path = _parquet(tmp_path / "data.parquet", ROWS)
    cap = load_capability(_spec(path=str(path), fields=["level"]))
    assert all(set(s.fields) == {"level"} for s in _all(cap))
    empty = load_capability(_spec(path=str(path), fields=[]))
    assert all(s.fields == {} for s in _all(empty))


def test_save_to_disk_folder_with_test_split(tmp_path):
    train = datasets.Dataset.from_list(ROWS)
    test = datasets.Dataset.from_list([{**r, "question": f"t{i}"} for i, r in enumerate(ROWS[:4])])
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "ds"))
    cap = load_capability(_spec(dataset="ds", test_split="test"), base_dir=tmp_path)
    assert [s.prompt for s in cap.test_set()] == ["t0", "t1", "t2", "t3"]
    assert {s.prompt for s in cap.source.train} == {f"q{i}" for i in range(20)}
    swapped = load_capability(_spec(dataset=str(tmp_path / "ds"), split="test", test_split="train"))
    assert len(swapped.source.train) == 4 and len(swapped.test_set()) == 20


def test_single_saved_dataset_is_the_train_split(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    cap = load_capability(_spec(dataset="one", test_ratio=0.5), base_dir=tmp_path)
    assert len(cap.source.train) == 10 and len(cap.test_set()) == 10
    message = _error(_spec(dataset="one", split="validation"), tmp_path)
    assert "key 'split'" in message and "no split 'validation'; splits: train" in message


def test_parquet_folder_dataset_with_ratio_split(tmp_path):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    _parquet(tmp_path / "pq" / "data" / "train-00000.parquet", ROWS + ROWS[:5])  # duplicates
    cap = load_capability(_spec(dataset=str(tmp_path / "pq"), test_ratio=0.2, split_seed=3))
    train = {s.prompt for s in cap.source.train}
    test = {s.prompt for s in cap.test_set()}
    assert len(test) == 4 and len(train) == 16 and not train & test
    assert cap.test_set() == load_capability(
        _spec(dataset=str(tmp_path / "pq"), test_ratio=0.2, split_seed=3)
    ).test_set()


def test_ratio_split_keeps_image_questions_apart(tmp_path):
    rows = [{"question": "What is shown?", "answer": "x", "img": f"{i}.png"} for i in range(10)]
    for i in range(10):
        _picture(tmp_path / f"{i}.png")
    path = _parquet(tmp_path / "mm.parquet", rows)
    cap = load_capability(_spec(path=str(path), images_field="img", test_ratio=0.2))
    assert len(cap.test_set()) == 2 and len(cap.source.train) == 8
    assert not {s.images for s in cap.test_set()} & {s.images for s in cap.source.train}


def test_the_typed_config_and_its_dict_load_the_same(tmp_path):
    _parquet(tmp_path / "data.parquet", ROWS)
    cfg = CapabilityConfig(name="t", path="data.parquet", prompt_field="question", fields=["level"])
    assert capability_config(cfg.model_dump()) == cfg  # a saved config (every key listed) loads back
    typed, plain = load_capability(cfg, tmp_path), load_capability(cfg.model_dump(exclude_defaults=True), tmp_path)
    assert typed.test_set() == plain.test_set() and typed.test_set()[0].fields.keys() == {"level"}


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"builtin": "addition", "path": "a.jsonl"}, "exactly one of `builtin`, `path` or `dataset`"),
        ({"path": "a.jsonl", "dataset": "d"}, "exactly one of"),
        ({"path": "a.jsonl", "test_split": "test"}, "`test_split` needs `dataset`"),
        ({"dataset": "d", "test_path": "t.csv", "test_split": "test"}, "not both"),
    ],
)
def test_config_validator(keys, fragment):
    with pytest.raises(ValueError, match=fragment):
        CapabilityConfig(name="t", **keys)


def test_missing_column_names_the_columns(tmp_path):
    path = _parquet(tmp_path / "data.parquet", ROWS)
    message = _error({"name": "t", "path": str(path)})
    assert "key 'path'" in message and "data.parquet" in message
    assert 'missing field "prompt" (key \'prompt_field\')' in message
    assert "columns: question, answer, topic, level" in message


def test_missing_listed_field_in_a_json_row(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": "a", "answer": "1", "x": 1}, {"question": "b", "answer": "2"}]))
    message = _error(_spec(path=str(path), fields=["x"]))
    assert 'data.json: row 2: missing field "x" (key \'fields\'); the row has: question, answer' in message


@pytest.mark.parametrize(
    ("rows", "keys", "fragment"),
    [
        ([{"question": "a", "answer": 1}, {"question": 5, "answer": 2}], {}, 'row 1: field "question" must be a string'),
        ([{"question": "a", "answer": "1", "img": 3}], {"images_field": "img"}, 'row 1: field "img" must be a path or a list'),
        ([{"question": "a", "answer": "1", "s": 3}], {"system_field": "s"}, 'row 1: field "s" must be a string or null'),
        ([{"question": "a", "answer": [1]}], {}, 'row 1: field "answer" must be a string or a number'),
    ],
)
def test_bad_row_types_name_the_row(tmp_path, rows, keys, fragment):
    # A JSON list keeps each row's own types, so the failing row is the one named.
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    assert fragment.replace("row 1", f"row {len(rows)}") in _error(_spec(path=str(path), **keys))


def test_bad_parquet_type_names_row_and_file(tmp_path):
    path = _parquet(tmp_path / "data.parquet", [{"question": i, "answer": "a"} for i in range(3)])
    message = _error(_spec(path=str(path)))
    assert 'data.parquet: row 1: field "question" must be a string, got 0' in message


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"path": "missing.parquet"}, r"key 'path': .*missing\.parquet: file not found"),
        ({"path": "data.txt"}, r"unsupported file type '\.txt'; supported: \.jsonl, \.json"),
        ({"path": "data.parquet", "test_path": "nope.csv"}, r"key 'test_path': .*nope\.csv: file not found"),
        ({"dataset": "./nowhere"}, r"key 'dataset': .*nowhere: dataset folder not found"),
        ({"dataset": "data.parquet"}, "is a file, not a dataset folder; give a file with key 'path'"),
        ({"dataset": "ds", "test_split": "tset"}, r"key 'test_split': .*no split 'tset' \(did you mean 'test'\?\); splits: train, test"),
        ({"dataset": "ds", "dataset_config": "x"}, "save_to_disk has no configs"),
        ({"path": "data.parquet", "dataset": "ds"}, "exactly one of `builtin`, `path` or `dataset`"),
        ({"path": "data.parquet", "split": "test"}, "`split` needs `dataset`"),
        ({"dataset": "ds", "test_split": "test", "test_ratio": 0.2}, "give `test_split` or `test_ratio`, not both"),
        ({"path": "data.parquet", "fields": ["answer"]}, "key 'fields': 'answer' is reserved"),
        ({"path": "data.parquet", "fields": "level"}, "key 'fields': Input should be a valid list"),
        ({"path": "data.parquet", "images_field": 3}, "key 'images_field': Input should be a valid string"),
        ({"path": "data.parquet", "options": {"digits": 2}}, "`options` applies to built-in capabilities"),
    ],
)
def test_source_errors_name_capability_key_and_file(tmp_path, keys, fragment):
    (tmp_path / "data.txt").write_text("x")
    _parquet(tmp_path / "data.parquet", ROWS)
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    assert re.search(fragment, _error(_spec(**keys), tmp_path))


def test_unreadable_parquet_is_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    message = _error(_spec(path="bad.parquet"), tmp_path)
    assert "bad.parquet: cannot load it (" in message


def test_pretty_printed_json_object_is_explained(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps({"data": ROWS}, indent=1))
    assert "got one JSON object (keys: data)" in _error(_spec(path="data.json"), tmp_path)


def test_missing_datasets_library(tmp_path, monkeypatch):
    _parquet(tmp_path / "data.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = _error(_spec(path="data.parquet"), tmp_path)
    assert message.endswith("needs the datasets library: pip install copd[data]")
    # JSON needs no extra library.
    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    assert len(_all(load_capability(_spec(path="data.json"), tmp_path))) == 20
