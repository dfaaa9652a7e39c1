"""The ``hf`` dataset: images or tables through HF ``datasets`` — a hub name, an image folder,
or local parquet, CSV or JSON files — read by :mod:`~flowkit.data_real.tables`, checked by
:mod:`~flowkit.data_real.columns`, and served as quantised images or standardised vectors.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..components import DATASETS
from ..constraints import PositiveInt
from ..data import DataError, Dataset, check_declared
from .columns import class_indices, decode_images, is_numeric, numeric_matrix, require_columns
from .images import Fraction, LogitAlpha, QuantisedImages, binarize_excludes_logit
from .tables import Table, load_splits

__all__ = ["HFDataset"]



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
        train, test = load_splits(path, split, test_split)
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
            x, size = decode_images(train, col)
            x_test = decode_images(test, col, like=size)[0] if test is not None else None
        else:
            cols = _table_columns(train, column, label_column)
            x = numeric_matrix(train, cols)
            x_test = numeric_matrix(test, cols) if test is not None else None
        y = class_indices(train, label_column) if label_column else None
        y_test = class_indices(test, label_column) if label_column and test is not None else None
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



# --------------------------------------------------------------------------- choosing columns


def _guess_kind(table: Table, column: Optional[Union[str, list[str]]]) -> str:
    """``image`` when the named column (or, with none named, any column) holds images."""
    if isinstance(column, str):
        require_columns(table, [column], "data.column")
        return "image" if column in table.image_columns else "tabular"
    return "image" if column is None and table.image_columns else "tabular"


def _image_column(table: Table, column: Optional[Union[str, list[str]]]) -> str:
    if isinstance(column, list):
        raise DataError(f"{table.source}: data.column: images come from one column; give its name, not a list")
    if column is None:
        if not table.image_columns:
            raise DataError(f"{table.source}: data.kind: image, but no column holds images (columns: "
                            f"{', '.join(map(str, table.frame.columns))}); set data.kind: tabular")
        return table.image_columns[0]
    require_columns(table, [column], "data.column")
    if column not in table.image_columns:
        raise DataError(f"{table.source}: data.column: column {column!r} holds no images (image columns: "
                        f"{', '.join(table.image_columns) or 'none'})")
    return column


def _table_columns(table: Table, column: Optional[Union[str, list[str]]], label_column: Optional[str]) -> list[str]:
    """The columns named by ``data.column``, or every numeric column but the labels."""
    if column is not None:
        return [column] if isinstance(column, str) else list(column)
    cols = [c for c in table.frame.columns if c != label_column and is_numeric(table, c)]
    if not cols:
        raise DataError(f"{table.source}: data.column: no numeric column (columns: "
                        f"{', '.join(map(str, table.frame.columns))}); list the columns to use in data.column")
    return cols


def _scaled(table: Table, cols: list[str], x: np.ndarray, x_test: np.ndarray,
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
