"""The FFJORD/MAF tabular density-estimation benchmark: ``power`` (6-D), ``gas`` (8-D),
``hepmass`` (21-D), ``miniboone`` (43-D) and ``bsds300`` (63-D), read from the standard MAF
preprocessed files (Papamakarios et al. 2017) under ``data.root`` and preprocessed as MAF does
(feature filters, the 10 % test / 10 % validation split, normalisation).

A missing, unreadable or malformed file is a :class:`~flowkit.data.DataError` naming it (and
the row and column of a non-numeric or non-finite value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from ..components import DATASETS
from ..data import DataError, Dataset, check_declared
from .columns import check_finite, numbers
from .tables import DataUnavailable, Table, first_line, read_file

__all__ = ["MAF_FILES", "TabularArrays", "load_maf"]


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
    check_finite(data, [f"column {j + 1}" for j in range(data.shape[1])], lambda i: f"{where} row {i + 1}")
    return data


def _load_npy(path: Path, columns: Optional[int] = None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: data.root: cannot read this .npy file ({first_line(exc)}); {_REDOWNLOAD}") from None
    return _checked_array(data, str(path), columns)


def _table_values(table: Table) -> np.ndarray:
    """Every column of a MAF table as finite float64."""
    if not len(table.frame.columns):
        raise DataError(f"{table.source}: data.root: the table has no columns; {_REDOWNLOAD}")
    values = np.stack([numbers(table, c, _REDOWNLOAD) for c in table.frame.columns], 1)
    check_finite(values, [f"column {c!r}" for c in table.frame.columns], table.row)
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
        raise DataError(f"{path}: data.root: cannot read this pickle ({first_line(exc)}); {_REDOWNLOAD}") from None
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: data.root: holds a {type(frame).__name__}, not a table; {_REDOWNLOAD}")
    frame = frame.drop(columns=[c for c in ("Meth", "Eth", "Time") if c in frame.columns]).reset_index(drop=True)
    values = _table_values(Table(frame, str(path), [(str(path), len(frame), False)]))
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
        table = read_file(_need(root, rel))
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
                        f"({first_line(exc)}); {_REDOWNLOAD}") from None
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
