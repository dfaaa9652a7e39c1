"""Real data: quantised images (built-in digits, HF ``datasets``, local folders/files) and
the FFJORD/MAF tabular density-estimation benchmark.

Quantised data with ``K`` levels are **uniformly dequantised** (Theis et al. 2016):
``x = (k + u) / K`` with ``u ~ U[0, 1)^D``, so ``x ∈ [0, 1)^D`` and ``log_scale = log K``;
a continuous density on ``x`` lower-bounds the discrete log-likelihood, reported as
``bpd = (nll_x + D log K) / (D ln 2)`` (:func:`flowkit.likelihood.bits_per_dim`). An optional
**logit transform** (Dinh et al. 2017) maps ``x`` to ``y = logit(λ + (1 − 2λ) x)``; its
log-determinant ``Σ log((1 − 2λ) / (s (1 − s)))`` with ``s = sigmoid(y)`` is added back
through :meth:`Dataset.model_log_det`, so bits/dim always refer to the original data.

**Dynamic binarisation** (``binarize: true``; Salakhutdinov & Murray 2008, the binarised-MNIST
protocol of the VAE literature — Burda et al. 2016, Grathwohl et al. 2019 Table 2): every
training batch draws ``x ~ Bernoulli(k / (K − 1))`` afresh from the pixel intensities, so the
model sees a new binary image each time; the test set is binarised once, from its seed. The
data are then discrete binary vectors (``log_scale = 0``): a model's NLL is in nats of a
discrete distribution and bits/dim are ``nll / (D ln 2)``. It excludes the logit transform
(declared as an argument rule, so ``flowkit check`` refuses the pair).

Everything here works offline from local files; a hub name fails at once when the hub is
unreachable, saying how to point the recipe at local files.

Data are checked when the dataset is built, before any training step: a missing column,
a cell that is not a number, an empty or non-finite cell, an empty table, an image that
cannot be decoded or differs in size from the others all raise
:class:`~flowkit.data.DataError`, one line naming the file, the row and the column. Rows
are counted from 1; in a CSV file they are data rows after the header, and the file's
line number is given too (``t.csv data row 3 (line 4)``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .components import DATASETS
from .constraints import PositiveInt, Range, Rule
from .data import DataError, Dataset, check_declared

__all__ = ["QuantisedImages", "Digits", "HFDataset", "TabularArrays", "DataUnavailable",
           "dequantise", "binarise", "binarize_excludes_logit", "logit_transform", "load_maf"]


class DataUnavailable(DataError):
    """Data named by a recipe cannot be loaded (missing file, offline hub)."""


#: a share of the data held out: strictly between 0 and 1
Fraction = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]
#: the logit transform's λ: in (0, 1/2), so that ``λ + (1 − 2λ) x`` stays inside (0, 1)
LogitAlpha = Annotated[float, Range(0, 0.5, lo_open=True, hi_open=True)]


#: declared by the image datasets: binarised images are not dequantised, so they take no logit transform
binarize_excludes_logit = Rule(
    ("binarize", "logit"), lambda a: not (a["binarize"] and a["logit"]),
    "binarised images are binary, and the logit transform needs continuous ones; set logit: false "
    "(or binarize: false for dequantised, continuous images)")


def binarise(k: Tensor, levels: int, generator: Optional[torch.Generator]) -> Tensor:
    """``x ~ Bernoulli(k / (levels − 1))`` per pixel (dynamic binarisation), drawn from ``generator``.

    Example:
        >>> x = binarise(torch.tensor([[0, 16, 8]]), 17, torch.Generator().manual_seed(0))
        >>> x[0, :2].tolist()  # intensity 0 is always 0, full intensity always 1
        [0.0, 1.0]
    """
    p = k.float() / (levels - 1)
    return torch.bernoulli(p, generator=generator)


def dequantise(k: Tensor, levels: int, generator: Optional[torch.Generator]) -> Tensor:
    """``(k + u) / levels`` with ``u ~ U[0, 1)`` drawn from ``generator``."""
    u = torch.rand(k.shape, generator=generator)
    return (k.float() + u) / levels


def logit_transform(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``y = logit(α + (1 − 2α) x)`` and ``log |det ∂y/∂x|`` per sample."""
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    return y, _logit_log_det(y, alpha)


