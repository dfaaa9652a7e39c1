"""The VAE objective and its posteriors against closed forms (linear-Gaussian model), change of
variables by autograd Jacobians, dynamic binarisation, and refused settings.

The linear-Gaussian model ``p(z) = N(0, I)``, ``p(x | z) = N(Wz + b, σ² I)`` has
``p(x) = N(b, WWᵀ + σ² I)`` and the exact posterior ``N(Σ Wᵀ(x − b)/σ², Σ)`` with precision
``Λ = Σ⁻¹ = I + WᵀW/σ²``. The best mean-field (diagonal) Gaussian has precision ``diag Λ`` and
leaves the gap ``log p(x) − ELBO = ½ (Σ_i log Λ_ii − log det Λ)`` for every ``x``.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.data import DataError
from flowkit.data_real import binarise
from flowkit.flow import FieldError
from flowkit.objectives.vae import VAE  # registers "vae" (import it directly: see flowkit/objectives/__init__.py)
from flowkit.posteriors import POSTERIORS
from flowkit.recipe import RecipeError
from flowkit.registry import RegistryError

SIGMA = 0.5
B_ALL = torch.tensor([0.1, -0.2, 0.3, 0.05])


def _b(W: torch.Tensor) -> torch.Tensor:
    """The decoder bias ``b`` for ``W``'s data dimension."""
    return B_ALL[:W.shape[0]].to(W)


def _linear_gaussian(W: torch.Tensor, posterior=None) -> VAE:
    """A VAE whose decoder is exactly ``N(Wz + b, σ² I)`` (a linear decoder, fixed σ) and whose
    encoder is the identity (``h = x``), so a linear posterior head can be the exact one."""
    d, latent = W.shape
    vae = VAE(None, (d,), latent=latent, encoder=[], decoder=[], likelihood="gaussian", decoder_std=SIGMA,
              posterior=posterior)
    with torch.no_grad():
        vae.decoder[0].weight.copy_(W)
        vae.decoder[0].bias.copy_(_b(W))
    for p in vae.decoder.parameters():
        p.requires_grad_(False)
    return vae


def _closed_form(W: torch.Tensor):
    """``(precision Λ, posterior covariance Σ, A)`` with posterior mean ``A (x − b)``."""
    latent = W.shape[1]
    lam = torch.eye(latent, dtype=W.dtype) + W.T @ W / SIGMA ** 2
    sig = torch.linalg.inv(lam)
    return lam, sig, sig @ W.T / SIGMA ** 2


