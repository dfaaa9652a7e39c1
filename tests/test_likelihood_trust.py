"""No silent wrong answers from the likelihood API (issue 12, group 1).

1. A field whose autograd graph is missing or partial — an external model called under
   ``torch.no_grad()`` or ``torch.inference_mode()``, or returning ``.detach()``-ed output — gets
   its divergence by finite differences, never a silent 0; checked against closed forms
   (``N(0, I)`` under VP with the score ``-x``; Gaussian mixtures with their exact marginal
   scores). A caller under ``no_grad`` / ``inference_mode`` gets the same answer.
2. Bad inputs — a field of the wrong shape or with NaN/inf, an empty or 1-D ``x``, NaN rows in
   ``x``, ``n_probes <= 0`` — raise :class:`flowkit.flow.FieldError` naming the argument, the
   expected shape and how many samples are bad, at every public entry point.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings

import pytest
import torch

from flowkit.components import SDES
from flowkit.config import EvalConfig
from flowkit.diffusion import flow_from_score, score_log_likelihood
from flowkit.divergence import divergence, sample_probe
from flowkit.dynamics import ConcatSquashMLP
from flowkit.evaluate import evaluate_nll
from flowkit.flow import FieldError, Flow, NonFiniteFieldError, StandardNormal
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.likelihood import flow_log_likelihood, log_likelihood
from flowkit.paths import VP

F64 = torch.float64
FD_WARNING = "finite differences"


# ----------------------------------------------------------------------------- helpers


def wrap_xt(score, how: str):
    """An ``s(x, t)`` score called the ways external models are: plainly, under ``no_grad``,
    under ``inference_mode``, or with its output detached."""

    def wrapped(x, t):
        if how == "no_grad":
            with torch.no_grad():
                return score(x, t)
        if how == "inference_mode":
            with torch.inference_mode():
                return score(x, t)
        if how == "detach":
            return score(x, t).detach()
        return score(x, t)

    return wrapped


def wrap_field(field, how: str):
    """The same wrappers for a flowkit-order field ``f(t, x, cond=None)``."""
    inner = wrap_xt(lambda x, t: field(t, x), how)
    return lambda t, x, cond=None: inner(x, t)


def mixture(dim: int, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(2, dim, generator=g, dtype=F64)
    a = torch.randn(2, dim, dim, generator=g, dtype=F64) / dim**0.5
    covs = 0.5 * a @ a.mT + 0.2 * torch.eye(dim, dtype=F64)
    return GaussianMixture(means, covs, torch.tensor([0.4, 0.6], dtype=F64))


def gaussian_nll(x: torch.Tensor) -> float:
    """Closed-form NLL of ``N(0, I)``: ``½ D log 2π + ½ mean |x|²``."""
    d = x.shape[1]
    return 0.5 * d * math.log(2 * math.pi) + 0.5 * float(x.pow(2).sum(1).mean())


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the finite-difference warning silenced (tests that check it say so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + FD_WARNING)
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- 1. right answers


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_score_without_graph_gives_closed_form_gaussian_nll(how):
    """The issue's case: N(0, I) data under VP with the exact score -x gave NLL 12.92, not 2.87."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.warns(UserWarning, match=FD_WARNING):
        out = score_log_likelihood(wrap_xt(lambda x, t: -x, how), x, VP())
    assert -float(out.log_prob.mean()) == pytest.approx(gaussian_nll(x), abs=1e-6)


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_score_without_graph_gives_exact_mixture_likelihood(how):
    path = SDES.build("vp")
    gmm = mixture(2)
    field = mixture_score_field(gmm, path)
    x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(1))
    ref = gmm.marginal(path, path.t0).log_prob(x)
    with pytest.warns(UserWarning, match=FD_WARNING):
        out = score_log_likelihood(wrap_xt(lambda x, t: field(t, x), how), x, path,
                                   prior=gmm.marginal(path, path.t1), rtol=1e-6, atol=1e-6)
    assert (out.log_prob - ref).abs().max().item() < 1e-3


