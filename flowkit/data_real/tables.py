"""Reading one split of the data as a :class:`Table`: a CSV, parquet or JSON (lines) file, a
folder of such files or of images, or a Hugging Face hub dataset.

Local files need no network. A hub name fails at once when the hub is unreachable (or
``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is ``1``), saying how to point the recipe at
local files. Any problem reading a file is a :class:`~flowkit.data.DataError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..data import DataError

__all__ = ["DataUnavailable", "Table", "first_line", "load_splits", "read_file"]


class DataUnavailable(DataError):
    """Data named by a recipe cannot be loaded (missing file, offline hub)."""


@dataclass
class Table:
    """One split as a data frame, with the file (or hub split) each run of its rows came from.

    Example:
        >>> Table(frame=None, source="t.csv", parts=[("t.csv", 5, True)]).row(2)
        't.csv data row 3 (line 4)'
    """

    frame: Any  # pandas.DataFrame
    source: str  # the file, folder or hub name, for messages
    parts: list[tuple[str, int, bool]]  # (file, number of rows, whether it has a header line)
    image_columns: tuple[str, ...] = ()
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    def row(self, i: int) -> str:
        """Where the 0-based row ``i`` is: ``t.csv data row 3 (line 4)``, ``t.parquet row 3``."""
        for name, n, header in self.parts:
            if i < n:
                return f"{name} data row {i + 1} (line {i + 2})" if header else f"{name} row {i + 1}"
            i -= n
        return f"{self.source} row {i + 1}"  # pragma: no cover - parts cover every row


_TABLE_FORMATS = {".csv": "CSV", ".parquet": "parquet", ".json": "JSON", ".jsonl": "JSON"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors.

    Example:
        >>> first_line(ValueError("bad cell\\nat byte 12"))
        'bad cell'
    """
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _holds_images(column: Any) -> bool:
    """A column of ``{bytes, path}`` records: how HF ``datasets`` stores images in parquet."""
    values = column.dropna()
    return len(values) > 0 and isinstance(values.iloc[0], dict) and {"bytes", "path"} <= set(values.iloc[0])


