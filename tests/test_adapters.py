"""Adapters from diffusers / EDM / score_sde models to flowkit, against a Gaussian mixture's exact score.

Each test wraps the *exact* marginal score of a mixture the way the foreign code base's network
would output it (ε at a fractional DDPM timestep, ``D(x, σ)``, score_sde's ε at label ``999 t``,
…). The wrapped model is defined through the foreign convention only (the timestep, ``σ``, the
label), so if an adapter maps time or the prediction wrongly the score it hands the solver is
that of another time or another quantity and the likelihood misses the mixture's closed form.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import exact_mixture

from flowkit.adapters import (AdapterError, DDPMPath, ddpm_betas, from_diffusers, from_edm, from_score_sde,
                              load_diffusers, to_score)
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.likelihood import flow_log_likelihood
from flowkit.paths import VE, VP, SubVP

F64 = torch.float64
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def make_mixture(dim: int, seed: int = 0) -> GaussianMixture:
    """Three separated components with full covariances (as tests/test_diffusion_likelihood.py)."""
    return exact_mixture(dim, (0.25, 0.45, 0.3), seed=seed, spread=2.5, cov_scale=0.6, cov_floor=0.15)


def blurred(gmm: GaussianMixture, sigma: float) -> GaussianMixture:
    """``gmm`` convolved with ``N(0, σ² I)`` — written out, not through any flowkit path."""
    eye = torch.eye(gmm.dim, dtype=F64)
    return GaussianMixture(gmm.means, gmm.covs + sigma**2 * eye, gmm.weights)


def same_value(v: torch.Tensor) -> float:
    """A solve calls the model with one time for the whole batch: return it."""
    assert v.dim() == 1 and bool((v == v[0]).all())
    return float(v[0])


# ------------------------------------------------------------------------ DDPM schedules
def reference_alphas_cumprod(schedule: str, n: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """ᾱ_n = Π (1 − β_i) from the published formulas, in float64 (independent of the adapter)."""
    if schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=F64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=F64) ** 2
    elif schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, β capped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=F64)
    else:
        betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=F64)) * (end - start) + start
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_path_is_exact_at_every_timestep(schedule: str):
    path = DDPMPath.from_config({"num_train_timesteps": 1000, "beta_schedule": schedule})
    n = torch.arange(1000, dtype=F64)
    t = (n + 1) / 1000
    torch.testing.assert_close(path.timestep(t), n, rtol=0, atol=1e-9)
    # float32 betas (as the scheduler stores them) vs the float64 formula: float32 rounding only
    torch.testing.assert_close(path.alpha(t) ** 2, reference_alphas_cumprod(schedule), rtol=2e-5, atol=1e-9)
    # and bit-for-bit what the path was built from
    torch.testing.assert_close(path.alpha(t) ** 2, path.alphas_cumprod, rtol=1e-13, atol=0)
    fine = torch.linspace(1e-4, 1, 20001, dtype=F64)
    torch.testing.assert_close(path.alpha(fine) ** 2 + path.sigma(fine) ** 2, torch.ones_like(fine))
    assert bool((path.beta(fine) > 0).all())  # monotone interpolation: a valid forward SDE between steps
    # the schedule's derivatives are those of α and σ (central differences)
    h = 1e-7
    torch.testing.assert_close(path.d_alpha(fine[1:-1]), (path.alpha(fine[1:-1] + h) - path.alpha(fine[1:-1] - h)) / (2 * h),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path.d_sigma(fine[10:-1]), (path.sigma(fine[10:-1] + h) - path.sigma(fine[10:-1] - h)) / (2 * h),
                               rtol=1e-4, atol=1e-5)
    assert path.t0 == pytest.approx(1e-3) and path.t1 == 1.0


def test_ddpm_path_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for schedule in SCHEDULES:
        sched = diffusers.DDPMScheduler(beta_schedule=schedule)
        path = DDPMPath.from_config(sched.config)
        t = (torch.arange(1000, dtype=F64) + 1) / 1000
        torch.testing.assert_close(path.alpha(t) ** 2, sched.alphas_cumprod.to(F64), rtol=1e-12, atol=0)


def test_ddpm_config_errors_are_named():
    with pytest.raises(AdapterError, match="rescale_betas_zero_snr"):
        from_diffusers(lambda x, t: x, {"rescale_betas_zero_snr": True}, (2,))
    with pytest.raises(AdapterError, match="beta_schedule"):
        from_diffusers(lambda x, t: x, {"beta_schedule": "cosine_typo"}, (2,))
    with pytest.raises(AdapterError, match="prediction_type"):
        from_diffusers(lambda x, t: x, {"prediction_type": "flow"}, (2,))
    with pytest.raises(AdapterError, match="shape"):
        from_diffusers(lambda x, t: x, {}, None)
    assert ddpm_betas(10).dtype == torch.float32


# ------------------------------------------------------------------ diffusers ε / v / x0
class MixtureUNet(torch.nn.Module):
    """A diffusers-like model of the mixture: ``forward(sample, timestep).sample`` at fractional
    timesteps τ, the exact prediction at ``t = (τ + 1)/N`` on the interpolated schedule."""

    def __init__(self, gmm: GaussianMixture, path: DDPMPath, prediction_type: str) -> None:
        super().__init__()
        self.score = mixture_score_field(gmm, path)
        self.path, self.prediction_type = path, prediction_type
        self.timesteps: list[float] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        self.timesteps.append(same_value(timestep))
        t = (timestep + 1) / self.path.num_train_timesteps
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        eps = -s * self.score(t, sample)
        x0 = (sample - s * eps) / a
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[self.prediction_type]
        return SimpleNamespace(sample=out)


def ddpm_flow(gmm: GaussianMixture, schedule: str, prediction_type: str):
    cfg = {"num_train_timesteps": 1000, "beta_schedule": schedule, "prediction_type": prediction_type}
    path = DDPMPath.from_config(cfg)
    unet = MixtureUNet(gmm, path, prediction_type)
    return from_diffusers(unet, cfg, (gmm.dim,), prior=gmm.marginal(path, 1.0)), path, unet


# the cosine schedule's last timestep has β = 0.999 (a continuous rate of ~7e3): at 1e-5 dopri5's
# own error there is 2e-3 nats (the continuous VP path errs 7.5e-4 at 1e-5), so it is solved at 1e-6
@pytest.mark.parametrize("schedule, tol", [("linear", 1e-5), ("squaredcos_cap_v2", 1e-6)])
def test_diffusers_eps_model_gives_mixture_density_2d(schedule: str, tol: float):
    gmm = make_mixture(2)
    flow, path, unet = ddpm_flow(gmm, schedule, "epsilon")
    start = gmm.marginal(path, path.t0)
    x = start.sample(16, torch.Generator().manual_seed(1))
    out = flow_log_likelihood(flow, x, rtol=tol, atol=tol)
    err = (out.log_prob - start.log_prob(x)).abs().max().item()
    assert err < 1e-3, err
    assert min(unet.timesteps) >= 0.0 - 1e-9 and max(unet.timesteps) <= 999 + 1e-9


def test_diffusers_eps_model_gives_mixture_density_8d():
    gmm = make_mixture(8, seed=5)
    flow, path, _ = ddpm_flow(gmm, "linear", "epsilon")
    start = gmm.marginal(path, path.t0)
    x = start.sample(8, torch.Generator().manual_seed(2))
    out = flow_log_likelihood(flow, x, rtol=1e-5, atol=1e-5)
    err = (out.log_prob - start.log_prob(x)).abs().max().item()
    assert err < 1e-2, err


def test_diffusers_model_is_fed_the_discrete_timestep_at_grid_times():
    gmm = make_mixture(2)
    flow, path, unet = ddpm_flow(gmm, "linear", "epsilon")
    x = gmm.sample(3, torch.Generator().manual_seed(0))
    for n in (0, 1, 499, 999):
        unet.timesteps.clear()
        t = torch.tensor((n + 1) / 1000, dtype=F64)
        flow.score(t, x)
        assert unet.timesteps == [pytest.approx(n, abs=1e-9)]
        torch.testing.assert_close(flow.score(t, x), mixture_score_field(gmm, path)(t, x))
    assert flow.t0 == pytest.approx(1e-3) and flow.t1 == 1.0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_agree_with_eps(prediction_type: str):
    gmm = make_mixture(2)
    eps_flow, path, _ = ddpm_flow(gmm, "linear", prediction_type="epsilon")
    other, _, _ = ddpm_flow(gmm, "linear", prediction_type)
    x = gmm.sample(16, torch.Generator().manual_seed(3))
    for t in (path.t0, 0.013, 0.5, 0.97, 1.0):
        t = torch.tensor(t, dtype=F64)
        torch.testing.assert_close(other.velocity(t, x), eps_flow.velocity(t, x), rtol=1e-9, atol=1e-9)
    start = gmm.marginal(path, path.t0)
    x = start.sample(8, torch.Generator().manual_seed(7))
    err = (flow_log_likelihood(other, x, rtol=1e-5, atol=1e-5).log_prob - start.log_prob(x)).abs().max().item()
    assert err < 1e-3, err


def test_v_prediction_conversion_closed_form():
    """``v = α ε − σ x₀`` (Salimans & Ho 2022) on a non-variance-preserving path too (VE, α = 1)."""
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    for path in (VP(), VE(), SubVP()):
        t = torch.full((5,), 0.3, dtype=F64)
        a, sig = path.alpha(t)[:, None], path.sigma(t)[:, None]
        eps, x0 = -sig * s, (x + sig**2 * s) / a
        torch.testing.assert_close(to_score(a * eps - sig * x0, "v", path, t, x), s)
        torch.testing.assert_close(to_score(x0, "x0", path, t, x), s)
    with pytest.raises(AdapterError, match="prediction"):
        to_score(s, "noise", VP(), t, x)


# ----------------------------------------------------------------------------- EDM
def mixture_denoiser(gmm: GaussianMixture):
    """``D(x, σ) = x + σ² ∇ log (p ⋆ N(0, σ²))(x)`` (Tweedie), from σ alone."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = same_value(sigma)
        return x + s**2 * blurred(gmm, s).score(x)

    return denoise


