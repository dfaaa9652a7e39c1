"""The declared protocol for fast divergences (:mod:`flowkit.fast_divergence`).

A network lists its fast paths in ``divergence_paths``; wrappers carry the declaration in
one place (:class:`~flowkit.fast_divergence.FieldWrapper`); one function chooses the
strategy; a declaration that names a method the network lacks fails when the model is
built. Fields here are linear, ``f(t, x) = x Aᵀ`` with ``A`` diagonal, so that every
divergence has a closed form: ``tr A`` — and Hutchinson's ``εᵀAε`` with Rademacher ``ε`` is
exactly ``tr A`` too, so the solves are checked to 1e-10, not statistically.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowkit.dynamics import ConcatSquashMLP
from flowkit.dynamics.multiscale import ScaleField, multiscale_views
from flowkit.fast_divergence import (STRATEGIES, DivergenceDeclarationError, FieldWrapper, bind, choose_strategy,
                                     declared_paths)
from flowkit.flow import StandardNormal
from flowkit.likelihood import AugmentedDynamics, log_likelihood
from flowkit.objectives.ffjord import FFJORD, TimeScaledField

DIAG = (-0.5, 0.3, -1.2)
TRACE = sum(DIAG)


class Linear(nn.Module):
    """``f(t, x) = a ⊙ x`` on any event shape (``a`` a learnable diagonal); declares nothing."""

    def __init__(self, dim: int = 3, shape=None) -> None:
        super().__init__()
        values = torch.tensor(DIAG, dtype=torch.float64).repeat(dim // 3 + 1)[:dim]
        self.a = nn.Parameter(values)
        self.calls = {"forward": 0, "forward_with_jvp": 0, "forward_with_jacobian": 0}

    def forward(self, t, x, cond=None):
        self.calls["forward"] += 1
        return (x.flatten(1) * self.a.to(x.dtype)).reshape(x.shape)


class JvpLinear(Linear):
    """The same field, declaring the forward-mode path."""

    divergence_paths = frozenset({"jvp"})

    def forward_with_jvp(self, t, x, v, cond=None):
        self.calls["forward_with_jvp"] += 1
        a = self.a.to(x.dtype)
        return (x.flatten(1) * a).reshape(x.shape), (v.flatten(1) * a).reshape(v.shape)


class JacobianLinear(Linear):
    """The same field, declaring the forward Jacobian, ``J[b, i, j] = ∂f_j/∂x_i = diag(a)``."""

    divergence_paths = frozenset({"jacobian"})

    def forward_with_jacobian(self, t, x, cond=None):
        self.calls["forward_with_jacobian"] += 1
        a = self.a.to(x.dtype)
        return (x.flatten(1) * a).reshape(x.shape), torch.diag_embed(a.expand(x.shape[0], -1))


class Undeclared(JvpLinear):
    """Implements ``forward_with_jvp`` but does not declare it: it must not be used."""

    divergence_paths = frozenset()


class Lying(Linear):
    """Declares the forward-mode path without implementing it."""

    divergence_paths = frozenset({"jvp"})


def _ffjord(net_cls, **kw):
    kw = {"divergence": "hutchinson", "method": "rk4", "steps": 2, "learn_end_time": False, **kw}
    return FFJORD(lambda **_: net_cls(), (3,), **kw).double()


# ----------------------------------------------------------------------------- one strategy chooser


def test_one_function_chooses_every_strategy():
    assert choose_strategy("exact") == "exact"
    assert choose_strategy("exact", frozenset({"jacobian", "jvp", "bottleneck"})) == "jacobian"
    assert choose_strategy("hutchinson") == "hutchinson"
    assert choose_strategy("hutchinson", frozenset({"jvp"})) == "jvp"
    assert choose_strategy("hutchinson", frozenset({"jvp", "bottleneck"})) == "bottleneck"
    assert choose_strategy("hutchinson", frozenset({"jacobian"})) == "hutchinson"
    assert choose_strategy("exact", frozenset({"jacobian"}), differentiate="finite_difference") == "finite_difference"
    with pytest.raises(ValueError, match="Jacobian-norm regulariser"):
        choose_strategy("hutchinson", frozenset({"bottleneck"}), frobenius=True)
    assert {"finite_difference", "jacobian", "exact", "exact_loop", "bottleneck", "jvp", "hutchinson"} == set(STRATEGIES)


# ----------------------------------------------------------------------------- a new network's declaration


def test_declared_jvp_of_a_new_network_is_used_by_training_and_likelihood():
    """No wrapper knows ``JvpLinear``: its declaration alone routes the divergence through it."""
    obj = _ffjord(JvpLinear, steps=16)
    net = obj.blocks[0].field
    x = torch.randn(5, 3, dtype=torch.float64)
    out = obj.loss(x)
    assert net.calls["forward_with_jvp"] == out.metrics["nfe"] == 64  # rk4: 16 steps × 4 stages
    assert net.calls["forward"] == 0
    # the closed form: T ∫ tr A ds over s ∈ [0, 1] with T ≈ 0.5 (exp of a rounded log); z = exp(T a) x
    end = float(obj.blocks[0].end_time)
    z = x * torch.exp(end * net.a.detach())
    expected = StandardNormal((3,)).log_prob(z) + end * TRACE
    torch.testing.assert_close(-out.loss.detach(), expected.mean(), atol=1e-8, rtol=0)
    net.calls.update(forward=0, forward_with_jvp=0)
    obj.eval()
    ll = log_likelihood(obj.blocks[0], x, StandardNormal((3,)), estimator="hutchinson", method="rk4", steps=2)
    assert net.calls["forward_with_jvp"] == ll.nfe == 8
    torch.testing.assert_close(ll.delta, torch.full((5,), end * TRACE, dtype=torch.float64), atol=1e-12, rtol=0)


def test_declared_jacobian_is_used_for_the_exact_trace():
    obj = _ffjord(JacobianLinear, divergence="exact")
    net = obj.blocks[0].field
    out = obj.loss(torch.randn(4, 3, dtype=torch.float64))
    assert net.calls["forward_with_jacobian"] == out.metrics["nfe"] and net.calls["forward"] == 0
    out.loss.backward()
    assert net.a.grad is not None and torch.isfinite(net.a.grad).all()


def test_a_network_that_declares_nothing_gets_the_generic_estimator():
    for cls in (Linear, Undeclared):
        obj = _ffjord(cls)
        net = obj.blocks[0].field
        assert obj.blocks[0].divergence_paths == frozenset()
        assert AugmentedDynamics(obj.blocks[0], (3,), estimator="hutchinson").strategy == "hutchinson"
        out = obj.loss(torch.randn(4, 3, dtype=torch.float64))
        # an undeclared forward_with_jvp is never called: declared, not probed
        assert net.calls["forward_with_jvp"] == 0 and net.calls["forward"] == out.metrics["nfe"] == 8


def test_builtin_networks_declare_by_constructor():
    assert declared_paths(ConcatSquashMLP(2)) == {"jacobian"}
    assert declared_paths(ConcatSquashMLP(2, bottleneck=True)) == {"jacobian", "bottleneck"}
    assert declared_paths(ConcatSquashMLP(2, activation="gelu")) == frozenset()  # no closed-form derivative


# ----------------------------------------------------------------------------- wrappers forward it


class Negated(FieldWrapper):
    """A new wrapper, ``-f(2t, x)``: it defines only :meth:`enter` and carries every path it may."""

    def enter(self, t, x):
        return 2 * t, x, lambda f: -f


def test_a_wrapper_forwards_the_declaration_in_one_place():
    net = JvpLinear()
    field = Negated(net)
    assert field.divergence_paths == {"jvp"} and Negated(JacobianLinear()).divergence_paths == frozenset()
    x = torch.randn(6, 3, dtype=torch.float64)
    # stacked wrappers: time scaling around a new wrapper around the network
    outer = TimeScaledField(field, 0.5, learn=False).double()
    assert declared_paths(outer) == {"jvp"}
    ll = log_likelihood(outer, x, StandardNormal((3,)), estimator="hutchinson", method="rk4", steps=2)
    assert net.calls["forward_with_jvp"] == ll.nfe
    end = float(outer.end_time)
    torch.testing.assert_close(ll.delta, torch.full((6,), -end * TRACE, dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_multiscale_wrapper_forwards_the_declaration():
    view = multiscale_views((1, 4, 4), n_scales=2)[2]  # the (2, 2, 2) stage inside (1, 4, 4)
    net = JvpLinear(8)
    field = ScaleField(net, view).double()
    assert field.divergence_paths == {"jvp"}
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ll = log_likelihood(field, x, StandardNormal((1, 4, 4)), estimator="hutchinson", method="rk4", steps=2)
    assert net.calls["forward_with_jvp"] == ll.nfe == 8
    expected = float(net.a.detach().sum())  # tr of the embedded field = tr of the stage's network
    torch.testing.assert_close(ll.delta, torch.full((3,), expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_condition_is_bound_once_for_every_path():
    seen = []

    class Conditional(JvpLinear):
        def forward_with_jvp(self, t, x, v, cond=None):
            seen.append(cond)
            return super().forward_with_jvp(t, x, v, cond)

    cond = torch.arange(4)
    paths = bind(TimeScaledField(Conditional(), 1.0, learn=False).double(), cond)
    assert paths.names == {"jvp"}
    paths.jvp(torch.tensor(0.0), torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64))
    assert seen[-1] is cond


# ----------------------------------------------------------------------------- a lying declaration


def test_a_declaration_without_its_method_fails_when_the_model_is_built():
    with pytest.raises(DivergenceDeclarationError, match=r"Lying.*'jvp'.*forward_with_jvp"):
        _ffjord(Lying)
    net = Lying()
    with pytest.raises(DivergenceDeclarationError, match="forward_with_jvp"):
        log_likelihood(net, torch.randn(2, 3, dtype=torch.float64), StandardNormal((3,)), estimator="hutchinson")
    assert net.calls["forward"] == 0  # refused before the field is ever called


@pytest.mark.parametrize("declaration, message", [(frozenset({"jvp_fast"}), "unknown fast divergence path"),
                                                  ("jvp", "expected a frozenset")])
def test_a_malformed_declaration_names_the_choices(declaration, message):
    net = JvpLinear()
    net.divergence_paths = declaration
    with pytest.raises(DivergenceDeclarationError, match=message) as info:
        declared_paths(net)
    assert "JvpLinear.divergence_paths" in str(info.value)


def test_a_wrapper_refuses_a_path_its_network_does_not_offer():
    with pytest.raises(DivergenceDeclarationError, match="does not offer"):
        Negated(Linear()).forward_with_jvp(torch.tensor(0.0), torch.zeros(1, 3), torch.zeros(1, 3))