def _data(W: torch.Tensor, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws of ``x`` from the model and their exact ``log p(x)``."""
    g = torch.Generator().manual_seed(seed)
    d, latent = W.shape
    z = torch.randn(n, latent, generator=g, dtype=W.dtype)
    x = z @ W.T + _b(W) + SIGMA * torch.randn(n, d, generator=g, dtype=W.dtype)
    cov = W @ W.T + SIGMA ** 2 * torch.eye(d, dtype=W.dtype)
    return x, torch.distributions.MultivariateNormal(_b(W), cov).log_prob(x)


def _set_gaussian_head(vae: VAE, W: torch.Tensor, scale_factor: float = 1.0) -> None:
    """Posterior head = the exact posterior's mean and (diagonal) standard deviation × ``scale_factor``."""
    lam, sig, A = _closed_form(W)
    q = vae.posterior
    with torch.no_grad():
        q.loc.weight.copy_(A)
        q.loc.bias.copy_(-A @ _b(W))
        q.log_scale.weight.zero_()
        q.log_scale.bias.copy_(0.5 * torch.log(torch.diagonal(sig)) + math.log(scale_factor))


# an orthogonal-column W: WᵀW diagonal, so the exact posterior is a diagonal Gaussian
W_DIAGONAL = torch.tensor([[1.0, 0.5], [1.0, -0.5], [0.0, 1.0], [1.0, 0.0]])
# a W whose posterior is strongly correlated (ρ ≈ −0.79): mean-field leaves a gap of ≈ 0.49 nats
W_CORRELATED = torch.tensor([[1.0, 0.9], [0.9, 1.0], [0.5, -0.3]]) * 1.5


def test_elbo_with_the_exact_posterior_equals_log_px_for_every_sample(float64):
    W = W_CORRELATED.double()
    vae = _linear_gaussian(W)
    x, log_px = _data(W, 50)
    _, sig, A = _closed_form(W)
    mean = (x - _b(W)) @ A.T
    exact = torch.distributions.MultivariateNormal(mean, sig)
    z = exact.sample((7,))  # [7, 50, 2]
    elbo_terms = vae.log_joint(x.expand(7, -1, -1).reshape(-1, 3), z.reshape(-1, 2)).view(7, 50) - exact.log_prob(z)
    # the bound is tight: log p(x, z) − log q(z | x) = log p(x) for every z, not only on average
    assert torch.allclose(elbo_terms, log_px.expand(7, -1), atol=1e-10, rtol=0)
    # while a wrong posterior (the mean-field one) stays strictly below it
    wrong = torch.distributions.Normal(mean, 1 / torch.sqrt(torch.diagonal(torch.linalg.inv(sig))))
    zw = wrong.sample((200,))
    gap = log_px - (vae.log_joint(x.expand(200, -1, -1).reshape(-1, 3), zw.reshape(-1, 2)).view(200, 50)
                    - wrong.log_prob(zw).sum(-1)).mean(0)
    lam = torch.linalg.inv(sig)
    assert gap.mean().item() == pytest.approx(0.5 * (torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam)).item(),
                                              abs=0.05)


