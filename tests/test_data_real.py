"""Real-data loaders on local synthetic files; dequantisation and bits/dim arithmetic."""

import math
import pickle

import numpy as np
import pytest
import torch

import flowkit
from flowkit.data import DataError
from flowkit.data_real import DataUnavailable, HFDataset, dequantise, load_maf, logit_transform
from flowkit.likelihood import bits_per_dim


def test_dequantise_stays_in_bins():
    k = torch.randint(0, 256, (1000, 3))
    x = dequantise(k, 256, torch.Generator().manual_seed(0))
    assert ((x * 256).floor() == k.float()).all() and x.min() >= 0 and x.max() < 1


def test_bits_per_dim_hand_computed():
    # a uniform density on [0,1)^D gives nll_x = 0; with 256 levels that is exactly 8 bits/dim
    assert bits_per_dim(0.0, 784, math.log(256)) == pytest.approx(8.0)
    # D = 2, nll = 2 ln 2 nats on the rescaled data, 4 levels: (2 ln2 + 2 ln4) / (2 ln2) = 3
    assert bits_per_dim(2 * math.log(2), 2, math.log(4)) == pytest.approx(3.0)


def test_logit_log_det_matches_autograd(float64):
    x = torch.rand(4, 3) * 0.98 + 0.01
    y, logdet = logit_transform(x, 1e-6)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v[None], 1e-6)[0][0], x[i])
        assert logdet[i].item() == pytest.approx(torch.logdet(jac).item(), rel=1e-9)


def test_digits_builtin_offline():
    d = flowkit.DATASETS.build("digits")
    x, y = d.train_batch(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 8, 8) and d.num_classes == 10 and y.max() < 10
    assert d.discrete and d.log_scale == pytest.approx(math.log(17))
    xt, _ = d.test_set(10_000)
    assert xt.shape[0] == 359  # 20 % of 1,797
    a, _ = d.test_set(5, seed=3)
    b, _ = d.test_set(5, seed=3)
    assert torch.equal(a, b)


def test_hf_local_csv_parquet_and_missing(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=50), "b": rng.normal(size=50), "label": rng.integers(0, 3, 50)})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        d = HFDataset(str(tmp_path / name), column=["a", "b"], label_column="label")
        x, y = d.train_batch(8, torch.Generator().manual_seed(0))
        assert x.shape == (8, 2) and d.shape == (2,) and y is not None
        assert d.test_set(100)[0].shape == (5, 2)  # last 10 % held out
    with pytest.raises(DataError, match="no column"):
        HFDataset(str(tmp_path / "t.csv"), column=["zzz"])


def test_hf_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                arr = np.random.default_rng(i).integers(0, 256, (6, 6), dtype=np.uint8)
                Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    d = HFDataset(str(tmp_path), label_column="label")
    x, y = d.train_batch(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 6, 6) and d.discrete and d.num_classes == 2
    assert d.log_scale == pytest.approx(math.log(256))


def test_hub_name_offline_fails_at_once_with_advice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as err:
        HFDataset("some-user/not-a-local-path")
    assert "unreachable" in str(err.value) and "local" in str(err.value)


def _write_maf(root):
    rng = np.random.default_rng(0)
    (root / "power").mkdir()
    np.save(root / "power/data.npy", rng.normal(size=(200, 8)))
    (root / "miniboone").mkdir()
    np.save(root / "miniboone/data.npy", rng.normal(size=(200, 43)))
    import pandas as pd

    (root / "gas").mkdir()
    gas = pd.DataFrame(rng.normal(size=(200, 11)), columns=["Meth", "Eth", "Time"] + [f"s{i}" for i in range(8)])
    gas["s7"] = gas["s6"] * 2.0  # perfectly correlated: must be dropped
    gas.to_pickle(root / "gas/ethylene_CO.pickle")
    (root / "hepmass").mkdir()
    cols = ["# label"] + [f"f{i}" for i in range(27)] + ["mass"]
    for name, n in (("1000_train.csv", 300), ("1000_test.csv", 100)):
        table = rng.normal(size=(n, 29))
        table[:, 0] = rng.integers(0, 2, n)
        pd.DataFrame(table, columns=cols).to_csv(root / "hepmass" / name, index=False)


def test_maf_loaders_on_synthetic_files(tmp_path):
    pytest.importorskip("pandas")
    _write_maf(tmp_path)
    train, val, test = load_maf("power", tmp_path)
    assert train.shape[1] == 6 and len(test) == 20 and len(val) == 18
    assert abs(np.vstack([train, val]).mean()) < 1e-6  # normalised with train + validation
    train, _, _ = load_maf("gas", tmp_path)
    assert train.shape[1] == 7  # Meth, Eth, Time dropped; one of the correlated pair dropped
    train, _, test = load_maf("hepmass", tmp_path)
    assert train.shape[1] == test.shape[1] and train.shape[1] <= 28
    train, _, _ = load_maf("miniboone", tmp_path)
    assert train.shape[1] == 43
    d = flowkit.DATASETS.build("power", root=str(tmp_path))
    assert d.train_batch(4, torch.Generator())[0].shape == (4, 6)


def test_maf_missing_file_named(tmp_path):
    for name, rel in (("power", "power/data.npy"), ("miniboone", "miniboone/data.npy")):
        with pytest.raises(DataUnavailable, match=rel):
            flowkit.DATASETS.build(name, root=str(tmp_path))


def test_digits_bits_per_dim_through_evaluate():
    # a flow that is the identity with a uniform "prior" on [0,1)^64 would score 0 nats, i.e.
    # log2(17) bits/dim; check the arithmetic path of evaluate_nll with an exact Gaussian instead
    from flowkit.config import EvalConfig
    from flowkit.flow import Flow, StandardNormal

    d = flowkit.DATASETS.build("digits")
    x, _ = d.test_set(50)
    flow = Flow(velocity=lambda t, x, cond=None: torch.zeros_like(x), prior=StandardNormal(d.shape))
    res = flowkit.evaluate_nll(flow, x, EvalConfig(method="euler", steps=1), log_scale=d.log_scale,
                               discrete=True)
    expected = -StandardNormal(d.shape).log_prob(x).mean().item()
    assert res["nll"] == pytest.approx(expected, rel=1e-6)
    assert res["bpd"] == pytest.approx((expected + 64 * math.log(17)) / (64 * math.log(2)), rel=1e-6)