def _logit_log_det(y: Tensor, alpha: float) -> Tensor:
    # dy/dx = (1 − 2α) / (s (1 − s)), s = sigmoid(y); log s(1−s) = −softplus(−y) − softplus(y)
    per = math.log(1 - 2 * alpha) + torch.nn.functional.softplus(-y) + torch.nn.functional.softplus(y)
    return per.flatten(1).sum(1)


class QuantisedImages(Dataset):
    """Images stored as integers in ``[0, levels)``, shape ``[N, C, H, W]``, with labels.

    ``train_batch`` draws images with replacement and fresh dequantisation noise — or, with
    ``binarize``, a fresh Bernoulli draw of every pixel — from the caller's generator (so a
    resumed run is identical); ``test_set`` takes the first ``n`` test images with noise (or the
    binarisation) from ``seed``.
    """

    discrete = True

    def __init__(self, train: Tensor, test: Tensor, levels: int, train_labels: Optional[Tensor] = None,
                 test_labels: Optional[Tensor] = None, logit: bool = False, alpha: float = 1e-6,
                 num_classes: Optional[int] = None, binarize: bool = False) -> None:
        if train.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(train.shape)}")
        if not isinstance(binarize, bool):
            raise DataError(f"data.binarize: expected true or false, got {binarize!r}")
        found = binarize_excludes_logit.check({"binarize": binarize, "logit": logit})
        if found is not None:
            raise DataError(f"data.{found[0]}: {found[1]}")
        self.train, self.test = train, test
        self.train_labels, self.test_labels = train_labels, test_labels
        self.levels = levels
        self.shape = tuple(train.shape[1:])
        self.log_scale = 0.0 if binarize else math.log(levels)
        self.logit, self.alpha = logit, alpha
        self.num_classes = num_classes
        self.binarize = binarize

    def _to_model(self, k: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        if self.binarize:
            return binarise(k, self.levels, generator)
        x = dequantise(k, self.levels, generator)
        return logit_transform(x, self.alpha)[0] if self.logit else x

    def train_batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        labels = self.train_labels[idx] if self.train_labels is not None else None
        return self._to_model(self.train[idx], generator), labels

    def test_set(self, n: int, seed: int = 1234):
        n = min(n, len(self.test))
        g = torch.Generator().manual_seed(seed)
        labels = self.test_labels[:n] if self.test_labels is not None else None
        return self._to_model(self.test[:n], g), labels

    def model_log_det(self, y: Tensor) -> Optional[Tensor]:
        return _logit_log_det(y, self.alpha) if self.logit else None

    def to_images(self, y: Tensor) -> Tensor:
        """Model-space samples back to ``[0, 1]`` images (for pictures)."""
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) if self.logit else y
        return x.clamp(0, 1)


@DATASETS.register("digits")
class Digits(QuantisedImages):
    """The 8×8 handwritten digits scikit-learn ships (1,797 images, 17 grey levels), offline.

    Args:
        test_fraction: share of images held out (a fixed split, seeded).
        logit: apply the logit transform (see module docstring).
        alpha: the logit transform's λ.
        binarize: dynamically binarised images (``Bernoulli(k / 16)`` drawn afresh for every
            batch) instead of dequantised ones: the data of a Bernoulli VAE decoder.
    """

    argument_rules = (binarize_excludes_logit,)

    @check_declared
    def __init__(self, test_fraction: Fraction = 0.2, logit: bool = False, alpha: LogitAlpha = 1e-6,
                 binarize: bool = False) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover
            raise DataUnavailable("data.name: digits needs scikit-learn (pip install scikit-learn)") from None
        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)  # [N, 1, 8, 8] in 0..16
        labels = torch.as_tensor(bunch.target, dtype=torch.long)
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        n_test = int(round(test_fraction * len(images)))
        if not 0 < n_test < len(images):
            raise DataError(f"data.test_fraction: {test_fraction} of {len(images)} images holds out {n_test}; "
                            "choose a fraction that leaves images on both sides")
        test, train = perm[:n_test], perm[n_test:]
        super().__init__(images[train], images[test], levels=17, train_labels=labels[train],
                         test_labels=labels[test], logit=logit, alpha=alpha, num_classes=10, binarize=binarize)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- tables: reading


