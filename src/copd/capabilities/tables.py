"""User datasets: .jsonl/.json/.parquet/.csv files and `datasets.load_dataset` sources,
read into Samples and split into train and test.

Every reader returns Samples built by a FieldMap and reports problems as one-line
CopdErrors naming the file (or dataset and split) and, where it can, the row: rows are
numbered from 1 in file order (a CSV header line is not a row), JSONL problems name the line.
Parquet, CSV and `dataset:` sources need the optional `datasets` library (copd[data]).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from copd.capabilities.capability import Sample, did_you_mean
from copd.capabilities.jsonl import read_jsonl, split_by_prompt
from copd.capabilities.rows import FieldMap
from copd.errors import CopdError

if TYPE_CHECKING:
    from copd.config.schema import CapabilityConfig

# Rows converted per Arrow batch: bounds memory without a Python call per row into Arrow.
BATCH_ROWS = 1024

Reader = Callable[[Path, FieldMap], list[Sample]]


def read_file(path: Path, fields: FieldMap) -> list[Sample]:
    """All samples of a data file, read by the reader registered for its suffix."""
    if not path.exists():
        raise CopdError(f"{path}: file not found")
    if not path.is_file():
        raise CopdError(f"{path}: not a file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise CopdError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(READERS)} (or use key 'dataset')"
        )
    samples = reader(path, fields)
    if not samples:
        raise CopdError(f"{path}: no samples (the file is empty)")
    return samples


def read_json(path: Path, fields: FieldMap) -> list[Sample]:
    """A JSON list of objects (rows numbered from 1) or JSON lines (read as .jsonl)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CopdError(f"{path}: not valid UTF-8") from None
    if not text.lstrip().startswith("["):
        _refuse_single_object(path, text)
        return read_jsonl(path, fields)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{exc.lineno}"
        raise CopdError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    samples = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        if not isinstance(row, dict):
            raise CopdError(f"{where}: expected a JSON object, got {type(row).__name__}")
        samples.append(fields.to_sample(row, where, path.parent))
    return samples


def _refuse_single_object(path: Path, text: str) -> None:
    # One pretty-printed object (say {"data": [...]}) would otherwise read as broken JSON lines.
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:5])
        raise CopdError(
            f"{path}: expected a list of objects or JSON lines, got one JSON object "
            f"(keys: {keys}); put the rows in a top-level list"
        )


def read_parquet(path: Path, fields: FieldMap) -> list[Sample]:
    table = _load(path, lambda ds: ds.load_dataset("parquet", data_files=str(path), split="train"))
    return table_samples(table, str(path), fields, path.parent)


def read_csv(path: Path, fields: FieldMap) -> list[Sample]:
    """CSV cells are read as text (so "2" stays "2"); an empty cell is an empty string."""

    def load(ds: Any) -> Any:
        features = ds.Features({name: ds.Value("string") for name in _csv_header(path)})
        return ds.load_dataset(
            "csv", data_files=str(path), split="train", features=features, keep_default_na=False
        )

    return table_samples(_load(path, load), str(path), fields, path.parent)


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        raise CopdError(f"{path}: not valid UTF-8") from None
    if not header:
        raise CopdError(f"{path}: no samples (the file is empty)")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise CopdError(f"{path}: duplicate column name(s) {', '.join(duplicates)}")
    return header


READERS: dict[str, Reader] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
    ".csv": read_csv,
}


def table_samples(table: Any, label: str, fields: FieldMap, base: Path | None) -> list[Sample]:
    """Samples of a `datasets.Dataset`; Arrow rows are read raw, so nothing is decoded."""
    fields.check_columns(table.column_names, label)
    samples = [fields.to_sample(row, f"{label}: row {n}", base) for n, row in _rows(table)]
    if not samples:
        raise CopdError(f"{label}: no samples (it has no rows)")
    return samples


