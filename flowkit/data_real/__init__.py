"""Real data: quantised images (built-in digits, HF ``datasets``, local folders/files) and
the FFJORD/MAF tabular density-estimation benchmark.

Importing the package registers the datasets ``digits``, ``hf``, ``power``, ``gas``,
``hepmass``, ``miniboone`` and ``bsds300``. One module a job:

- :mod:`~flowkit.data_real.images`: quantised images — uniform dequantisation, the logit
  transform, dynamic binarisation (the math and its bits/dim) — and the ``digits`` dataset;
- :mod:`~flowkit.data_real.tables`: one split read as a table from a CSV, parquet or JSON
  file, a folder, or the Hugging Face hub;
- :mod:`~flowkit.data_real.columns`: a table's columns as checked numbers, class indices or images;
- :mod:`~flowkit.data_real.hf`: the ``hf`` dataset built from those;
- :mod:`~flowkit.data_real.maf`: the MAF tabular benchmark and its preprocessing.

Everything here works offline from local files; a hub name fails at once when the hub is
unreachable, saying how to point the recipe at local files. Data are checked when the dataset
is built, before any training step: every problem is a :class:`~flowkit.data.DataError`, one
line naming the file, the row and the column.
"""

from .images import Digits, QuantisedImages, binarise, binarize_excludes_logit, dequantise, logit_transform
from .tables import DataUnavailable
from .hf import HFDataset
from .maf import TabularArrays, load_maf

__all__ = ["QuantisedImages", "Digits", "HFDataset", "TabularArrays", "DataUnavailable",
           "dequantise", "binarise", "binarize_excludes_logit", "logit_transform", "load_maf"]