@dataclass
class _Table:
    """One split as a data frame, with the file (or hub split) each run of its rows came from."""

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _holds_images(column: Any) -> bool:
    """A column of ``{bytes, path}`` records: how HF ``datasets`` stores images in parquet."""
    values = column.dropna()
    return len(values) > 0 and isinstance(values.iloc[0], dict) and {"bytes", "path"} <= set(values.iloc[0])


def _read_file(file: Path) -> _Table:
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
        raise DataError(f"{file}: data.path: cannot read it as {_TABLE_FORMATS[suffix]} ({_first_line(exc)}); "
                        "check the file or export it again") from None
    images = tuple(str(c) for c in frame.columns if _holds_images(frame[c]))
    names = _parquet_class_names(file) if suffix == ".parquet" else {}
    return _Table(frame, str(file), [(str(file), len(frame), suffix == ".csv")], images, names)


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


def _concat(tables: list[_Table], source: str) -> _Table:
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
    return _Table(frame, source, [part for t in tables for part in t.parts], first.image_columns)


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


def _hf_table(load: Callable[[], Any], source: str) -> _Table:
    """A HF ``datasets`` split as a table, images left encoded (decoded by :func:`_images`)."""
    import datasets

    ds = load()
    images = tuple(k for k, f in ds.features.items() if isinstance(f, datasets.Image))
    for k in images:
        ds = ds.cast_column(k, datasets.Image(decode=False))
    names = {k: list(f.names) for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return _Table(ds.to_pandas(), source, [(source, len(ds), False)], images, names)


def _load_splits(path: str, split: str, test_split: Optional[str]) -> tuple[_Table, Optional[_Table]]:
    """The training table and, when the data have one, the held-out table."""
    import datasets

    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() not in _TABLE_FORMATS:
            raise DataUnavailable(f"data.path: {local} is not a directory, parquet, CSV or JSON file")
        return _read_file(local), None
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
        train = _concat([_read_file(p) for p in train_files], str(local))
        test = _concat([_read_file(p) for p in test_files], str(local)) if test_files else None
        return train, test
    if not _hub_reachable():
        raise DataUnavailable(
            f"data.path: {path!r} is not a local path and the Hugging Face hub is unreachable (offline). "
            "Point the recipe at local files instead: data.path: /dir/of/images (an image folder, one "
            "sub-folder per class), /file.parquet or /file.csv; or download the dataset once with "
            "`datasets.load_dataset(...).save_to_disk(...)` / export to parquet on a machine with network.")
    return _hf_splits(lambda s: datasets.load_dataset(path, split=s), path, split, test_split)


def _hf_splits(load: Callable[[str], Any], source: str, split: str,
               test_split: Optional[str]) -> tuple[_Table, Optional[_Table]]:
    try:
        train = _hf_table(lambda: load(split), f"{source} split {split}")
    except Exception as exc:  # network, hub and builder errors come in many types
        raise DataUnavailable(f"data.path: could not load {source!r} split {split!r}: {_first_line(exc)}") from None
    test = None
    if test_split:
        try:
            test = _hf_table(lambda: load(test_split), f"{source} split {test_split}")
        except Exception:  # no such split: the last test_fraction of the training rows is held out
            test = None
    return train, test


# --------------------------------------------------------------------------- tables: checks


def _require_columns(table: _Table, columns: Sequence[str], key: str) -> None:
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        which = "one" if len(columns) == 1 else "some"
        raise DataError(f"{table.source}: {key}: no column{'s' * (len(missing) > 1)} "
                        f"{', '.join(map(repr, missing))}; available columns: "
                        f"{', '.join(map(str, table.frame.columns))} (set {key} to {which} of them)")


def _numbers(table: _Table, column: str, remedy: str) -> np.ndarray:
    """A column as float64, empty cells as NaN; a cell that is not a number is an error."""
    import pandas as pd

    series = table.frame[column]
    if series.dtype.kind in "iufb":
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.empty(len(series))
    for i, value in enumerate(series.tolist()):
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            out[i] = np.nan
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise DataError(f"{table.row(i)}, column {column!r}: {shown} is not a number; {remedy}") from None
    return out


def _is_numeric(table: _Table, column: str) -> bool:
    """For ``data.column: null``: numbers (a text column mixing in a few words counts, and
    its first word is then reported), not text, labels or images."""
    import pandas as pd

    series = table.frame[column]
    if series.dtype.kind in "iuf":
        return True
    if series.dtype.kind != "O" or column in table.image_columns:
        return False
    return bool(pd.to_numeric(series.map(lambda v: v if isinstance(v, (str, int, float)) else None),
                              errors="coerce").notna().any())


def _check_finite(values: np.ndarray, columns: Sequence[str], row: Callable[[int], str]) -> None:
    """Every cell finite; otherwise name the first bad cell and count them all."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    i, j = (int(k) for k in np.argwhere(bad)[0])
    what = "an empty or NaN" if np.isnan(values[i, j]) else f"an infinite ({values[i, j]})"
    n, rows = int(bad.sum()), int(bad.any(1).sum())
    raise DataError(f"{row(i)}, {columns[j]}: {what} cell ({n} empty or non-finite cell{'s' * (n > 1)} in all, in "
                    f"{rows} row{'s' * (rows > 1)}); fix or drop those rows (flowkit does not fill in missing values)")


def _numeric_matrix(table: _Table, columns: Sequence[str]) -> np.ndarray:
    """``[rows, columns]`` float64 of the chosen columns, every cell a finite number."""
    _require_columns(table, columns, "data.column")
    remedy = "fix the cell, or leave the column out of data.column"
    values = np.stack([_numbers(table, c, remedy) for c in columns], 1)
    _check_finite(values, [f"column {c!r}" for c in columns], table.row)
    return values


def _labels(table: _Table, column: str) -> np.ndarray:
    _require_columns(table, [column], "data.label_column")
    values = _numbers(table, column, "data.label_column needs class indices (whole numbers >= 0)")
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{table.row(i)}, column {column!r}: {table.frame[column].iloc[i]!r} is not a class "
                        "index; data.label_column needs whole numbers >= 0 in every row")
    return values.astype(np.int64)


# --------------------------------------------------------------------------- images

_TO_8_BIT = {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


def _image_where(table: _Table, i: int, value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    if path and Path(path).is_file():
        return str(path)
    return table.row(i) + (f" ({path})" if path else "")


def _decode(value: Any, where: str) -> np.ndarray:
    """One encoded image (``{bytes, path}``) as an 8-bit ``[H, W]`` or ``[H, W, C]`` array."""
    from PIL import Image

    if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
        raise DataError(f"{where}: no image in this cell; fill it in or drop the row")
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    try:
        with Image.open(source) as opened:
            opened.load()
            target = _TO_8_BIT.get(opened.mode)
            if opened.mode == "P":  # palette indices are not intensities: use the colours
                target = "RGBA" if "transparency" in opened.info else "RGB"
            img = opened.convert(target) if target else opened.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's decoding errors
        raise DataError(f"{where}: cannot decode this image ({_first_line(exc)}); replace or delete it") from None
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataError(f"{where}: a {img.mode} image (16-bit, 32-bit or float pixels), but flowkit models 8-bit "
                        "images with 256 levels; convert the images to 8-bit L or RGB")
    return np.asarray(img)


def _size(shape: tuple[int, ...]) -> str:
    channels = shape[2] if len(shape) == 3 else 1
    return f"{shape[1]}x{shape[0]} pixels with {channels} channel{'s' * (channels > 1)}"


def _images(table: _Table, column: str, like: Optional[tuple[tuple[int, ...], str]] = None
            ) -> tuple[Tensor, tuple[tuple[int, ...], str]]:
    """Decode a column into uint8 ``[N, C, H, W]``; every image must decode and share one size
    and channel count (that of ``like``, or of the first image). Returns the size too."""
    shape, first = like if like else (None, "")
    arrays, problems = [], []
    for i, value in enumerate(table.frame[column].tolist()):
        where = _image_where(table, i, value)
        try:
            arr = _decode(value, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if shape is None:
            shape, first = arr.shape, where
        if arr.shape != shape:
            problems.append(f"{where}: the image is {_size(arr.shape)}, expected {_size(shape)} like {first}; "
                            "resize or convert the images to one size and mode")
            continue
        arrays.append(arr)
    if problems:
        more = f" ({len(problems)} of {len(table)} images have a problem)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    x = torch.as_tensor(np.stack(arrays))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.to(torch.uint8).contiguous(), (shape, first)


def _guess_kind(table: _Table, column: Optional[Union[str, list[str]]]) -> str:
    """``image`` when the named column (or, with none named, any column) holds images."""
    if isinstance(column, str):
        _require_columns(table, [column], "data.column")
        return "image" if column in table.image_columns else "tabular"
    return "image" if column is None and table.image_columns else "tabular"


def _image_column(table: _Table, column: Optional[Union[str, list[str]]]) -> str:
    if isinstance(column, list):
        raise DataError(f"{table.source}: data.column: images come from one column; give its name, not a list")
    if column is None:
        if not table.image_columns:
            raise DataError(f"{table.source}: data.kind: image, but no column holds images (columns: "
                            f"{', '.join(map(str, table.frame.columns))}); set data.kind: tabular")
        return table.image_columns[0]
    _require_columns(table, [column], "data.column")
    if column not in table.image_columns:
        raise DataError(f"{table.source}: data.column: column {column!r} holds no images (image columns: "
                        f"{', '.join(table.image_columns) or 'none'})")
    return column


def _table_columns(table: _Table, column: Optional[Union[str, list[str]]], label_column: Optional[str]) -> list[str]:
    """The columns named by ``data.column``, or every numeric column but the labels."""
    if column is not None:
        return [column] if isinstance(column, str) else list(column)
    cols = [c for c in table.frame.columns if c != label_column and _is_numeric(table, c)]
    if not cols:
        raise DataError(f"{table.source}: data.column: no numeric column (columns: "
                        f"{', '.join(map(str, table.frame.columns))}); list the columns to use in data.column")
    return cols


def _scaled(table: _Table, cols: list[str], x: np.ndarray, x_test: np.ndarray,
            standardise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Standardised with the training mean and std (in float64), or checked to fit float32."""
    if standardise:
        if len(x) < 2:
            raise DataError(f"{table.source}: data.standardise: one training row has no standard deviation; "
                            "add rows or set data.standardise: false")
        mu, sd = x.mean(0), np.maximum(x.std(0, ddof=1), 1e-8)
        return (x - mu) / sd, (x_test - mu) / sd
    for part, where in ((x, table.row), (x_test, lambda i: f"{table.source} (held-out rows)")):
        big = np.abs(part) > np.finfo(np.float32).max
        if big.any():
            i, j = (int(k) for k in np.argwhere(big)[0])
            raise DataError(f"{where(i)}, column {cols[j]!r}: {part[i, j]:g} is beyond float32's range; "
                            "rescale the column or set data.standardise: true")
    return x, x_test


# --------------------------------------------------------------------------- HF / local files


@DATASETS.register("hf")
class HFDataset(Dataset):
    """Images or tables through HF ``datasets``: a hub name, an image folder, parquet, CSV or JSON.

    A folder of tables is read file by file in sorted order; files named for ``split`` and
    ``test_split`` (``train.csv``, ``test/part-0.parquet``) form those splits, and with no
    file so named every file is training data. A folder holding images is an image folder
    (one sub-folder per class; ``train`` / ``test`` sub-folders for splits).

    Args:
        path: hub dataset name (``mnist``, ``cifar10``) or a local directory / file.
        split, test_split: the training and held-out splits; where the data have no
            ``test_split`` (a single file), the last ``test_fraction`` of rows is held out.
        column: the image column, or the list of numeric columns of a table (None: every
            numeric column).
        label_column: optional class-label column (used as the condition).
        kind: ``image`` or ``tabular`` (``auto`` looks at the column's type).
        logit, alpha: logit transform of images.
        binarize: dynamically binarised images (a fresh ``Bernoulli(k / 255)`` draw per batch;
            images only, not with ``logit``), e.g. binarised MNIST for a Bernoulli VAE decoder.
        standardise: tables are standardised with the training mean and std.
        test_fraction: share of rows held out where the data have no test split.
        limit: keep at most this many training rows (quick experiments).

    Raises:
        flowkit.data.DataError: for unusable data (missing column, non-numeric, empty or
            non-finite cell, empty table, undecodable or odd-sized image), naming the file,
            row and column.
    """

    argument_rules = (binarize_excludes_logit,)

    @check_declared
    def __init__(self, path: str, split: str = "train", test_split: Optional[str] = "test",
                 column: Optional[Union[str, list[str]]] = None, label_column: Optional[str] = None,
                 kind: Literal["auto", "image", "tabular"] = "auto", logit: bool = False,
                 alpha: LogitAlpha = 1e-6, standardise: bool = True, test_fraction: Fraction = 0.1,
                 limit: Optional[PositiveInt] = None, binarize: bool = False) -> None:
        if isinstance(column, list) and (not column or not all(isinstance(c, str) for c in column)):
            raise DataError(f"data.column: expected a column name or a non-empty list of names, got {column!r}")
        if test_split is not None and test_split == split:
            raise DataError(f"data.test_split: {test_split!r} is also data.split; the held-out data must differ "
                            "from the training data (set another split, or null to hold out data.test_fraction)")
        train, test = _load_splits(path, split, test_split)
        for table in (train, test):
            if table is not None and len(table) == 0:
                header = " (only a header line)" if any(h for _, _, h in table.parts) else ""
                raise DataError(f"{table.source}: data.path: no data rows{header}; add rows or point data.path "
                                "at the data")
        self.kind = _guess_kind(train, column) if kind == "auto" else kind
        if binarize and self.kind != "image":
            raise DataError(f"{train.source}: data.binarize: binarisation is for images, but the data are a "
                            "table (data.kind: tabular); remove data.binarize")
        if self.kind == "image":
            col = _image_column(train, column)
            x, size = _images(train, col)
            x_test = _images(test, col, like=size)[0] if test is not None else None
        else:
            cols = _table_columns(train, column, label_column)
            x = _numeric_matrix(train, cols)
            x_test = _numeric_matrix(test, cols) if test is not None else None
        y = _labels(train, label_column) if label_column else None
        y_test = _labels(test, label_column) if label_column and test is not None else None
        if test is None:  # hold out the last rows
            n_test = max(1, int(len(x) * test_fraction))
            if len(x) - n_test < 1:
                raise DataError(f"{train.source}: data.test_fraction: {len(x)} row{'s' * (len(x) > 1)}, and "
                                f"holding out {n_test} leaves none to train on; add rows or lower data.test_fraction")
            x, x_test = x[:-n_test], x[-n_test:]
            y, y_test = (y[:-n_test], y[-n_test:]) if y is not None else (None, None)
        if limit:
            x, y = x[:limit], (y[:limit] if y is not None else None)
        self.num_classes = None
        if label_column:
            names = train.class_names.get(label_column)
            self.num_classes = len(names) if names else int(max(y.max(), y_test.max())) + 1
        labels = (None if y is None else torch.as_tensor(y), None if y_test is None else torch.as_tensor(y_test))
        if self.kind == "image":
            self._images = QuantisedImages(x, x_test, 256, labels[0], labels[1], logit, alpha, self.num_classes,
                                           binarize=binarize)
            self.shape, self.discrete, self.log_scale = self._images.shape, True, self._images.log_scale
            return
        self._images = None
        x, x_test = _scaled(train, cols, x, x_test, standardise)
        self.train = torch.as_tensor(x, dtype=torch.float32)
        self.test = torch.as_tensor(x_test, dtype=torch.float32)
        self.train_labels, self.test_labels = labels
        self.shape = (len(cols),)

    def train_batch(self, n: int, generator: torch.Generator):
        if self._images is not None:
            return self._images.train_batch(n, generator)
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        return self.train[idx], (self.train_labels[idx] if self.train_labels is not None else None)

    def test_set(self, n: int, seed: int = 1234):
        if self._images is not None:
            return self._images.test_set(n, seed)
        return self.test[:n], (self.test_labels[:n] if self.test_labels is not None else None)

    def model_log_det(self, y: Tensor) -> Optional[Tensor]:
        return self._images.model_log_det(y) if self._images is not None else None


# --------------------------------------------------------------------------- tabular (MAF)

MAF_FILES = {
    "power": "power/data.npy",
    "gas": "gas/ethylene_CO.pickle",
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": "miniboone/data.npy",
    "bsds300": "BSDS300/BSDS300.hdf5",
}


def _need(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise DataUnavailable(f"data.root: missing file {path} (the standard MAF preprocessed "
                              f"files, Papamakarios et al. 2017, go under {root})")
    return path


_REDOWNLOAD = "use the standard MAF preprocessed file"
#: MAF's split needs int(0.1 n) >= 1 test rows and then int(0.1 (n − n_test)) >= 1 validation rows
_MAF_MIN_ROWS = 11


def _checked_array(data: Any, where: str, columns: Optional[int] = None) -> np.ndarray:
    """A 2-D array of finite numbers (with ``columns`` columns, when given)."""
    data = np.asarray(data)
    if data.ndim != 2 or data.dtype.kind not in "iuf" or (columns is not None and data.shape[1] != columns):
        want = f" with {columns} columns" if columns else ""
        raise DataError(f"{where}: data.root: expected a 2-D array of numbers{want}, found shape {data.shape} of "
                        f"{data.dtype}; {_REDOWNLOAD}")
    _check_finite(data, [f"column {j + 1}" for j in range(data.shape[1])], lambda i: f"{where} row {i + 1}")
    return data


def _load_npy(path: Path, columns: Optional[int] = None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: data.root: cannot read this .npy file ({_first_line(exc)}); {_REDOWNLOAD}") from None
    return _checked_array(data, str(path), columns)


def _table_values(table: _Table) -> np.ndarray:
    """Every column of a MAF table as finite float64."""
    if not len(table.frame.columns):
        raise DataError(f"{table.source}: data.root: the table has no columns; {_REDOWNLOAD}")
    values = np.stack([_numbers(table, c, _REDOWNLOAD) for c in table.frame.columns], 1)
    _check_finite(values, [f"column {c!r}" for c in table.frame.columns], table.row)
    return values


def _repeat_filter(data: np.ndarray, where: str) -> list[int]:
    """MAF drops features with any value repeated more than 5 times."""
    keep = [j for j in range(data.shape[1]) if np.unique(data[:, j], return_counts=True)[1].max() <= 5]
    if not keep:
        raise DataError(f"{where}: data.root: every column repeats a value more than 5 times, so MAF's filter "
                        f"leaves no feature; {_REDOWNLOAD}")
    return keep


def _split_normalise(data: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF's split: last 10 % test, then last 10 % of the rest validation; normalise
    with the mean and std of train + validation."""
    if data.shape[0] < _MAF_MIN_ROWS:
        raise DataError(f"{where}: data.root: {data.shape[0]} rows; MAF's split (10 % test, then 10 % "
                        f"validation) needs at least {_MAF_MIN_ROWS}; {_REDOWNLOAD}")
    n_test = int(0.1 * data.shape[0])
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * rest.shape[0])
    val, train = rest[-n_val:], rest[:-n_val]
    both = np.vstack([train, val])
    mu, sd = both.mean(0), both.std(0)
    sd[sd == 0] = 1.0
    return (train - mu) / sd, (val - mu) / sd, (test - mu) / sd


def _power(root: Path):
    rng = np.random.RandomState(42)
    path = _need(root, MAF_FILES["power"])
    data = _load_npy(path, columns=8).astype(np.float64)  # 8 raw columns − 2 = 6
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage, gap = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1)
    noise = np.hstack([gap, voltage, rng.rand(n, 3), np.zeros((n, 1))])
    return _split_normalise(data + noise, str(path))


def _gas(root: Path):
    import pandas as pd

    path = _need(root, MAF_FILES["gas"])
    try:
        frame = pd.read_pickle(path)  # the benchmark's own format; unpickling can run code: trusted files only
    except Exception as exc:  # unpickling raises many types
        raise DataError(f"{path}: data.root: cannot read this pickle ({_first_line(exc)}); {_REDOWNLOAD}") from None
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: data.root: holds a {type(frame).__name__}, not a table; {_REDOWNLOAD}")
    frame = frame.drop(columns=[c for c in ("Meth", "Eth", "Time") if c in frame.columns]).reset_index(drop=True)
    values = _table_values(_Table(frame, str(path), [(str(path), len(frame), False)]))
    frame = pd.DataFrame(values, columns=frame.columns)
    while True:  # drop features correlated above 0.98, one at a time
        corr = frame.corr().to_numpy()
        upper = (np.abs(corr) > 0.98).sum(1) > 1
        if not upper.any():
            break
        frame = frame.drop(columns=frame.columns[int(np.argmax(upper))])
    return _split_normalise(frame.to_numpy(dtype=np.float64), str(path))


def _hepmass(root: Path):
    signal = []
    for rel in MAF_FILES["hepmass"]:
        table = _read_file(_need(root, rel))
        values = _table_values(table)
        rows = values[values[:, 0] == 1, 1:]  # the first column is the label; MAF keeps the signal (1)
        if not len(rows):
            raise DataError(f"{table.source}: data.root: no row has label 1 in column {table.frame.columns[0]!r}, "
                            f"so no signal event is left; {_REDOWNLOAD}")
        signal.append(rows)
    train, test = signal
    test = test[:, :-1] if test.shape[1] == train.shape[1] + 1 else test  # trailing "mass" column
    where = str(root / MAF_FILES["hepmass"][0])
    if test.shape[1] != train.shape[1]:
        raise DataError(f"{root / MAF_FILES['hepmass'][1]}: data.root: {test.shape[1]} features, the training file "
                        f"has {train.shape[1]}; {_REDOWNLOAD}")
    if len(train) < _MAF_MIN_ROWS:
        raise DataError(f"{where}: data.root: {len(train)} signal rows; MAF's 10 % validation split needs at least "
                        f"{_MAF_MIN_ROWS}; {_REDOWNLOAD}")
    mu, sd = train.mean(0), train.std(0)
    sd[sd == 0] = 1.0
    train, test = (train - mu) / sd, (test - mu) / sd
    keep = _repeat_filter(train, where)
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * train.shape[0])
    return train[:-n_val], train[-n_val:], test


def _miniboone(root: Path):
    path = _need(root, MAF_FILES["miniboone"])
    data = _load_npy(path)
    return _split_normalise(data[:, _repeat_filter(data, str(path))], str(path))


def _bsds300(root: Path):
    try:
        import h5py
    except ImportError:
        raise DataUnavailable("data.name: bsds300 needs h5py (pip install h5py)") from None
    path = _need(root, MAF_FILES["bsds300"])
    try:
        with h5py.File(path, "r") as fh:
            parts = [_checked_array(fh[k][()], f"{path} [{k}]") for k in ("train", "validation", "test")]
    except (KeyError, OSError) as exc:
        raise DataError(f"{path}: data.root: cannot read the train, validation and test arrays "
                        f"({_first_line(exc)}); {_REDOWNLOAD}") from None
    if len({p.shape[1] for p in parts}) > 1 or min(len(p) for p in parts) < 1:
        raise DataError(f"{path}: data.root: train, validation and test shapes {[p.shape for p in parts]} do not "
                        f"fit together; {_REDOWNLOAD}")
    return tuple(parts)


_MAF_LOADERS = {"power": _power, "gas": _gas, "hepmass": _hepmass, "miniboone": _miniboone, "bsds300": _bsds300}


def load_maf(name: str, root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) arrays of a MAF tabular benchmark from ``root``.

    Raises:
        flowkit.data.DataError: for a missing, unreadable or malformed file, naming it (and the
            row and column of a non-numeric or non-finite value).
    """
    if name not in _MAF_LOADERS:
        raise DataError(f"data.name: {name!r} is not a MAF benchmark; choose one of {', '.join(_MAF_LOADERS)}")
    return _MAF_LOADERS[name](Path(root).expanduser())


class TabularArrays(Dataset):
    """Continuous vectors held in memory; batches drawn with replacement."""

    def __init__(self, train: np.ndarray, test: np.ndarray) -> None:
        self.train = torch.as_tensor(np.asarray(train, dtype=np.float32))
        self.test = torch.as_tensor(np.asarray(test, dtype=np.float32))
        self.shape = (self.train.shape[1],)

    def train_batch(self, n: int, generator: torch.Generator):
        return self.train[torch.randint(0, len(self.train), (n,), generator=generator)], None

    def test_set(self, n: int, seed: int = 1234):
        return self.test[:n], None


def _register_maf(name: str, dim: int) -> None:
    @check_declared
    def __init__(self, root: str, split: Literal["test", "validation"] = "test") -> None:
        train, val, test = load_maf(name, root)
        TabularArrays.__init__(self, train, test if split == "test" else val)

    cls = type(f"MAF_{name}", (TabularArrays,), {
        "__init__": __init__,
        "__doc__": f"{name.upper()} ({dim}-D) from the MAF/FFJORD tabular benchmark; files under ``root``.",
    })
    DATASETS.register(name)(cls)


for _name, _dim in (("power", 6), ("gas", 8), ("hepmass", 21), ("miniboone", 43), ("bsds300", 63)):
    _register_maf(_name, _dim)
