"""Contract tests over every registered dataset, and closed-form checks of the densities."""

from __future__ import annotations

import math

import pytest
import torch

from flowkit.components import DATASETS
import flowkit
from flowkit import gmm
from flowkit.data import Dataset, GaussianMixtureData, Standardized, get_dataset
from flowkit.registry import RegistryError

# generated datasets only: file-backed ones (digits, hf, MAF tables) have tests/test_data_real.py
NAMES = [n for n in DATASETS.names()
         if n not in {"digits", "hf", "power", "gas", "hepmass", "miniboone", "bsds300", "standardized"}]
BUILTIN = {"8gaussians", "checkerboard", "pinwheel", "2spirals", "moons", "circles", "swissroll",
           "rings", "olympic_rings", "concentric_rings", "sierpinski", "fractal_tree", "gmm"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_builtins_registered_with_help():
    assert BUILTIN <= set(NAMES)
    for name in BUILTIN:
        assert DATASETS.describe(name)


def test_unknown_name_lists_choices():
    with pytest.raises(RegistryError, match="did you mean 8gaussians"):
        get_dataset("8gaussian")


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    data = get_dataset(name)
    assert isinstance(data, Dataset)
    for x, labels in (data.train_batch(257, gen(0)), data.test_set(257)):
        assert x.shape == (257, *data.shape)
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert torch.isfinite(x).all()
        if data.num_classes is None:
            assert labels is None
        else:
            assert labels.shape == (257,) and labels.dtype == torch.long
            assert labels.min() >= 0 and labels.max() < data.num_classes
    log_p = data.log_prob(x)
    if log_p is not None:
        assert log_p.shape == (257,)
        assert torch.isfinite(log_p).all()  # samples lie in the support


@pytest.mark.parametrize("name", NAMES)
def test_reproducible(name):
    data = get_dataset(name)
    torch.manual_seed(0)
    a, la = data.test_set(100, seed=7)
    torch.manual_seed(1)  # the global RNG must not matter
    b, lb = data.test_set(100, seed=7)
    assert torch.equal(a, b)
    assert la is None or torch.equal(la, lb)
    assert not torch.equal(a, data.test_set(100, seed=8)[0])
    assert torch.equal(data.train_batch(100, gen(3))[0], data.train_batch(100, gen(3))[0])
    assert not torch.equal(data.train_batch(100, gen(3))[0], data.train_batch(100, gen(4))[0])


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bad_batch_size(n):
    with pytest.raises(ValueError):
        get_dataset("moons").train_batch(n, gen(0))


# --------------------------------------------------------------------------- densities


def test_8gaussians_entropy():
    data = get_dataset("8gaussians")
    x, _ = data.train_batch(200_000, gen(0))
    entropy = -data.log_prob(x.double()).mean().item()
    assert abs(entropy - 2.836) < 0.02


def test_8gaussians_log_prob_matches_torch_mixture():
    data = get_dataset("8gaussians")
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=torch.float64)),
        torch.distributions.Independent(
            torch.distributions.Normal(data.means.double(), 0.5 / 1.414), 1))
    x = torch.randn(50, 2, generator=gen(1), dtype=torch.float64) * 3
    torch.testing.assert_close(data.log_prob(x), mix.log_prob(x))


def test_checkerboard_support_and_density():
    data = get_dataset("checkerboard")
    x, _ = data.train_batch(20_000, gen(0))
    assert (x.abs() <= 4).all()
    cell = torch.floor(x / 2)
    assert (torch.remainder(cell.sum(-1), 2) == 0).all()
    torch.testing.assert_close(data.log_prob(x), torch.full((20_000,), -math.log(32.0)))
    # a light square and a point outside the board have zero density
    assert torch.isneginf(data.log_prob(torch.tensor([[1.0, -1.0], [5.0, 0.0]]))).all()
    # the density integrates to one: 1/32 on 8 squares of area 4
    grid = torch.linspace(-4.5, 4.5, 901, dtype=torch.float64)[:-1] + 0.005
    pts = torch.cartesian_prod(grid, grid)
    assert abs(data.log_prob(pts).exp().sum().item() * 0.01**2 - 1) < 1e-2