def _rows(table: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    for batch in table.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def open_dataset(
    ref: str, config: str | None, base_dir: Path | None
) -> tuple[dict[str, Any], str, Path | None]:
    """The splits of a dataset folder or hub id, a label for errors, and its local folder."""
    local = resolve_path(ref, base_dir)
    if not local.exists():
        if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
            raise CopdError(f"{local}: dataset folder not found")
        try:
            loaded = _load(ref, lambda ds: ds.load_dataset(ref, name=config))
        except CopdError as exc:
            raise CopdError(f"{exc}; there is no local folder {local} either") from None
        return _as_splits(loaded), ref, None
    if not local.is_dir():
        raise CopdError(f"{local}: is a file, not a dataset folder; give a file with key 'path'")
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        if config is not None:
            raise CopdError(
                f"{local}: a folder written by save_to_disk has no configs; "
                f"remove key 'dataset_config' (got {config!r})"
            )
        return _as_splits(_load(local, lambda ds: ds.load_from_disk(str(local)))), str(local), local
    loaded = _load(local, lambda ds: ds.load_dataset(str(local), name=config))
    return _as_splits(loaded), str(local), local


def _as_splits(loaded: Any) -> dict[str, Any]:
    # A single saved Dataset has no split names: it is the training data.
    return dict(loaded) if isinstance(loaded, Mapping) else {"train": loaded}


def select_split(splits: Mapping[str, Any], split: str, label: str) -> Any:
    if split not in splits:
        raise CopdError(
            f"{label}: no split {split!r}{did_you_mean(split, splits)}; "
            f"splits: {', '.join(splits) or '(none)'}"
        )
    return splits[split]


def _load(source: Path | str, load: Callable[[Any], Any]) -> Any:
    """Run `load(datasets)`, turning a missing library or any failure into one CopdError."""
    try:
        import datasets
    except ImportError:
        raise CopdError(
            f"{source}: reading this source needs the datasets library: pip install copd[data]"
        ) from None
    try:
        return load(datasets)
    except CopdError:
        raise
    except Exception as exc:  # datasets, fsspec and pyarrow raise many unrelated types
        first = (str(exc).strip().splitlines() or [""])[0]
        first = first if len(first) <= 300 else first[:297] + "..."
        raise CopdError(f"{source}: cannot load it ({type(exc).__name__}: {first})") from None


Splits = tuple[list[Sample], list[Sample]]


def read_splits(cap: CapabilityConfig, fields: FieldMap, base_dir: Path | None) -> Splits:
    """(train, test) samples of a validated `path` or `dataset` capability.

    Every error is prefixed with the capability and the config key it concerns.
    """
    read = _file_splits if cap.path is not None else _dataset_splits
    return read(cap, fields, base_dir)


def _file_splits(cap: CapabilityConfig, fields: FieldMap, base_dir: Path | None) -> Splits:
    path = resolve_path(cap.path, base_dir)
    train = _step(cap.name, "path", lambda: read_file(path, fields))
    return _test_part(cap, fields, base_dir, train, str(path))


def _dataset_splits(cap: CapabilityConfig, fields: FieldMap, base_dir: Path | None) -> Splits:
    name = cap.name
    splits, label, folder = _step(name, "dataset", lambda: open_dataset(cap.dataset, cap.dataset_config, base_dir))

    def samples(key: str) -> list[Sample]:
        split = getattr(cap, key)
        table = _step(name, key, lambda: select_split(splits, split, label))
        where = f"{label} (split {split!r})"
        return _step(name, "dataset", lambda: table_samples(table, where, fields, folder))

    train = samples("split")
    if cap.test_split is not None:
        return train, samples("test_split")
    return _test_part(cap, fields, base_dir, train, label)


def _test_part(cap: CapabilityConfig, fields: FieldMap, base_dir: Path | None, train: list[Sample], label: str) -> Splits:
    """(train, test) from a test file when `test_path` is set, else a split by ratio."""
    if cap.test_path is not None:
        test_path = resolve_path(cap.test_path, base_dir)
        return train, _step(cap.name, "test_path", lambda: read_file(test_path, fields))
    return _step(cap.name, "test_ratio", lambda: split_by_prompt(train, cap.test_ratio, cap.split_seed, label))


def _step(name: str, key: str, run: Callable[[], Any]) -> Any:
    """run(), with any CopdError prefixed by the capability and the config key it concerns."""
    try:
        return run()
    except CopdError as exc:
        raise CopdError(f"capability {name!r}: key {key!r}: {exc}") from None


def resolve_path(path: str, base_dir: Path | None) -> Path:
    """`path` joined to `base_dir` (the config file's folder) unless it is absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p