def read_file(file: Path) -> Table:
    """A CSV, parquet or JSON (lines) file as a table; any reading problem is a :class:`DataError`."""
    import pandas as pd

    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":  # index_col=False: never take the first column as a row index
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(file, index_col=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(file)
        else:
            with open(file, "rb") as fh:
                records = fh.read(4096).lstrip().startswith(b"[")
            frame = pd.read_json(file, lines=suffix == ".jsonl" or not records)
    except pd.errors.EmptyDataError:
        raise DataError(f"{file}: data.path: the file is empty; it needs a header line and data rows") from None
    except pd.errors.ParserWarning:
        raise DataError(f"{file}: data.path: rows hold more fields than the header line names; "
                        "add the missing column names to the header") from None
    except (ValueError, OSError) as exc:  # parser, arrow and decoding errors are ValueError / OSError
        raise DataError(f"{file}: data.path: cannot read it as {_TABLE_FORMATS[suffix]} ({first_line(exc)}); "
                        "check the file or export it again") from None
    images = tuple(str(c) for c in frame.columns if _holds_images(frame[c]))
    names = _parquet_class_names(file) if suffix == ".parquet" else {}
    return Table(frame, str(file), [(str(file), len(frame), suffix == ".csv")], images, names)


def _parquet_class_names(file: Path) -> dict[str, list[str]]:
    """Class names of ``ClassLabel`` columns that HF ``datasets`` records in a parquet schema."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(file).metadata or {}
    try:
        features = json.loads(meta.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except ValueError:  # not HF metadata: no names
        return {}
    return {k: list(f["names"]) for k, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and "names" in f}


def _concat(tables: list[Table], source: str) -> Table:
    import pandas as pd

    first = tables[0]
    for table in tables[1:]:
        if list(table.frame.columns) != list(first.frame.columns):
            raise DataError(f"{table.source}: data.path: its columns ({', '.join(map(str, table.frame.columns))}) "
                            f"differ from {first.source}'s ({', '.join(map(str, first.frame.columns))}); "
                            "every file of a folder needs the same columns")
    if len(tables) == 1:
        return first
    frame = pd.concat([t.frame for t in tables], ignore_index=True)
    return Table(frame, source, [part for t in tables for part in t.parts], first.image_columns,
                 first.class_names)


def _split_files(root: Path, files: list[Path], split: str,
                 test_split: Optional[str]) -> tuple[list[Path], list[Path]]:
    """Files named for ``split`` / ``test_split`` (a word of the relative path, e.g.
    ``train.csv``, ``test/part-0.parquet``); with none so named, every file is training data."""

    def words(p: Path) -> set[str]:
        return set(re.split(r"[\W_]+", str(p.relative_to(root).with_suffix("")).lower()))

    test = [p for p in files if test_split and test_split.lower() in words(p)]
    train = [p for p in files if p not in test and split.lower() in words(p)]
    if not test and not train:
        return files, []
    if not train:
        raise DataError(f"{root}: data.split: no file is named for split {split!r} (files: "
                        f"{', '.join(str(p.relative_to(root)) for p in files)}); rename the training files or "
                        "set data.split")
    rest = [p for p in files if p not in test and p not in train]
    if rest:
        raise DataError(f"{root}: data.path: {rest[0].relative_to(root)} is named for neither split {split!r} nor "
                        f"{test_split!r}; rename or move it, or set data.split / data.test_split")
    return train, test


def _hf_table(load: Callable[[], Any], source: str) -> Table:
    """A HF ``datasets`` split as a table, images left encoded (decoded by
    :func:`flowkit.data_real.columns.decode_images`)."""
    import datasets

    ds = load()
    images = tuple(k for k, f in ds.features.items() if isinstance(f, datasets.Image))
    for k in images:
        ds = ds.cast_column(k, datasets.Image(decode=False))
    names = {k: list(f.names) for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return Table(ds.to_pandas(), source, [(source, len(ds), False)], images, names)


def load_splits(path: str, split: str, test_split: Optional[str]) -> tuple[Table, Optional[Table]]:
    """The training table and, when the data have one, the held-out table."""
    import datasets

    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() not in _TABLE_FORMATS:
            raise DataUnavailable(f"data.path: {local} is not a directory, parquet, CSV or JSON file")
        return read_file(local), None
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(local).parts))
        if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in files):
            return _hf_splits(lambda s: datasets.load_dataset("imagefolder", data_dir=str(local), split=s),
                              str(local), split, test_split)
        tables = [p for p in files if p.suffix.lower() in _TABLE_FORMATS]
        if not tables:
            raise DataUnavailable(f"data.path: {local} holds no images and no .csv, .parquet or .json files")
        formats = sorted({_TABLE_FORMATS[p.suffix.lower()] for p in tables})
        if len(formats) > 1:
            raise DataError(f"{local}: data.path: the folder mixes {' and '.join(formats)} files; keep one format")
        train_files, test_files = _split_files(local, tables, split, test_split)
        train = _concat([read_file(p) for p in train_files], str(local))
        test = _concat([read_file(p) for p in test_files], str(local)) if test_files else None
        return train, test
    if not _hub_reachable():
        raise DataUnavailable(
            f"data.path: {path!r} is not a local path and the Hugging Face hub is unreachable (offline). "
            "Point the recipe at local files instead: data.path: /dir/of/images (an image folder, one "
            "sub-folder per class), /file.parquet or /file.csv; or download the dataset once with "
            "`datasets.load_dataset(...).save_to_disk(...)` / export to parquet on a machine with network.")
    return _hf_splits(lambda s: datasets.load_dataset(path, split=s), path, split, test_split)


def _hf_splits(load: Callable[[str], Any], source: str, split: str,
               test_split: Optional[str]) -> tuple[Table, Optional[Table]]:
    try:
        train = _hf_table(lambda: load(split), f"{source} split {split}")
    except Exception as exc:  # network, hub and builder errors come in many types
        raise DataUnavailable(f"data.path: could not load {source!r} split {split!r}: {first_line(exc)}") from None
    test = None
    if test_split:
        try:
            test = _hf_table(lambda: load(test_split), f"{source} split {test_split}")
        except Exception:  # no such split: the last test_fraction of the training rows is held out
            test = None
    return train, test


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within ``timeout`` seconds (never, when HF's offline variables are 1)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False
