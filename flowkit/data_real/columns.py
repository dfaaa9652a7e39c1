"""A :class:`~flowkit.data_real.tables.Table`'s columns as checked arrays: numbers, class
indices, or decoded 8-bit images.

Data are checked when the dataset is built, before any training step: a missing column,
a cell that is not a number, an empty or non-finite cell, an empty table, an image that
cannot be decoded or differs in size from the others all raise
:class:`~flowkit.data.DataError`, one line naming the file, the row and the column. Rows
are counted from 1; in a CSV file they are data rows after the header, and the file's
line number is given too (``t.csv data row 3 (line 4)``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import DataError
from .tables import Table, first_line

__all__ = ["check_finite", "class_indices", "decode_images", "is_numeric", "numbers", "numeric_matrix",
           "require_columns"]


def require_columns(table: Table, columns: Sequence[str], key: str) -> None:
    """Every one of ``columns`` is in the table; otherwise name the missing ones, the available
    ones and the recipe ``key`` to set."""
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        which = "one" if len(columns) == 1 else "some"
        raise DataError(f"{table.source}: {key}: no column{'s' * (len(missing) > 1)} "
                        f"{', '.join(map(repr, missing))}; available columns: "
                        f"{', '.join(map(str, table.frame.columns))} (set {key} to {which} of them)")


def numbers(table: Table, column: str, remedy: str) -> np.ndarray:
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


def is_numeric(table: Table, column: str) -> bool:
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


def check_finite(values: np.ndarray, columns: Sequence[str], row: Callable[[int], str]) -> None:
    """Every cell finite; otherwise name the first bad cell and count them all.

    Example:
        >>> check_finite(np.array([[1.0, np.nan]]), ["column 'a'", "column 'b'"],
        ...              lambda i: f"t.csv row {i + 1}")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        flowkit.data.DataError: t.csv row 1, column 'b': an empty or NaN cell (1 empty or non-finite cell in all, ...
    """
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    i, j = (int(k) for k in np.argwhere(bad)[0])
    what = "an empty or NaN" if np.isnan(values[i, j]) else f"an infinite ({values[i, j]})"
    n, rows = int(bad.sum()), int(bad.any(1).sum())
    raise DataError(f"{row(i)}, {columns[j]}: {what} cell ({n} empty or non-finite cell{'s' * (n > 1)} in all, in "
                    f"{rows} row{'s' * (rows > 1)}); fix or drop those rows (flowkit does not fill in missing values)")


def numeric_matrix(table: Table, columns: Sequence[str]) -> np.ndarray:
    """``[rows, columns]`` float64 of the chosen columns, every cell a finite number."""
    require_columns(table, columns, "data.column")
    remedy = "fix the cell, or leave the column out of data.column"
    values = np.stack([numbers(table, c, remedy) for c in columns], 1)
    check_finite(values, [f"column {c!r}" for c in columns], table.row)
    return values


def class_indices(table: Table, column: str) -> np.ndarray:
    """A column of class labels as int64, every cell a whole number ``>= 0``."""
    require_columns(table, [column], "data.label_column")
    values = numbers(table, column, "data.label_column needs class indices (whole numbers >= 0)")
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{table.row(i)}, column {column!r}: {table.frame[column].iloc[i]!r} is not a class "
                        "index; data.label_column needs whole numbers >= 0 in every row")
    return values.astype(np.int64)


# --------------------------------------------------------------------------- images

_TO_8_BIT = {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


def _image_where(table: Table, i: int, value: Any) -> str:
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
        raise DataError(f"{where}: cannot decode this image ({first_line(exc)}); replace or delete it") from None
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataError(f"{where}: a {img.mode} image (16-bit, 32-bit or float pixels), but flowkit models 8-bit "
                        "images with 256 levels; convert the images to 8-bit L or RGB")
    return np.asarray(img)


def _size(shape: tuple[int, ...]) -> str:
    channels = shape[2] if len(shape) == 3 else 1
    return f"{shape[1]}x{shape[0]} pixels with {channels} channel{'s' * (channels > 1)}"


def decode_images(table: Table, column: str, like: Optional[tuple[tuple[int, ...], str]] = None
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