def test_gaussian_posterior_at_the_optimum_gives_neg_elbo_and_iwae_equal_to_minus_log_px(float64):
    W = W_DIAGONAL.double()
    vae = _linear_gaussian(W, POSTERIORS.build("gaussian"))
    _set_gaussian_head(vae, W)
    x, log_px = _data(W, 40)
    vae.eval()
    res = vae.evaluate_elbo(x, k=8, generator=torch.Generator().manual_seed(0))
    # MC error 0: every log-weight equals log p(x)
    assert res["neg_elbo"] == pytest.approx(-log_px.mean().item(), abs=1e-9)
    assert res["iwae_nll"] == pytest.approx(-log_px.mean().item(), abs=1e-9)
    assert res["neg_elbo_sem"] == pytest.approx((log_px.std() / math.sqrt(40)).item(), rel=1e-6)
    lw = vae.log_weights(x, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(lw, log_px.expand(5, -1), atol=1e-10, rtol=0)
    assert res["kl"] - res["recon"] == pytest.approx(res["kl"] - res["recon"])  # both reported, finite
    assert math.isfinite(res["kl"]) and math.isfinite(res["recon"])


def test_iwae_bound_increases_with_k_towards_log_px(float64):
    W = W_DIAGONAL.double()
    vae = _linear_gaussian(W, POSTERIORS.build("gaussian"))
    _set_gaussian_head(vae, W, scale_factor=1.8)  # too wide: the ELBO is loose
    x, log_px = _data(W, 3)
    x = x.repeat(800, 1)  # independent replicates of three points
    target = -log_px.repeat(800)
    vae.eval()
    g = torch.Generator().manual_seed(0)
    bounds = []
    for k in (1, 4, 16, 64):
        lw = vae.log_weights(x, k, g)
        bounds.append(-(torch.logsumexp(lw, 0) - math.log(k)) - target)  # −L_k − (−log p(x)) ≥ 0 per point
    means = [b.mean().item() for b in bounds]
    sems = [b.std().item() / math.sqrt(b.numel()) for b in bounds]
    assert means[0] > 0.5  # a loose ELBO at k = 1
    for i in range(3):  # strictly tighter with every k, far beyond Monte Carlo error
        assert means[i] - means[i + 1] > 4 * math.hypot(sems[i], sems[i + 1]), (means, sems)
    assert -3 * sems[-1] < means[-1] < 0.1 * means[0]  # still a bound, and close to log p(x)
    res = vae.evaluate_elbo(x[:30], k=64, generator=torch.Generator().manual_seed(2))
    assert res["iwae_nll"] < res["neg_elbo"]


def test_cnf_posterior_trained_briefly_closes_most_of_the_mean_field_gap():
    torch.manual_seed(0)
    W = W_CORRELATED
    lam, _, _ = _closed_form(W)
    mean_field_gap = 0.5 * (torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam)).item()  # ≈ 0.49 nats
    vae = _linear_gaussian(W, POSTERIORS.build("ffjord", hidden=[16], method="rk4", steps=1, end_time=1.0,
                                               learn_end_time=False))
    q = vae.posterior
    with torch.no_grad():  # start from the best diagonal Gaussian, the CNF at (nearly) the identity
        q.loc.weight.copy_(_closed_form(W)[2])
        q.loc.bias.copy_(-_closed_form(W)[2] @ _b(W))
        q.log_scale.weight.zero_()
        q.log_scale.bias.copy_(-0.5 * torch.log(torch.diagonal(lam)))
        q.blocks[0].field.base[-1].weight.zero_()
        q.blocks[0].field.base[-1].bias.zero_()
    x, log_px = _data(W, 256)

    def gap() -> tuple[float, float]:
        vae.eval()
        with torch.no_grad():
            g = log_px - vae.log_weights(x, 16, torch.Generator().manual_seed(3)).mean(0)
        vae.train()
        return g.mean().item(), g.std().item() / math.sqrt(g.numel())

    start, _ = gap()
    assert start > 0.8 * mean_field_gap  # near the identity flow: about the mean-field gap
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(80):
        out = vae.loss(x[torch.randint(0, 256, (64,))])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    end, sem = gap()
    # no diagonal Gaussian gets below mean_field_gap for any x; the CNF posterior does, by far
    assert end < 0.5 * mean_field_gap, (end, mean_field_gap)
    assert end > -4 * sem  # and its ELBO is still a lower bound on log p(x)


def _randomised(name: str, **kwargs):
    torch.manual_seed(0)
    q = POSTERIORS.build(name, **kwargs).bind(latent=3, context=4).double().eval()
    with torch.no_grad():  # move every parameter off its initialisation (zeros, small hyper weights)
        for p in q.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return q


@pytest.mark.parametrize("name, kwargs", [
    ("planar", {"flows": 3}),
    ("iaf", {"flows": 2, "hidden": [8]}),
    ("ffjord", {"hidden": [8], "rank": 2, "blocks": 2, "method": "rk4", "steps": 4}),
])
def test_posterior_log_density_equals_change_of_variables_with_the_full_jacobian(name, kwargs):
    q = _randomised(name, **kwargs)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 3, generator=g, dtype=torch.float64)
    z, log_q = q(h, eps)
    loc, log_scale = q.base(h)
    z0 = loc + log_scale.exp() * eps
    for i in range(3):
        def f(v, i=i):
            return q.transform(v[None], h[i:i + 1])[0][0]

        jac = torch.autograd.functional.jacobian(f, z0[i].detach())
        assert torch.allclose(f(z0[i].detach()), z[i].detach(), atol=1e-9)
        base = torch.distributions.Normal(loc[i], log_scale[i].exp()).log_prob(z0[i]).sum()
        expected = base - torch.linalg.slogdet(jac)[1]
        assert log_q[i].item() == pytest.approx(expected.item(), abs=1e-6), name
        assert abs(torch.linalg.det(jac).item()) > 1e-6  # invertible at this point


