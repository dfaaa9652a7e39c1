"""The one divergence function: ``(f(t, x), tr ∂f/∂x)`` for training and evaluation.

Three estimators of the trace of the Jacobian ``J = ∂f/∂x``:

* ``exact`` — every diagonal entry. A field that can carry its Jacobian forward
  (the ``jacobian`` path) supplies it directly; otherwise one forward pass and ``D``
  vector–Jacobian products with the one-hot basis, batched by ``is_grads_batched`` (no
  Python loop over dimensions) or, where measured faster (large ``D`` on a CPU,
  :data:`flowkit.fast_divergence.EXACT_TRACE_BY_DIM`), as ``D`` backward passes. Cost grows
  with ``D``.
* ``hutchinson`` — ``tr J = E[εᵀ J ε]`` with ``E[εεᵀ] = I`` (Hutchinson 1989; FFJORD
  eq. 4), ε Gaussian or Rademacher and held fixed over one ODE solve. Several probes
  are averaged in one batched backward (``is_grads_batched``).
* bottleneck (FFJORD appendix E) — when ``f = g ∘ h`` with a narrow ``h``, the
  estimate ``εᵀ (∂h/∂x)(∂g/∂h) ε`` uses the cyclic property of the trace with ε of
  the bottleneck's width, lowering variance. A field offers this by declaring the
  ``bottleneck`` path and implementing ``split(t, x, cond) -> (h, g)`` (e.g. ``concatsquash``
  with ``bottleneck: true`` splits after its first layer).

Which of them runs, and whether through a fast path the field declares (its
``divergence_paths``: ``jacobian``, ``jvp``, ``bottleneck``), is decided in one place,
:func:`flowkit.fast_divergence.choose_strategy`.

RNODE (Finlay et al. 2020, eq. 4) regularises ``‖f‖²`` (kinetic energy) and
``‖J‖_F²``; the latter is ``‖J‖²_F`` exactly for ``exact`` and its unbiased
estimate ``‖εᵀJ‖²`` otherwise. :func:`divergence` returns it on request.

How ``J`` is obtained (``differentiate``):

* ``autograd`` (default) — reverse mode through the field's autograd graph. A field whose
  output has no graph back to ``x`` (computed under ``torch.no_grad()`` or
  ``torch.inference_mode()``, or ``.detach()``-ed) raises :class:`~flowkit.flow.FieldError`;
  its divergence is never silently taken as 0.
* ``finite_difference`` — needs no graph: ``J v ≈ (f(x + h v) − f(x − h v)) / 2h`` along
  each basis vector (``exact``, ``2D`` evaluations) or each probe (``hutchinson``, ``2P``),
  batched into few calls. Central differences have truncation error ``O(h²)`` and rounding
  error ``O(ε_mach / h)``; the step ``h = r max(1, ‖x‖_∞)`` per sample with the default
  ``r = ε_mach^{1/3}`` balances them, for a relative error of about ``ε_mach^{2/3}``
  (≈ 1e-10 in float64, ≈ 1e-5 in float32) for a field that varies on the scale of ``x``;
  :mod:`flowkit.likelihood` picks ``r`` per field from a ladder of steps. The field runs in
  its own dtype (a float32 model cannot be fed float64), the step actually taken (``x ± h v``
  after rounding) is measured, and the quotients are summed in float64. Forward mode is no
  alternative: ``inference_mode`` and ``.detach()`` switch it off too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from .fast_divergence import FastPaths, choose_strategy
from .flow import FieldError

__all__ = ["divergence", "Divergence", "sample_probe", "finite_difference_step", "ESTIMATORS", "NOISES",
           "DIFFERENTIATIONS"]

ESTIMATORS = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
DIFFERENTIATIONS = ("autograd", "finite_difference")

# rows per field call of the finite-difference divergence (at least the batch itself)
_FD_ROWS = 8192

NO_GRAPH = ("its output does not depend on x through autograd (it was computed under torch.no_grad() "
            "or torch.inference_mode(), or .detach()-ed)")


@dataclass
class Divergence:
    """Output of :func:`divergence`: ``dx`` = f(t, x), ``div`` = tr J per sample
    (shape ``[B]``), and ``jac_frobenius`` = (estimate of) ``‖J‖²_F`` per sample or None."""

    dx: Tensor
    div: Tensor
    jac_frobenius: Optional[Tensor] = None


def sample_probe(x: Tensor, noise: str = "rademacher", n_probes: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
    """Probe vectors ε with E[εεᵀ] = I, shape ``[n_probes, *x.shape]``."""
    shape = (n_probes, *x.shape)
    if noise == "gaussian":
        return torch.randn(shape, dtype=x.dtype, device=x.device, generator=generator)
    if noise == "rademacher":
        bits = torch.randint(0, 2, shape, device=x.device, generator=generator)
        return bits.to(x.dtype) * 2 - 1
    raise ValueError(f"unknown probe noise {noise!r}; choose one of: {', '.join(NOISES)}")


def divergence(
    fn: Callable[[Tensor, Tensor], Tensor],
    t: Tensor,
    x: Tensor,
    *,
    estimator: Literal["exact", "hutchinson"] = "exact",
    probe: Optional[Tensor] = None,
    create_graph: bool = False,
    frobenius: bool = False,
    split: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]] = None,
    jacobian: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    jvp: Optional[Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    differentiate: Literal["autograd", "finite_difference"] = "autograd",
    fd_step: Optional[float] = None,
    paths: Optional[FastPaths] = None,
    strategy: Optional[str] = None,
) -> Divergence:
    """Evaluate ``f(t, x)`` and the divergence ``tr ∂f/∂x`` per sample.

    Args:
        fn: field ``fn(t, x)``.
        t: scalar time.
        x: state ``[B, *event]``.
        estimator: ``"exact"`` or ``"hutchinson"``.
        probe: for Hutchinson, ``[P, B, *event]`` (or ``[B, *event]``) probes held fixed
            over a solve; for the bottleneck, probes of the bottleneck's shape.
        create_graph: keep the graph (training with direct backprop or adjoint).
        frobenius: also return ``‖J‖²_F`` (exact) or ``‖εᵀJ‖²`` (Hutchinson; ``‖Jε‖²`` with
            finite differences — equally unbiased).
        split: for the bottleneck estimator, ``split(t, x) -> (h, g)`` with ``f = g(h)``;
            ``probe`` then lives in the space of ``h``.
        jacobian: optional ``jacobian(t, x) -> (f, J)`` computing the Jacobian in the
            forward pass (e.g. ``ConcatSquashMLP.forward_with_jacobian``); used by ``exact``.
            Same values, and training needs no double backward.
        jvp: optional ``jvp(t, x, v) -> (f, J v)`` in one forward pass (forward mode, e.g.
            ``ConcatConvNet.forward_with_jvp``); Hutchinson then uses ``εᵀ(Jε)`` and
            ``‖Jε‖²`` — the same estimator with a first-order backward for training.
        differentiate: ``"autograd"`` or ``"finite_difference"`` (central differences, for a
            field without an autograd graph; ``split``, ``jacobian`` and ``jvp`` are then
            unused and Hutchinson probes live in the space of ``x``). Which of ``split``,
            ``jacobian``, ``jvp`` and the generic estimators runs is
            :func:`~flowkit.fast_divergence.choose_strategy`'s answer.
        fd_step: relative step ``r`` of the central differences (see
            :func:`finite_difference_step`; default ``ε_mach^{1/3}``).
        paths, strategy: instead of ``split``/``jacobian``/``jvp``, the field's bound
            :class:`~flowkit.fast_divergence.FastPaths`, and the strategy
            :func:`~flowkit.fast_divergence.choose_strategy` gave for these arguments — for a
            caller that evaluates the same field many times (the augmented ODE, once per solve).

    Returns:
        :class:`Divergence`.

    Raises:
        FieldError: with ``autograd``, when the field's output has no autograd graph back to
            ``x`` (the divergence would otherwise silently be 0).

    Example:
        >>> A = torch.tensor([[1., 2.], [3., 4.]])
        >>> out = divergence(lambda t, x: x @ A.T, torch.tensor(0.), torch.randn(5, 2))
        >>> out.div  # tr A = 5 for every sample
        tensor([5., 5., 5., 5., 5.])
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown divergence estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if differentiate not in DIFFERENTIATIONS:
        raise ValueError(f"unknown differentiate={differentiate!r}; choose one of: {', '.join(DIFFERENTIATIONS)}")
    if estimator == "hutchinson" and probe is None:
        raise ValueError("the Hutchinson estimator needs a probe (see sample_probe)")
    if paths is None:
        paths = FastPaths(jacobian=jacobian, jvp=jvp, split=split)
    jacobian, jvp, split = paths.jacobian, paths.jvp, paths.split
    if strategy is None:
        strategy = choose_strategy(estimator, paths.names, differentiate=differentiate, frobenius=frobenius,
                                   dim=math.prod(x.shape[1:]), device=x.device.type, create_graph=create_graph)
    if strategy == "finite_difference":
        return _finite_difference(fn, t, x, probe if estimator == "hutchinson" else None, create_graph, frobenius,
                                  fd_step)
    with torch.enable_grad():
        if strategy == "jacobian":
            dx, jac = _fast(jacobian(t, x), "jacobian")
            div = torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)
            return Divergence(dx, div, jac.pow(2).sum((-2, -1)) if frobenius else None)
        if strategy == "exact":
            return _exact(fn, t, x, create_graph, frobenius)
        if strategy == "exact_loop":
            return _exact_loop(fn, t, x, create_graph, frobenius)
        if strategy == "bottleneck":
            return _bottleneck(split, t, x, probe, create_graph)
        if strategy == "jvp":
            return _forward_mode(jvp, t, x, probe, frobenius)
        return _hutchinson(fn, t, x, probe, create_graph, frobenius)