@pytest.mark.parametrize("dim, n, tol", [(2, 32, 1e-3), (8, 8, 1e-2)])
def test_edm_denoiser_gives_mixture_density(dim: int, n: int, tol: float):
    gmm = make_mixture(dim, seed=0 if dim == 2 else 5)
    sigma_min, sigma_max = 0.002, 80.0
    flow = from_edm(mixture_denoiser(gmm), (dim,), sigma_min=sigma_min, sigma_max=sigma_max,
                    prior=blurred(gmm, sigma_max))
    start = blurred(gmm, sigma_min)
    x = start.sample(n, torch.Generator().manual_seed(4))
    out = flow_log_likelihood(flow, x, rtol=1e-5, atol=1e-5)
    err = (out.log_prob - start.log_prob(x)).abs().max().item()
    assert err < tol, err


def test_edm_rejects_bad_sigmas():
    with pytest.raises(AdapterError, match="sigma_min"):
        from_edm(lambda x, s: x, (2,), sigma_min=1.0, sigma_max=0.5)


# ------------------------------------------------------------------------ score_sde
def vp_std(t: float, beta_min: float = 0.1, beta_max: float = 20.0, sub: bool = False) -> float:
    """score_sde's ``marginal_prob`` std of the VP (or sub-VP) SDE, written out."""
    b = beta_min * t + 0.5 * (beta_max - beta_min) * t * t
    return 1 - math.exp(-b) if sub else math.sqrt(1 - math.exp(-b))