def test_iaf_is_autoregressive_and_planar_stays_invertible():
    q = _randomised("iaf", flows=1, hidden=[8])
    h = torch.randn(1, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: q.transform(v[None], h)[0][0], torch.randn(3, dtype=torch.float64))
    assert torch.allclose(jac, torch.tril(jac))  # first step: natural order, lower-triangular Jacobian
    p = _randomised("planar", flows=1)
    with torch.no_grad():  # u pointing against w: without appendix A.1's û the map would fold
        p.amortise.weight.zero_()
        p.amortise.bias.copy_(torch.tensor([-5.0, 0, 0, 1.0, 0, 0, 0], dtype=torch.float64))
    z, log_det = p.transform(torch.linspace(-3, 3, 50, dtype=torch.float64)[:, None].expand(50, 3).contiguous(),
                             torch.zeros(50, 4, dtype=torch.float64))
    assert bool(torch.isfinite(log_det).all())
    assert bool((z[1:, 0] > z[:-1, 0]).all())  # monotone along w: invertible


def test_hutchinson_cnf_posterior_is_unbiased_for_the_exact_log_density():
    q = _randomised("ffjord", hidden=[8], method="rk4", steps=4, divergence="hutchinson", noise="gaussian")
    h = torch.randn(1, 4, dtype=torch.float64).expand(400, 4)
    eps = torch.randn(1, 3, dtype=torch.float64).expand(400, 3)
    exact = q(h[:1], eps[:1])[1]
    q.train()  # training mode: Hutchinson's estimate, one probe per row
    estimates = q(h, eps)[1].detach()
    assert estimates.std() > 1e-6  # an estimate, not the exact trace
    assert abs(estimates.mean() - exact.detach()) < 4 * estimates.std() / 20


def test_flow_is_refused_with_a_clear_message_and_declarations():
    vae = VAE(None, (1, 8, 8), latent=2, encoder=[8], decoder=[8])
    assert VAE.provides == frozenset() and VAE.defines_density is False and VAE.variational is True
    with pytest.raises(FieldError, match="defines no flow.*evaluate_elbo"):
        vae.flow()
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    assert vae.reconstruct(x).shape == x.shape and vae.generate(5).shape == (5, 1, 8, 8)
    r = vae.reconstruct(x)
    assert bool(((r > 0) & (r < 1)).all())  # Bernoulli means


def test_bernoulli_decoder_refuses_continuous_data():
    vae = VAE(None, (1, 8, 8), latent=2, encoder=[8], decoder=[8])
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(DataError, match="objective.likelihood: bernoulli needs binary data.*data.binarize: true"):
        vae.loss(x)


def _recipe(**objective):
    return {"data": {"name": "digits", "binarize": True}, "objective": {"name": "vae", **objective}}


@pytest.mark.parametrize("objective, message", [
    ({"posterior": {"name": "planr"}}, r"objective.posterior.name: unknown posterior 'planr' \(did you mean planar\?\)"),
    ({"posterior": {"name": "planar", "flows": 0}}, r"objective.posterior.flows: .*>= 1"),
    ({"posterior": {"name": "iaf", "hiden": [8]}}, r"objective.posterior.hiden: unknown argument of iaf \(did you mean hidden\?\)"),
    ({"posterior": {"name": "ffjord", "method": "rk4"}}, r"objective.posterior.steps: fixed-step method 'rk4' needs steps"),
    ({"latent": 0}, r"objective.latent: .*>= 1"),
    ({"encoder": [64, 0]}, r"objective.encoder"),
    ({"decoder_std": 0.1}, r"objective.decoder_std: decoder_std is the Gaussian decoder's"),
    ({"likelihood": "poisson"}, r"objective.likelihood: .*bernoulli, gaussian"),
])
def test_bad_posterior_names_and_sizes_are_refused_with_their_key(objective, message):
    with pytest.raises(RecipeError, match=message):
        flowkit.validate(_recipe(**objective))


