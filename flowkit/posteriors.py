r"""Approximate posteriors ``q(z | x)`` of a VAE: a diagonal Gaussian, optionally pushed through a flow.

Every family starts from the amortised diagonal Gaussian of Kingma & Welling (2014),
``z₀ = μ(h) + σ(h) ⊙ ε`` with ``ε ~ N(0, I)`` and ``h`` the encoder's features of ``x``, and
maps ``z₀`` through an invertible ``f(·; h)``:

.. math:: \log q(z_K \mid x) = \log \mathcal N(z_0; μ, \operatorname{diag} σ^2)
          - \log \left| \det \frac{\partial f}{\partial z_0} \right| .

==============  ==========================================================================
name            ``f``
==============  ==========================================================================
``gaussian``    the identity (no flow)
``planar``      ``K`` planar maps ``z + û h(wᵀz + b)`` with ``u, w, b`` output by the
                encoder (Rezende & Mohamed 2015, eq. 10–12; invertible by their appendix A.1)
``iaf``         ``K`` inverse autoregressive steps ``σ ⊙ z + (1 − σ) ⊙ m`` with ``[m, s]``
                from a MADE (Germain et al. 2015) fed ``z`` and the encoder's context
                (Kingma et al. 2016, eq. 10–11 and their numerically stable update)
``ffjord``      a continuous normalizing flow ``dz/dt = f(t, z; θ(x))`` whose weights are
                amortised: each layer is a shared time-concatenated linear map plus a rank-``r``
                update ``U(h) V(h)ᵀ`` and a bias ``c(h)`` output by the encoder
                (Grathwohl et al. 2019, §4.3); ``log det`` is ``∫ tr ∂f/∂z dt`` by
                :func:`flowkit.trace.divergence` (exact, or Hutchinson's estimate in training),
                integrated by :func:`flowkit.likelihood.integrate_augmented`
==============  ==========================================================================

A family is built from its recipe block alone (``posterior: {name: planar, flows: 8}``,
checked like every other component's arguments) and sized later by the VAE with
:meth:`Posterior.bind` (latent and context widths are the VAE's, not the recipe's).

References:
    Kingma & Welling (2014). Auto-Encoding Variational Bayes. ICLR.
    Rezende & Mohamed (2015). Variational Inference with Normalizing Flows. ICML.
    Germain, Gregor, Murray & Larochelle (2015). MADE: Masked Autoencoder for Distribution
    Estimation. ICML.
    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016). Improved Variational
    Inference with Inverse Autoregressive Flow. NeurIPS.
    Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud (2019). FFJORD: Free-form Continuous
    Dynamics for Scalable Reversible Generative Models. ICLR.

Example:
    >>> q = POSTERIORS.build("planar", flows=2).bind(latent=3, context=5)
    >>> z, log_q = q(torch.randn(4, 5), torch.randn(4, 3))
    >>> z.shape, log_q.shape
    (torch.Size([4, 3]), torch.Size([4]))
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .components import POSTERIORS
from .constraints import FiniteFloat, PositiveFloat, PositiveInt, Rule
from .solvers import ODEMethod, SolverSpec, StepCount, Tolerance, fixed_step_needs_steps

__all__ = ["POSTERIORS", "Posterior", "Gaussian", "Planar", "IAF", "CNF", "LowRankField", "MADE"]

_LOG_2PI = math.log(2 * math.pi)


class Posterior(nn.Module):
    """Base class: the amortised diagonal Gaussian ``q₀`` and a flow ``f(·; h)`` (identity here).

    Subclasses take their hyperparameters in the constructor (what a recipe sets), create
    their parameters in :meth:`_build` (called by :meth:`bind` once the widths are known) and
    override :meth:`transform`.

    Attributes:
        latent, context: widths of ``z`` and of the encoder's features ``h`` (set by :meth:`bind`).
        nfe: field evaluations of the last :meth:`transform` (0 for discrete flows).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.latent: Optional[int] = None
        self.context: Optional[int] = None
        self.nfe = 0

    def bind(self, latent: int, context: int) -> "Posterior":
        """Create the parameters for ``z ∈ R^latent`` and features ``h ∈ R^context``; returns self.

        Raises:
            ValueError: a width below 1, or a posterior bound twice.
        """
        if self.latent is not None:
            raise ValueError(f"{type(self).__name__} is already bound (latent={self.latent}, context={self.context})")
        for name, value in (("latent", latent), ("context", context)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"posterior {name} width must be an integer >= 1, got {value!r}")
        self.latent, self.context = latent, context
        self.loc = nn.Linear(context, latent)
        self.log_scale = nn.Linear(context, latent)
        self._build()
        return self

    def _build(self) -> None:
        """Create the flow's parameters (``self.latent`` and ``self.context`` are set)."""

    def base(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ)`` of ``q₀`` for features ``h`` ``[B, context]``."""
        if self.latent is None:
            raise ValueError(f"{type(self).__name__} has no parameters yet: call bind(latent, context) first")
        return self.loc(h), self.log_scale(h)

    def transform(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(z; h), log |det ∂f/∂z|)`` per sample; the identity for the plain Gaussian."""
        return z, z.new_zeros(z.shape[0])

    def forward(self, h: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """A posterior sample ``z`` and ``log q(z | x)`` for base noise ``eps`` ``[B, latent]``.

        ``z₀ = μ + σ ⊙ ε`` (reparameterised), ``z = f(z₀; h)`` and
        ``log q(z) = log N(z₀; μ, σ²) − log |det ∂f/∂z₀|``.
        """
        loc, log_scale = self.base(h)
        z0 = loc + log_scale.exp() * eps
        log_q0 = (-0.5 * eps.pow(2) - log_scale - 0.5 * _LOG_2PI).sum(-1)
        z, log_det = self.transform(z0, h)
        return z, log_q0 - log_det


@POSTERIORS.register("gaussian")
class Gaussian(Posterior):
    """Diagonal Gaussian ``N(μ(x), diag σ(x)²)``, no flow (Kingma & Welling 2014)."""

    def __init__(self) -> None:
        super().__init__()


@POSTERIORS.register("planar")
class Planar(Posterior):
    r"""Amortised planar flows (Rezende & Mohamed 2015, eq. 10–12).

    Each of ``flows`` steps is ``f(z) = z + û h(wᵀz + b)`` with ``h = tanh`` and
    ``log |det ∂f/∂z| = log |1 + ûᵀψ(z)|``, ``ψ(z) = h'(wᵀz + b) w`` (eq. 11–12). ``u, w, b``
    of every step are a linear function of the encoder's features. Invertibility (their
    appendix A.1): ``û = u + [m(wᵀu) − wᵀu] w / ‖w‖²`` with ``m(a) = −1 + log(1 + eᵃ)``, so
    that ``wᵀû = m(wᵀu) > −1`` and ``1 + ûᵀψ > 0``.

    Args:
        flows: number of planar steps ``K``.
    """

    def __init__(self, flows: PositiveInt = 4) -> None:
        super().__init__()
        _positive_int("posterior.flows", flows)
        self.flows = flows

    def _build(self) -> None:
        self.amortise = nn.Linear(self.context, self.flows * (2 * self.latent + 1))

    def transform(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        d = self.latent
        params = self.amortise(h).view(h.shape[0], self.flows, 2 * d + 1)
        log_det = z.new_zeros(z.shape[0])
        for k in range(self.flows):
            u, w, b = params[:, k, :d], params[:, k, d:2 * d], params[:, k, 2 * d]
            wu = (w * u).sum(-1, keepdim=True)
            u_hat = u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
            act = torch.tanh((w * z).sum(-1) + b)
            z = z + u_hat * act.unsqueeze(-1)
            psi_u = (1 - act.pow(2)) * (w * u_hat).sum(-1)  # ûᵀψ(z)
            log_det = log_det + torch.log(torch.abs(1 + psi_u))
        return z, log_det


class MADE(nn.Module):
    """Masked MLP ``z ↦ (m, s)`` with output ``i`` a function of inputs before ``i`` in ``order``
    (Germain et al. 2015) and of an unmasked context added to the first hidden layer.

    Hidden unit degrees cycle over ``1 … D − 1``; a hidden unit of degree ``k`` sees inputs of
    degree ``≤ k`` and feeds outputs of degree ``> k``. With ``D = 1`` the outputs depend on the
    context alone.
    """

    def __init__(self, latent: int, context: int, hidden: Sequence[int], order: Tensor,
                 act: Literal["elu", "relu", "tanh"] = "elu") -> None:
        super().__init__()
        degree_in = torch.empty(latent, dtype=torch.long)
        degree_in[order] = torch.arange(1, latent + 1)
        degrees = [degree_in]
        for width in hidden:
            degrees.append(torch.arange(width) % max(1, latent - 1) + 1)
        self.layers = nn.ModuleList()
        for i, width in enumerate(hidden):
            self.layers.append(nn.Linear(degrees[i].numel(), width))
            self.register_buffer(f"mask{i}", (degrees[i + 1][:, None] >= degrees[i][None, :]).float())
        last = degrees[-1]
        self.out = nn.Linear(last.numel(), 2 * latent)
        out_mask = (degree_in[:, None] > last[None, :]).float()
        self.register_buffer("mask_out", torch.cat([out_mask, out_mask]))
        self.context = nn.Linear(context, hidden[0]) if hidden else nn.Linear(context, 2 * latent)
        self.act = {"elu": nn.ELU(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[act]
        self.latent = latent

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        x = z
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight * getattr(self, f"mask{i}"), layer.bias)
            if i == 0:
                x = x + self.context(h)
            x = self.act(x)
        out = F.linear(x, self.out.weight * self.mask_out, self.out.bias)
        if not self.layers:
            out = out + self.context(h)
        return out[:, :self.latent], out[:, self.latent:]


@POSTERIORS.register("iaf")
class IAF(Posterior):
    r"""Inverse autoregressive flow (Kingma et al. 2016, eq. 10–11) with context from the encoder.

    Each of ``flows`` steps computes ``[m, s] = MADE(z, h)`` and, in the numerically stable
    form the paper recommends, ``σ = sigmoid(s + forget_bias)``,
    ``z ← σ ⊙ z + (1 − σ) ⊙ m``; since ``∂m_i/∂z_j = ∂σ_i/∂z_j = 0`` for ``j ≥ i`` the Jacobian
    is triangular and ``log |det| = Σ_i log σ_i``. The variable order is reversed between steps.

    Args:
        flows: number of IAF steps.
        hidden: the MADE's hidden widths (each ``≥ 1``; at least one layer).
        forget_bias: added to ``s`` so that ``σ = sigmoid(s + forget_bias)`` starts near 1, as the paper
            advises (+1 or +2). With 2, ``σ ≈ 0.88`` at initialisation; with 1 (``σ ≈ 0.73``) four steps
            shrink ``z`` by ``0.73⁴ ≈ 0.28`` at the start, and on the binarised digits the posterior
            then collapsed onto the prior (KL ≈ 0.2–0.5 nats after 500 steps against ≈ 1.6 with 2).
    """

    def __init__(self, flows: PositiveInt = 2, hidden: Sequence[PositiveInt] = (64,),
                 forget_bias: FiniteFloat = 2.0) -> None:
        super().__init__()
        _positive_int("posterior.flows", flows)
        hidden = list(hidden)
        if not hidden:
            raise ValueError("posterior.hidden: IAF needs at least one hidden layer in its MADE, e.g. [64]")
        for width in hidden:
            _positive_int("posterior.hidden", width)
        if not math.isfinite(forget_bias):
            raise ValueError(f"posterior.forget_bias: must be a finite number, got {forget_bias!r}")
        self.flows, self.hidden, self.forget_bias = flows, hidden, float(forget_bias)

    def _build(self) -> None:
        d = self.latent
        forward_order, reverse_order = torch.arange(d), torch.arange(d - 1, -1, -1)
        self.steps = nn.ModuleList(
            MADE(d, self.context, self.hidden, forward_order if k % 2 == 0 else reverse_order)
            for k in range(self.flows))

    def transform(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        log_det = z.new_zeros(z.shape[0])
        for step in self.steps:
            m, s = step(z, h)
            s = s + self.forget_bias
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det


class LowRankField(nn.Module):
    r"""``f(t, z; θ(h))``: an MLP whose layer ``l`` is
    ``y = W_l [x; t] + b_l + U_l V_lᵀ x + c_l`` with ``U_l, V_l, c_l`` read from ``cond``.

    ``cond`` ``[B, n_params]`` holds, per sample and layer, ``U_l`` (``out × rank``), ``V_l``
    (``in × rank``) and ``c_l`` (``out``), in that order — the amortised part; ``W_l, b_l`` are
    shared. This is the field signature of every flowkit field, ``field(t, x, cond)``.

    Args:
        latent: width of ``z``.
        hidden: hidden widths.
        rank: rank of each amortised weight update.
        act: ``softplus`` or ``tanh`` between layers (smooth, for the trace).
    """

    def __init__(self, latent: int, hidden: Sequence[int], rank: int,
                 act: Literal["softplus", "tanh"] = "softplus") -> None:
        super().__init__()
        self.dims = [latent, *hidden, latent]
        self.rank = rank
        self.base = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(self.dims[:-1], self.dims[1:]))
        self.act = nn.Softplus() if act == "softplus" else nn.Tanh()
        self.n_params = sum(rank * (a + b) + b for a, b in zip(self.dims[:-1], self.dims[1:]))

    def forward(self, t: Tensor, z: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        tcol = t.expand(z.shape[0], 1) if t.dim() == 0 else t.reshape(-1, 1).expand(z.shape[0], 1)
        x, offset, r = z, 0, self.rank
        last = len(self.base) - 1
        for i, (layer, a, b) in enumerate(zip(self.base, self.dims[:-1], self.dims[1:])):
            u = cond[:, offset:offset + b * r].reshape(-1, b, r)
            offset += b * r
            v = cond[:, offset:offset + a * r].reshape(-1, a, r)
            offset += a * r
            c = cond[:, offset:offset + b]
            offset += b
            low_rank = torch.einsum("bor,br->bo", u, torch.einsum("bir,bi->br", v, x))
            y = layer(torch.cat([x, tcol], -1)) + low_rank + c
            x = y if i == last else self.act(y)
        return x


@POSTERIORS.register("ffjord")
class CNF(Posterior):
    r"""FFJORD posterior (Grathwohl et al. 2019, §4.3): ``q₀`` carried by an amortised CNF.

    ``z(0) = z₀`` is integrated over ``[0, 1]`` through ``blocks`` CNF blocks, each the
    time-rescaled field ``T · f(T s, z; θ(x))`` (end time ``T``, learnable) of a
    :class:`LowRankField` whose per-sample weights ``θ(x)`` are a linear function of the encoder's
    features (a hyper-network, one per block). By the instantaneous change of variables
    (Chen et al. 2018, Thm. 1)

    .. math:: \log q(z(T)) = \log q_0(z_0) - \int_0^T \operatorname{tr}\frac{\partial f}{\partial z}\,dt,

    with the trace from :func:`flowkit.trace.divergence` — ``exact``, or Hutchinson's estimate
    (FFJORD eq. 4, probe fixed over the solve) in training; evaluation (``eval()`` mode) always
    uses the exact trace, so importance-weighted bounds are not biased by the estimator.

    Args:
        blocks: number of CNF blocks.
        hidden: hidden widths of the field.
        rank: rank of the amortised weight updates.
        activation: ``softplus`` or ``tanh``.
        end_time, learn_end_time: initial ``T`` of each block, and whether it is trained.
        divergence, noise: the training-time trace estimator and Hutchinson's probe distribution.
        method, steps, rtol, atol: the ODE solver (one :class:`~flowkit.solvers.SolverSpec`): a
            fixed-step method (``rk4`` with ``steps``) or an adaptive one (``dopri5``).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (fixed_step_needs_steps,)

    def __init__(self, blocks: PositiveInt = 1, hidden: Sequence[PositiveInt] = (64, 64), rank: PositiveInt = 1,
                 activation: Literal["softplus", "tanh"] = "softplus", end_time: PositiveFloat = 0.5,
                 learn_end_time: bool = True, divergence: Literal["exact", "hutchinson"] = "exact",
                 noise: Literal["rademacher", "gaussian"] = "rademacher", method: ODEMethod = "dopri5",
                 steps: Optional[StepCount] = None, rtol: Tolerance = 1e-5, atol: Tolerance = 1e-5) -> None:
        super().__init__()
        self.solver = SolverSpec(method, rtol=rtol, atol=atol, steps=steps)  # bad settings fail here
        _positive_int("posterior.blocks", blocks)
        _positive_int("posterior.rank", rank)
        for width in hidden:
            _positive_int("posterior.hidden", width)
        if not (isinstance(end_time, (int, float)) and math.isfinite(end_time) and end_time > 0):
            raise ValueError(f"posterior.end_time: must be a finite number > 0, got {end_time!r}")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"posterior.divergence: must be exact or hutchinson, got {divergence!r}")
        self.n_blocks, self.hidden, self.rank = blocks, list(hidden), rank
        self.activation, self.end_time, self.learn_end_time = activation, float(end_time), learn_end_time
        self.divergence, self.noise = divergence, noise

    def _build(self) -> None:
        fields = [LowRankField(self.latent, self.hidden, self.rank, self.activation) for _ in range(self.n_blocks)]
        self.blocks = nn.ModuleList(_EndTime(f, self.end_time, self.learn_end_time) for f in fields)
        self.hypers = nn.ModuleList(nn.Linear(self.context, f.n_params) for f in fields)
        with torch.no_grad():  # start near the shared field: small amortised updates
            for hyper in self.hypers:
                hyper.weight.mul_(0.1)
                hyper.bias.zero_()

    def transform(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        from .likelihood import integrate_augmented

        estimator = self.divergence if self.training else "exact"
        # each block reads its own amortised weights; one integrator of the augmented ODE
        segments = [(lambda t, x, b=block, c=hyper(h): b(t, x, c), 0.0, 1.0)
                    for block, hyper in zip(self.blocks, self.hypers)]
        sol = integrate_augmented(segments, z, estimator=estimator, noise=self.noise, solver=self.solver,
                                  create_graph=torch.is_grad_enabled())
        self.nfe = sol.nfe
        return sol.z, sol.delta


class _EndTime(nn.Module):
    """``T · f(T s, z, cond)`` on ``s ∈ [0, 1]`` with ``T = exp(log_T)``: the end time as an ordinary
    (optionally trained) parameter, as :class:`flowkit.objectives.ffjord.TimeScaledField` does for
    FFJORD's blocks (kept plain here: the low-rank field offers no fast divergence path)."""

    def __init__(self, field: nn.Module, end_time: float, learn: bool) -> None:
        super().__init__()
        self.field = field
        log_t = torch.tensor(math.log(end_time))
        if learn:
            self.log_end_time = nn.Parameter(log_t)
        else:
            self.register_buffer("log_end_time", log_t)

    def forward(self, s: Tensor, z: Tensor, cond: Tensor) -> Tensor:
        scale = self.log_end_time.exp().to(z.dtype)
        return scale * self.field(s * scale, z, cond)


def _positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: must be an integer >= 1, got {value!r}")