def _fast(out, path: str):
    """The result of a fast path, which must be a pair of tensors."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise FieldError(f"the fast divergence path {path!r} returned {type(out).__name__}, expected a pair "
                         f"of tensors; a network declares in divergence_paths only the paths it computes for "
                         f"every input")
    return out


def _exact(fn, t, x, create_graph, frobenius) -> Divergence:
    """All rows of J: one forward pass, then D vector–Jacobian products with the one-hot
    basis batched through ``is_grads_batched`` (vmap over the backward), no Python loop."""
    batch, dim = x.shape[0], x[0].numel()
    if not x.requires_grad:
        x = x.requires_grad_(True)
    out = fn(t, x)
    _require_graph(out)
    basis = torch.eye(dim, dtype=x.dtype, device=x.device)
    basis = basis[:, None, :].expand(dim, batch, dim).reshape(dim, *x.shape)
    try:
        rows = _grad(out, x, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: fall back to a loop over rows
        rows = torch.stack([_grad(out, x, b, create_graph=create_graph, retain_graph=True) for b in basis])
    rows = rows.reshape(dim, batch, dim)  # rows[i, b] = e_iᵀ J_b
    div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1)  # [B]
    frob = rows.pow(2).sum((0, 2)) if frobenius else None
    return Divergence(out, div, frob)


def _exact_loop(fn, t, x, create_graph, frobenius) -> Divergence:
    """The diagonal of J by ``D`` separate vector–Jacobian products (one backward pass per
    basis vector, the graph kept between them): at large ``D`` on a CPU cheaper than one batched
    backward (:data:`~flowkit.fast_divergence.EXACT_TRACE_BY_DIM`)."""
    batch, dim = x.shape[0], x[0].numel()
    if not x.requires_grad:
        x = x.requires_grad_(True)
    out = fn(t, x)
    _require_graph(out)
    flat = out.reshape(batch, dim)
    div = x.new_zeros(batch)
    frob = x.new_zeros(batch) if frobenius else None
    for i in range(dim):
        row = _grad(flat[:, i].sum(), x, None, create_graph=create_graph, retain_graph=True).reshape(batch, dim)
        div = div + row[:, i]
        if frobenius:
            frob = frob + row.pow(2).sum(1)
    return Divergence(out, div, frob)


def _forward_mode(jvp, t, x, probe, frobenius) -> Divergence:
    """Hutchinson by forward mode: ``εᵀ(Jε)`` and ``‖Jε‖²`` from ``jvp(t, x, ε) -> (f, Jε)``.

    Several probes go through one pass: ``jvp`` is mapped over them by ``torch.func.vmap``,
    which evaluates ``f`` once and only the tangent computations per probe."""
    probes = probe if probe.dim() == x.dim() + 1 else probe.unsqueeze(0)
    if probes.shape[0] == 1:
        dx, jv = _fast(jvp(t, x, probes[0]), "jvp")
        jv = jv.unsqueeze(0)
    else:
        dx, jv = torch.func.vmap(lambda eps: _fast(jvp(t, x, eps), "jvp"), out_dims=(None, 0))(probes)
    div = (jv * probes).flatten(2).sum(-1).mean(0)
    return Divergence(dx, div, jv.flatten(2).pow(2).sum(-1).mean(0) if frobenius else None)


def _hutchinson(fn, t, x, probe, create_graph, frobenius) -> Divergence:
    if not x.requires_grad:
        x = x.requires_grad_(True)
    out = fn(t, x)
    probes = probe if probe.dim() == x.dim() + 1 else probe.unsqueeze(0)
    n = probes.shape[0]
    _require_graph(out)
    if n == 1:
        vjp = _grad(out, x, probes[0], create_graph=create_graph).unsqueeze(0)
    else:
        vjp = _grad(out, x, probes, create_graph=create_graph, is_grads_batched=True)
    div = (vjp * probes).flatten(2).sum(-1).mean(0)
    frob = vjp.flatten(2).pow(2).sum(-1).mean(0) if frobenius else None
    return Divergence(out, div, frob)


def _bottleneck(split, t, x, probe, create_graph) -> Divergence:
    """``tr(J_g J_h) = tr(J_h J_g) = E[εᵀ J_h J_g ε]`` with ε of the bottleneck's width H
    (FFJORD appendix E), for ``f = g(h(x))``, ``h: R^D → R^H``. Two reverse passes:
    ``u = εᵀ J_h`` then ``v = uᵀ J_g``; the estimate is ``v · ε``. (No ``‖J‖²_F``:
    :func:`~flowkit.fast_divergence.choose_strategy` refuses it with a bottleneck.)"""
    if not x.requires_grad:
        x = x.requires_grad_(True)
    h, g = split(t, x)
    _require_graph(h)
    out = g(h)
    probes = probe if probe.dim() == h.dim() + 1 else probe.unsqueeze(0)
    if probes.shape[0] == 1:  # one probe: plain reverse passes
        u = torch.autograd.grad(h, x, probes[0], create_graph=True)[0]
        v = torch.autograd.grad(out, h, u, create_graph=create_graph, retain_graph=True)[0].unsqueeze(0)
    else:  # all probes in one batched pass each (vmap over the backward)
        u = torch.autograd.grad(h, x, probes, create_graph=True, is_grads_batched=True)[0]
        v = torch.autograd.grad(out, h, u, create_graph=create_graph, retain_graph=True, is_grads_batched=True)[0]
    return Divergence(out, (v * probes).flatten(2).sum(-1).mean(0), None)


def _require_graph(out: Tensor) -> None:
    if not out.requires_grad:
        raise FieldError(f"cannot take the divergence of the field by autograd: {NO_GRAPH}, so it would "
                         "silently be 0; call the field with gradients enabled, or pass "
                         "differentiate='finite_difference'")


def _grad(out: Tensor, x: Tensor, grad_outputs: Tensor, **options) -> Tensor:
    """``torch.autograd.grad`` of ``out`` w.r.t. ``x``; an ``x`` the graph never reached is an error."""
    grad = torch.autograd.grad(out, x, grad_outputs, allow_unused=True, **options)[0]
    if grad is None:
        raise FieldError(f"cannot take the divergence of the field by autograd: {NO_GRAPH} (its graph "
                         "reaches parameters but not x); call the field with gradients enabled, or pass "
                         "differentiate='finite_difference'")
    return grad


def finite_difference_step(x: Tensor, relative: Optional[float] = None) -> Tensor:
    """The central-difference step per sample, ``h = r max(1, ‖x_b‖_∞)``, shape ``[B]``.

    The default ``r = ε_mach^{1/3}`` balances the ``O(h²)`` truncation error against the
    ``O(ε_mach / h)`` rounding error of a central difference for a field that varies on the
    scale of ``x``; scaling by ``‖x_b‖_∞`` keeps ``x ± h v`` distinguishable from ``x`` for large
    inputs. :func:`flowkit.likelihood.log_likelihood` picks ``r`` per field from a ladder of
    steps (the one with the smallest estimated error).
    """
    r = torch.finfo(x.dtype).eps ** (1 / 3) if relative is None else float(relative)
    return r * x.detach().flatten(1).abs().amax(1).clamp_min(1.0)


def _finite_difference(fn, t, x, probe, create_graph, frobenius, relative) -> Divergence:
    """``J v ≈ (f(x + h v) − f(x − h v)) / (2h)`` for every basis vector ``v = e_i`` (``probe``
    None: the exact trace ``Σ_i (J e_i)_i``) or every probe (Hutchinson: the mean of ``εᵀ J ε``);
    ``‖J‖²_F`` as ``Σ_i ‖J e_i‖²`` or the mean of ``‖J ε‖²``. Directions are stacked along the
    batch, at most ``_FD_ROWS`` rows per call (the condition of an augmented field repeats)."""
    batch, event = x.shape[0], tuple(x.shape[1:])
    dim = x[0].numel()
    if probe is not None:
        probes = probe if probe.dim() == x.dim() + 1 else probe.unsqueeze(0)
        if tuple(probes.shape[1:]) != tuple(x.shape):
            raise FieldError(f"probe: the finite-difference divergence needs probes shaped like x "
                             f"{tuple(x.shape)} (or [n_probes, *x.shape]), got {tuple(probe.shape)}")
        n_dirs = probes.shape[0]
    else:
        n_dirs = dim
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        x = x if create_graph else x.detach()
        out = fn(t, x)
        h = finite_difference_step(x, relative).to(x.dtype).view(1, batch, *([1] * len(event)))
        div = torch.zeros(batch, dtype=torch.float64, device=x.device)
        frob = torch.zeros_like(div) if frobenius else None
        per_call = max(1, _FD_ROWS // (2 * batch))
        for start in range(0, n_dirs, per_call):
            stop = min(n_dirs, start + per_call)
            if probe is None:
                v = torch.zeros(stop - start, dim, dtype=x.dtype, device=x.device)
                v[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                v = v[:, None, :].expand(-1, batch, -1).reshape(stop - start, batch, *event)
            else:
                v = probes[start:stop]
            k = v.shape[0]
            plus, minus = x.unsqueeze(0) + h * v, x.unsqueeze(0) - h * v
            f = fn(t, torch.cat([plus, minus]).reshape(2 * k * batch, *event))
            if tuple(f.shape) != (2 * k * batch, *event):
                raise FieldError(f"the field returned shape {tuple(f.shape)} for a batch of shape "
                                 f"{(2 * k * batch, *event)}; it must return dx/dt shaped like its input")
            f_plus, f_minus = f.reshape(2, k, batch, dim).double().unbind(0)
            vv = v.reshape(k, batch, dim).double()
            # the step actually taken along v, after rounding x ± h v to the field's dtype
            taken = ((plus - minus).reshape(k, batch, dim).double() * vv).sum(-1) / vv.pow(2).sum(-1).clamp_min(1e-300)
            jv = (f_plus - f_minus) / taken.unsqueeze(-1)  # [k, B, D]
            div = div + (jv * vv).sum(-1).sum(0)
            if frobenius:
                frob = frob + jv.pow(2).sum(-1).sum(0)
    if probe is not None:
        div = div / n_dirs
        frob = frob / n_dirs if frobenius else None
    return Divergence(out, div.to(x.dtype), frob.to(x.dtype) if frobenius else None)