def vp_mean_scale(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> float:
    return math.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t * t))


def marginal(gmm: GaussianMixture, a: float, s: float) -> GaussianMixture:
    eye = torch.eye(gmm.dim, dtype=F64)
    return GaussianMixture(a * gmm.means, a * a * gmm.covs + s * s * eye, gmm.weights)


def score_sde_vp_net(gmm: GaussianMixture, label_scale: float, sub: bool = False):
    """A VP network as score_sde trains it: input label ``scale · t``, output ε̂ = −std · score."""

    def net(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = same_value(labels) / label_scale
        s = vp_std(t, sub=sub)
        return -s * marginal(gmm, vp_mean_scale(t), s).score(x)

    return net


def score_sde_ve_net(gmm: GaussianMixture):
    """A continuous VE network (NCSN++): label σ, output the score of the σ-blurred data."""
    return lambda x, labels: blurred(gmm, same_value(labels)).score(x)


@pytest.mark.parametrize("kind", ["vp", "subvp", "vp_ddpm", "ve"])
def test_score_sde_model_gives_mixture_density_2d(kind: str):
    gmm = make_mixture(2)
    if kind == "ve":
        sde = VE(sigma_min=0.01, sigma_max=50.0)
        flow = from_score_sde(score_sde_ve_net(gmm), sde, (2,), prior=blurred(gmm, 50.0))
        start = blurred(gmm, 0.01)
    else:
        sde = SubVP() if kind == "subvp" else VP()
        # continuous: label 999 t; DDPM-trained with N = 1000 scales: (N − 1) t, the same here
        net = score_sde_vp_net(gmm, 999.0, sub=kind == "subvp")
        flow = from_score_sde(net, sde, (2,), continuous=kind != "vp_ddpm", num_scales=1000,
                              prior=gmm.marginal(sde, sde.t1))
        start = marginal(gmm, vp_mean_scale(sde.t0), vp_std(sde.t0, sub=kind == "subvp"))
    x = start.sample(32, torch.Generator().manual_seed(5))
    out = flow_log_likelihood(flow, x, rtol=1e-5, atol=1e-5)
    err = (out.log_prob - start.log_prob(x)).abs().max().item()
    assert err < 1e-3, err


def test_score_sde_vp_8d_and_label_convention():
    gmm = make_mixture(8, seed=5)
    sde = VP()
    seen: list[float] = []
    inner = score_sde_vp_net(gmm, 999.0)

    def net(x, labels):
        seen.append(same_value(labels))
        return inner(x, labels)

    flow = from_score_sde(net, sde, (8,), prior=gmm.marginal(sde, sde.t1))
    start = gmm.marginal(sde, sde.t0)
    x = start.sample(8, torch.Generator().manual_seed(6))
    err = (flow_log_likelihood(flow, x, rtol=1e-5, atol=1e-5).log_prob - start.log_prob(x)).abs().max().item()
    assert err < 1e-2, err
    seen.clear()
    flow.score(torch.tensor(0.5, dtype=F64), x)
    assert seen == [pytest.approx(499.5)]
    # a DDPM-trained network with N = 100 scales gets (N − 1) t
    seen.clear()
    from_score_sde(net, sde, (8,), continuous=False, num_scales=100).score(torch.tensor(0.5, dtype=F64), x)
    assert seen == [pytest.approx(49.5)]


def test_score_sde_refuses_what_it_cannot_evaluate():
    with pytest.raises(AdapterError, match="discrete noise levels"):
        from_score_sde(lambda x, l: x, VE(), (2,), continuous=False)
    with pytest.raises(AdapterError, match="VP, SubVP or VE"):
        from_score_sde(lambda x, l: x, DDPMPath.from_config({}), (2,))


# ------------------------------------------------------------------ real diffusers model
def tiny_unet(diffusers):
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def test_random_diffusers_unet_on_digits_loads_from_a_local_dir_and_gives_finite_bpd(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowkit.data_real import Digits
    from flowkit.dequantise import Quantisation, discrete_log_likelihood

    torch.manual_seed(0)
    unet = tiny_unet(diffusers)
    unet.save_pretrained(tmp_path)
    diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction").save_pretrained(tmp_path)
    flow = load_diffusers(tmp_path, dtype=F64)
    assert flow.prior.shape == (1, 8, 8) and isinstance(flow.path, DDPMPath)
    # the loaded weights are the saved ones: same prediction as the model in memory
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    tau = torch.full((2,), 123.25, dtype=F64)
    unet = unet.to(F64).eval()
    with torch.no_grad():
        expect = to_score(unet(x, tau).sample, "v", flow.path, flow.path.time(tau), x)  # v_prediction
    torch.testing.assert_close(flow.score(flow.path.time(tau[0]), x), expect)

    k = Digits().test[:2].long()  # [2, 1, 8, 8] in 0..16
    out = discrete_log_likelihood(flow, k, Quantisation.centred(17, -1.0, 1.0), estimator="hutchinson",
                                  draws=2, generator=torch.Generator().manual_seed(0), rtol=1e-3, atol=1e-3)
    summary = out.summary()
    assert math.isfinite(summary.bpd) and math.isfinite(summary.se) and summary.se_noise is not None
    assert bool(torch.isfinite(out.values).all()) and out.z.shape == (2, 1, 8, 8)


def test_load_diffusers_errors_are_one_line(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    with pytest.raises(AdapterError, match="local directory"):
        load_diffusers("google/ddpm-cifar10-32")
    with pytest.raises(AdapterError, match="config.json"):
        load_diffusers(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(AdapterError, match=r"pip install flowkit\[diffusers\]"):
        load_diffusers(tmp_path)


def test_core_does_not_import_diffusers():
    """diffusers is optional: no flowkit module imports it at module level (only inside functions)."""
    import ast
    from pathlib import Path

    import flowkit

    offenders = []
    for file in Path(flowkit.__file__).parent.rglob("*.py"):
        for node in ast.parse(file.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "diffusers" or n.startswith("diffusers.") for n in names):
                offenders.append(f"{file.name}:{node.lineno}")
    assert offenders == []


class GaussianDenoiser(torch.nn.Module):
    """``D(x, σ) = x / (1 + σ²)``: the denoiser of N(0, I) data (TorchScript-able)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x / (1 + sigma[:, None] ** 2)


def test_load_model_from_a_torchscript_directory(tmp_path):
    import json
    from flowkit.adapters import load_model
    from flowkit.flow import StandardNormal

    torch.jit.save(torch.jit.script(GaussianDenoiser()), str(tmp_path / "model.pt"))
    (tmp_path / "adapter.json").write_text(json.dumps({"shape": [2], "sigma_min": 0.002, "sigma_max": 80.0}))
    flow = load_model(tmp_path, "edm", dtype=F64)
    x = torch.randn(4, 2, dtype=F64)
    ref = StandardNormal((2,), (1 + 0.002**2) ** 0.5).log_prob(x)
    assert (flow_log_likelihood(flow, x).log_prob - ref).abs().max().item() < 1e-3
    (tmp_path / "adapter.json").write_text(json.dumps({"shape": [2], "sigma_mn": 0.1}))
    with pytest.raises(AdapterError, match="sigma_mn"):
        load_model(tmp_path, "edm")
    with pytest.raises(AdapterError, match="choose one of diffusers, edm, score_sde"):
        load_model(tmp_path, "kdiff")
    (tmp_path / "model.pt").unlink()
    with pytest.raises(AdapterError, match="model.pt"):
        load_model(tmp_path, "score_sde")