def test_bad_sizes_refused_when_built_from_python():
    with pytest.raises(RegistryError, match="did you mean iaf"):
        POSTERIORS.get("iaff")
    with pytest.raises(ValueError, match="posterior.flows: must be an integer >= 1"):
        POSTERIORS.build("planar", flows=0)
    with pytest.raises(ValueError, match="posterior.hidden: IAF needs at least one hidden layer"):
        POSTERIORS.build("iaf", hidden=[])
    with pytest.raises(ValueError, match="objective.latent: widths must be integers >= 1"):
        VAE(None, (4,), latent=0)
    with pytest.raises(ValueError, match="objective.decoder_std"):
        VAE(None, (4,), decoder_std=0.1)
    with pytest.raises(ValueError, match="already bound"):
        POSTERIORS.build("gaussian").bind(2, 3).bind(2, 3)
    vae = VAE(None, (4,), latent=2, encoder=[8], decoder=[8], likelihood="gaussian")
    with pytest.raises(ValueError, match="k: must be an integer >= 1"):
        vae.evaluate_elbo(torch.zeros(3, 4), k=0)


def test_dynamic_binarisation_draws_each_batch_afresh_with_the_intensity_as_probability():
    k = torch.tensor([0, 4, 8, 12, 16]).expand(20000, 5)
    x = binarise(k, 17, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) == {0.0, 1.0}
    expected = torch.tensor([0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(x.mean(0), expected, atol=4 * 0.5 / math.sqrt(20000))
    data = flowkit.DATASETS.build("digits", binarize=True)
    assert data.discrete and data.log_scale == 0.0 and data.model_log_det(torch.zeros(2, 1, 8, 8)) is None
    g = torch.Generator().manual_seed(5)
    a, _ = data.train_batch(64, g)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    # the same image binarised twice differs (dynamic), its test set does not (fixed by the seed)
    img = data.train[:1].expand(2000, -1, -1, -1)
    draws = data._to_model(img, torch.Generator().manual_seed(1))
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), img[0].float() / 16, atol=0.05)
    assert torch.equal(data.test_set(10, seed=3)[0], data.test_set(10, seed=3)[0])
    continuous = flowkit.DATASETS.build("digits")
    assert continuous.log_scale == pytest.approx(math.log(17)) and len(continuous.train_batch(8, g)[0].unique()) > 2


def test_binarize_is_validated_like_the_other_dataset_arguments():
    with pytest.raises(RecipeError, match="data.binarize: expected true or false"):
        flowkit.validate({"data": {"name": "digits", "binarize": "yes"}, "dynamics": {"name": "mlp"},
                          "objective": {"name": "cfm"}})
    with pytest.raises(RecipeError, match="data.binarize: binarised images are binary"):
        flowkit.validate({"data": {"name": "digits", "binarize": True, "logit": True}, "dynamics": {"name": "mlp"},
                          "objective": {"name": "cfm"}})
    with pytest.raises(DataError, match="data.binarize: binarised images are binary"):
        flowkit.DATASETS.build("digits", binarize=True, logit=True)
    with pytest.raises(DataError, match="data.binarize: expected true or false"):
        flowkit.DATASETS.build("digits", binarize=1)


def test_hf_images_binarise_and_tables_refuse(tmp_path):
    pd = pytest.importorskip("pandas")
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        folder = tmp_path / "img" / split / "a"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(torch.randint(0, 256, (4, 4), dtype=torch.uint8).numpy(), mode="L").save(folder / f"{i}.png")
    d = flowkit.DATASETS.build("hf", path=str(tmp_path / "img"), binarize=True)
    x, _ = d.train_batch(6, torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 4, 4) and set(x.unique().tolist()) <= {0.0, 1.0} and d.log_scale == 0.0
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.0, 1.0, 2.0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="data.binarize: binarisation is for images"):
        flowkit.DATASETS.build("hf", path=str(tmp_path / "t.csv"), binarize=True)