def test_float32_score_without_graph_stays_accurate():
    """Central differences in float32 (the dtype of most external models): error ~1e-4 nats."""
    path = SDES.build("vp")
    gmm64 = mixture(2)
    gmm = GaussianMixture(gmm64.means.float(), gmm64.covs.float(), gmm64.weights.float())
    field = mixture_score_field(gmm, path)
    x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(2))
    ref = gmm64.marginal(path, path.t0).log_prob(x.double())
    out = quiet(score_log_likelihood, wrap_xt(lambda x, t: field(t, x), "no_grad"), x, path,
                prior=gmm.marginal(path, path.t1), rtol=1e-6, atol=1e-6)
    assert out.log_prob.dtype == torch.float32
    assert (out.log_prob.double() - ref).abs().max().item() < 2e-3


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_caller_under_no_grad_or_inference_mode_gets_the_exact_likelihood(mode):
    """``with torch.no_grad():`` / ``with torch.inference_mode():`` around the call, with ``x``
    even created inside it: the same exact mixture likelihood, no warning (autograd is used)."""
    path = SDES.build("vp")
    gmm = mixture(2, seed=3)
    field = mixture_score_field(gmm, path)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ctx():
            x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(1))
            out = score_log_likelihood(lambda x, t: field(t, x), x, path, prior=gmm.marginal(path, path.t1),
                                       rtol=1e-6, atol=1e-6)
    ref = gmm.marginal(path, path.t0).log_prob(x.clone())
    assert (out.log_prob - ref).abs().max().item() < 1e-3
    assert not out.log_prob.is_inference()


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_flow_and_evaluate_nll_of_a_detached_score_flow_are_exact(how):
    """The same contract through flow_from_score → flow_log_likelihood and evaluate_nll (also
    called under inference_mode), the paths of `flowkit nll`."""
    path = SDES.build("vp")
    gmm = mixture(2, seed=4)
    flow = flow_from_score(wrap_field(mixture_score_field(gmm, path), how), path, (2,),
                           prior=gmm.marginal(path, path.t1))
    x = gmm.marginal(path, path.t0).sample(10, torch.Generator().manual_seed(5))
    ref = gmm.marginal(path, path.t0).log_prob(x)
    with pytest.warns(UserWarning, match="flow.velocity"):
        out = flow_log_likelihood(flow, x, rtol=1e-6, atol=1e-6)
    assert (out.log_prob - ref).abs().max().item() < 1e-3
    cfg = EvalConfig(batch_size=4, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        res = quiet(evaluate_nll, flow, x, cfg)
    assert res["nll"] == pytest.approx(-float(ref.mean()), abs=1e-3)


def test_partially_detached_linear_field_counts_both_parts():
    """``v = A x + stopgrad(B x)``: Δ = t1 tr(A + B) exactly; autograd alone would give t1 tr A."""
    a = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]], dtype=F64)
    b = torch.tensor([[0.7, 0.1], [0.2, -1.1]], dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    field = lambda t, x: x @ a.T + (x @ b.T).detach()  # noqa: E731
    with pytest.warns(UserWarning, match="only part"):
        out = log_likelihood(field, x, StandardNormal((2,)), times=(0.0, 0.7), rtol=1e-9, atol=1e-9)
    assert torch.allclose(out.delta, torch.full((6,), 0.7 * float(torch.trace(a + b)), dtype=F64), atol=1e-7)


def test_part_missed_by_autograd_only_after_t0_is_caught():
    """``v = A x + t² stopgrad(B x)``: at t0 = 0 autograd is right, later it is not (like the
    score term of a sub-VP PF-ODE, negligible at t0). Δ = t1 tr A + t1³/3 tr B."""
    a = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]], dtype=F64)
    b = torch.tensor([[0.7, 0.1], [0.2, -1.1]], dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    field = lambda t, x: x @ a.T + t**2 * (x @ b.T).detach()  # noqa: E731
    with pytest.warns(UserWarning, match="only part"):
        out = log_likelihood(field, x, StandardNormal((2,)), times=(0.0, 1.0), rtol=1e-9, atol=1e-9)
    expected = float(torch.trace(a)) + float(torch.trace(b)) / 3
    assert torch.allclose(out.delta, torch.full((6,), expected, dtype=F64), atol=1e-7)


def test_hutchinson_of_a_field_without_graph_estimates_the_trace():
    a = torch.tensor([[1.2, 0.8], [-0.5, 0.9]], dtype=F64)  # tr A = 2.1
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = quiet(log_likelihood, wrap_field(lambda t, x: x @ a.T, "no_grad"), x, StandardNormal((2,)),
                estimator="hutchinson", noise="gaussian", n_probes=4000, rtol=1e-8, atol=1e-8,
                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.delta, torch.full((4,), float(torch.trace(a)), dtype=F64), atol=0.15)


def test_fields_with_a_full_graph_keep_autograd_without_warning():
    """No false alarm: flowkit networks (smooth and ReLU), float32 and float64, keep autograd."""
    for dtype in (torch.float32, F64):
        for act in ("tanh", "relu"):
            torch.manual_seed(8)
            net = ConcatSquashMLP(3, hidden=(32, 32), activation=act).to(dtype)
            x = 2 * torch.randn(32, 3, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                log_likelihood(net, x, StandardNormal((3,)), method="rk4", steps=2)


def test_divergence_refuses_a_field_without_graph_instead_of_returning_zero():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    x, t = torch.randn(5, 2, dtype=F64), torch.tensor(0.0, dtype=F64)
    detached = lambda t, x: (x @ a.T).detach()  # noqa: E731
    for estimator, probe in (("exact", None), ("hutchinson", sample_probe(x))):
        with pytest.raises(FieldError, match="no_grad"):
            divergence(detached, t, x, estimator=estimator, probe=probe)
    out = divergence(detached, t, x, differentiate="finite_difference", frobenius=True)
    assert torch.allclose(out.div, torch.full((5,), 5.0, dtype=F64), atol=1e-8)
    assert torch.allclose(out.jac_frobenius, torch.full((5,), 30.0, dtype=F64), atol=1e-6)


def test_finite_difference_divergence_matches_autograd(float64):
    torch.manual_seed(9)
    net = ConcatSquashMLP(4, hidden=(16, 16), activation="softplus")
    x, t = torch.randn(6, 4), torch.tensor(0.3)
    probe = sample_probe(x, "gaussian", 3)
    for estimator, p in (("exact", None), ("hutchinson", probe)):
        ref = divergence(net, t, x, estimator=estimator, probe=p, frobenius=True)
        fd = divergence(net, t, x, estimator=estimator, probe=p, frobenius=True, differentiate="finite_difference")
        assert torch.allclose(fd.div, ref.div, atol=1e-7)  # the same εᵀJε (or tr J) both ways
        assert torch.allclose(fd.dx, ref.dx)
    exact = divergence(net, t, x, frobenius=True, differentiate="finite_difference").jac_frobenius
    assert torch.allclose(exact, divergence(net, t, x, frobenius=True).jac_frobenius, atol=1e-8)


def test_field_with_dropout_in_training_mode_is_refused():
    """Two calls on the same input differ: a likelihood of it would be noise."""
    torch.manual_seed(10)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    with pytest.raises(FieldError, match=r"eval\(\)"):
        log_likelihood(lambda t, x: net(x), torch.randn(8, 2), StandardNormal((2,)))


# ----------------------------------------------------------------------------- 2. bad inputs


def _entry_points():
    """Every public likelihood entry point, as ``call(x, field, **options)`` with a flowkit-order
    field ``field(t, x, cond=None)``."""
    path = VP()

    def via_log_likelihood(x, field, **options):
        return log_likelihood(field, x, StandardNormal(tuple(x.shape[1:])), **options)

    def via_flow(x, field, **options):
        return flow_log_likelihood(Flow(velocity=field, prior=StandardNormal(tuple(x.shape[1:]))), x, **options)

    def via_score(x, field, **options):
        return score_log_likelihood(lambda x_, t_: field(t_[0], x_), x, path, **options)

    def via_evaluate(x, field, n_probes=1, **options):
        cfg = EvalConfig(batch_size=4, **options)
        if n_probes != 1:  # bypass any validation in EvalConfig: evaluate_nll must check on its own
            cfg = types.SimpleNamespace(**{**dataclasses.asdict(cfg), "n_probes": n_probes})
        return evaluate_nll(Flow(velocity=field, prior=StandardNormal(tuple(x.shape[1:]))), x, cfg)

    return {"log_likelihood": via_log_likelihood, "flow_log_likelihood": via_flow,
            "score_log_likelihood": via_score, "evaluate_nll": via_evaluate}


ENTRY = _entry_points()
GOOD = lambda t, x, cond=None: -x  # noqa: E731


@pytest.mark.parametrize("entry", list(ENTRY))
def test_one_dimensional_x_is_refused_naming_the_expected_shape(entry):
    with pytest.raises(FieldError, match=r"x: expected shape \[batch, \*event_shape\], got a 1-D tensor"):
        ENTRY[entry](torch.randn(5), GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_empty_x_is_refused(entry):
    with pytest.raises(FieldError, match=r"x: .*at least one sample.*\(0, 2\)"):
        ENTRY[entry](torch.zeros(0, 2), GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_non_finite_rows_of_x_are_counted(entry):
    x = torch.randn(10, 2)
    x[3, 0], x[7, 1] = float("nan"), float("inf")
    with pytest.raises(FieldError, match=r"x: 2 of 10 samples contain NaN or inf \(rows 3, 7\)"):
        ENTRY[entry](x, GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("n_probes", [0, -1])
def test_non_positive_n_probes_is_refused(entry, n_probes):
    with pytest.raises(FieldError, match=f"n_probes: expected a positive integer.*got {n_probes}"):
        ENTRY[entry](torch.randn(4, 2), GOOD, n_probes=n_probes)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_field_of_the_wrong_shape_is_named_with_the_expected_shape(entry):
    wrong = lambda t, x, cond=None: -x[:, :1]  # noqa: E731
    with pytest.raises(FieldError, match=r"returned (shape )?\(4, 1\).*expected.*\(4, 2\)"):
        ENTRY[entry](torch.randn(4, 2), wrong)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_field_with_nan_at_the_data_counts_the_samples(entry):
    def field(t, x, cond=None):
        return torch.where(x[:, :1] > 0, float("nan"), 1.0) * x

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]])
    with pytest.raises(NonFiniteFieldError, match=r"NaN or inf for 2 of 4 samples at t="):
        ENTRY[entry](x, field)


@pytest.mark.parametrize("entry", ["log_likelihood", "flow_log_likelihood", "evaluate_nll"])
def test_field_turning_non_finite_during_the_solve_names_the_time(entry):
    """Finite at the data, NaN for t > 0.5 on samples with x₀ > 0: not the solver's 'underflow in dt'."""
    def field(t, x, cond=None):
        return torch.where((t > 0.5) & (x[:, :1] > 0), float("nan"), -0.5) * x

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
    with pytest.raises(NonFiniteFieldError, match=r"2 of 3 samples at t=0\.5.*during the solve"):
        ENTRY[entry](x, field)


def test_evaluate_nll_names_the_batch_of_a_bad_field_output():
    def field(t, x, cond=None):  # NaN for the sample whose first coordinate is 9
        return torch.where(x[:, :1] == 9, float("nan"), 0.0) * x

    x = torch.zeros(10, 2)
    x[6, 0] = 9.0
    with pytest.raises(NonFiniteFieldError, match=r"1 of 4 samples.*rows 2\).*x\[4:8\]"):
        evaluate_nll(Flow(velocity=field, prior=StandardNormal((2,))), x, EvalConfig(batch_size=4))


def test_condition_of_the_wrong_length_is_refused():
    with pytest.raises(FieldError, match=r"cond: expected one condition per sample of x, shape \[4, \.\.\.\]"):
        log_likelihood(lambda t, x, c: -x, torch.randn(4, 2), StandardNormal((2,)), cond=torch.zeros(3, 1))


def test_prior_log_prob_of_the_wrong_shape_is_refused():
    class Flat:
        shape = (2,)

        def log_prob(self, z):
            return torch.zeros(z.shape[0], 1)  # [B, 1] would broadcast to [B, B] with delta

    with pytest.raises(FieldError, match=r"prior.log_prob returned shape \(4, 1\).*expected \(4,\)"):
        log_likelihood(GOOD, torch.randn(4, 2), Flat())


def test_field_constant_in_x_gets_zero_divergence_without_alarm():
    """``zeros_like(x)`` has no graph but truly no dependence on x: Δ = 0, computed, not assumed."""
    x = torch.randn(5, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_likelihood(lambda t, x: torch.zeros_like(x) + t, x, StandardNormal((3,)))
    assert torch.equal(out.delta, torch.zeros(5, dtype=F64))
    assert torch.allclose(out.z, x + 0.5)


def test_conditional_field_without_graph_gets_its_own_condition_per_sample():
    """Finite differences stack x ± h v along the batch; each copy keeps its sample's condition.
    ``v = −c x`` (c per sample): Δ = −D c (t1 − t0)."""
    n = 150  # more than the derivative checks look at
    x = torch.randn(n, 3, dtype=F64)
    c = torch.linspace(0.1, 2.0, n, dtype=F64)[:, None]

    def field(t, x, cond):
        with torch.no_grad():
            return -cond * x

    with pytest.warns(UserWarning, match=FD_WARNING):
        out = log_likelihood(field, x, StandardNormal((3,)), cond=c, method="rk4", steps=4)
    assert torch.allclose(out.delta, -3 * c[:, 0], atol=1e-8)