def test_gmm_integrates_to_one():
    data = GaussianMixtureData(dim=2, components=4, seed=0)
    assert data.means.shape == (4, 2) and data.covs.shape == (4, 2, 2) and data.weights.shape == (4,)
    spread = 8 * torch.linalg.eigvalsh(data.covs.double()).max().sqrt().item()
    lo = data.means.min().item() - spread
    hi = data.means.max().item() + spread
    grid = torch.linspace(lo, hi, 601, dtype=torch.float64)
    step = (grid[1] - grid[0]).item()
    total = data.log_prob(torch.cartesian_prod(grid, grid)).exp().sum().item() * step**2
    assert abs(total - 1) < 1e-2


def test_gmm_single_component_by_hand():
    data = GaussianMixtureData(dim=2, components=1, seed=3)
    (m1, m2), ((a, b), (c, d)) = data.means[0].double().tolist(), data.covs[0].double().tolist()
    x1, x2 = 0.3, -1.2
    det = a * d - b * c
    u, v = x1 - m1, x2 - m2
    quad = (d * u * u - (b + c) * u * v + a * v * v) / det
    expected = -0.5 * quad - math.log(2 * math.pi) - 0.5 * math.log(det)
    got = data.log_prob(torch.tensor([[x1, x2]], dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_gmm_options():
    data = get_dataset("gmm", dim=3, components=5, seed=1, mixing="random")
    assert data.shape == (3,) and data.num_classes == 5
    assert data.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(data.weights, torch.full((5,), 0.2))
    x, labels = data.train_batch(10, gen(0))
    assert x.shape == (10, 3) and labels.max() < 5
    assert torch.equal(get_dataset("gmm", seed=1).means, get_dataset("gmm", seed=1).means)
    assert not torch.equal(get_dataset("gmm", seed=1).means, get_dataset("gmm", seed=2).means)
    with pytest.raises(ValueError):
        get_dataset("gmm", mixing="dirichlet")


def test_gmm_dataset_is_one_closed_form_mixture():
    """One mixture class: the ``gmm`` dataset holds a :class:`flowkit.gmm.GaussianMixture`
    and samples and scores through it, so its draws are the mixture's draws."""
    assert flowkit.GaussianMixture is gmm.GaussianMixture
    assert getattr(flowkit.data, "GaussianMixture", gmm.GaussianMixture) is gmm.GaussianMixture
    data = get_dataset("gmm", dim=3, components=4, seed=2, mixing="random")
    assert isinstance(data, GaussianMixtureData) and isinstance(data.mixture, gmm.GaussianMixture)
    assert data.means is data.mixture.means and data.covs is data.mixture.covs
    x, labels = data.train_batch(64, gen(5))
    y, k = data.mixture.sample_components(64, gen(5))
    assert torch.equal(x, y) and torch.equal(labels, k)
    assert torch.equal(data.mixture.sample(64, gen(5)), x)
    torch.testing.assert_close(data.log_prob(x), data.mixture.log_prob(x))
    x64 = x.double()
    torch.testing.assert_close(data.log_prob(x64), data.mixture.to(torch.float64).log_prob(x64))
    assert data.log_prob(x64).dtype == torch.float64


# --------------------------------------------------------------------------- DiffFlow sets


@pytest.mark.parametrize("name", ["olympic_rings", "concentric_rings"])
def test_rings_near_support(name):
    data = get_dataset(name)
    x, _ = data.train_batch(20_000, gen(0))
    near = data.distance_to_support(x) <= 5 * data.radius_std
    assert near.float().mean().item() >= 0.99
    far = torch.tensor([[0.0, -2.5]])  # away from every Olympic ring and every concentric one
    assert data.distance_to_support(far).item() > 0.4


def test_olympic_rings_options():
    data = get_dataset("olympic_rings", radius=0.8, radius_std=0.05)
    x, labels = data.train_batch(5_000, gen(0))
    r = torch.linalg.vector_norm(x - data.centres[labels], dim=-1)
    assert r.mean().item() == pytest.approx(0.8, abs=0.01)
    assert r.std().item() == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError):
        get_dataset("olympic_rings", radius_std=-1.0)


def test_olympic_rings_official_layout():
    data = get_dataset("olympic_rings", layout="official")
    expected = torch.tensor([[-1.75, 0.75], [0.0, 0.75], [1.75, 0.75], [-1.05, -0.75], [1.05, -0.75]])
    assert torch.allclose(data.centres, expected)
    with pytest.raises(ValueError, match="layout"):
        get_dataset("olympic_rings", layout="paris")


def test_standardized_moves_each_coordinate_to_unit_scale_and_keeps_densities():
    inner = GaussianMixtureData(dim=2, components=3, seed=1)
    data = Standardized(inner, reference=50_000)
    y, labels = data.test_set(50_000, seed=7)
    assert y.mean(0).abs().max().item() < 0.03 and (y.std(0) - 1).abs().max().item() < 0.03
    x, labels_inner = inner.test_set(50_000, seed=7)
    assert torch.equal(labels, labels_inner)
    assert torch.allclose(data.original(y), x, atol=1e-5)
    # change of variables: log p_y(y) = log p_x(x) + Σ log s, and model_log_det adds −Σ log s back
    lp = data.log_prob(y[:100])
    assert torch.allclose(lp, inner.log_prob(x[:100]) + data.std.log().sum().float(), atol=1e-4)
    assert torch.allclose(lp + data.model_log_det(y[:100]), inner.log_prob(x[:100]), atol=1e-4)
    # training batches come from the caller's generator, test sets from their seed
    a, _ = data.train_batch(8, gen(3))
    b, _ = inner.train_batch(8, gen(3))
    assert torch.allclose(data.original(a), b, atol=1e-5)


def test_standardized_rings_answer_in_the_rings_units():
    data = DATASETS.build("standardized", data=get_dataset("olympic_rings", radius_std=0.0))
    y, _ = data.test_set(1000)
    assert data.distance_to_support(y).max().item() < 1e-5
    assert data.log_prob(y) is None  # the inner set has no closed-form density
    assert not hasattr(DATASETS.build("standardized", data=get_dataset("sierpinski")), "distance_to_support")
    with pytest.raises(ValueError, match="reference"):
        Standardized(get_dataset("olympic_rings"), reference=1)
    with pytest.raises(TypeError):
        Standardized("olympic_rings")


def test_sierpinski_avoids_removed_squares():
    x, _ = get_dataset("sierpinski", depth=1).train_batch(20_000, gen(0))
    assert (x.abs() <= 2).all()
    assert not ((x.abs() < 2 / 3 - 1e-6).all(-1)).any()
    # deeper carpets also avoid the central square and the level-2 holes around it
    data = get_dataset("sierpinski")
    x, _ = data.train_batch(20_000, gen(1))
    assert not ((x.abs() < 2 / 3 - 1e-6).all(-1)).any()
    hole = torch.tensor([-4 / 3, -4 / 3])  # centre of the bottom-left level-2 hole
    assert not (((x - hole).abs() < 2 / 9 - 1e-6).all(-1)).any()
    assert torch.isneginf(data.log_prob(torch.zeros(1, 2))).all()


def test_fractal_tree_structure():
    data = get_dataset("fractal_tree", noise=0.0)
    assert len(data.lengths) == 2**7 - 1
    x, _ = data.train_batch(5_000, gen(0))
    assert x[:, 1].min() >= -2 - 1e-5 and x[:, 1].max() <= 2 + 1e-5
    trunk = data.lengths[0].item()
    assert (data.lengths[1:3] / trunk).tolist() == pytest.approx([0.7, 0.7])
