r"""Reverse-SDE samplers: integrate the time reversal of a flow's forward SDE.

For the forward SDE ``dx = f(t, x) dt + g(t) dw`` the reverse-time SDE (Anderson 1982;
Song et al. 2021, eq. 6)

.. math::  dx = \big[f(t, x) - g(t)^2\, \nabla_x \log p_t(x)\big]\, dt + g(t)\, d\bar w

run from ``t1`` down to ``t0`` carries the prior to data. Both samplers here step
through the same grid of ``steps`` steps (below: the flow's declared grid unless given) and
need a flow with ``score``, ``drift`` and ``diffusion`` (e.g.
:func:`flowkit.diffusion.flow_from_score`):

* ``euler_maruyama`` — ``x ← x + [f − g² s] h + g sqrt(|h|) z`` (Kloeden & Platen 1992);
* ``predictor_corrector`` — the same predictor preceded at each time by Langevin
  corrector steps (Song et al. 2021, Algorithms 4 and 5).

``euler_maruyama`` also integrates the whole family of SDEs that share the reverse SDE's
marginals (Zhang & Chen 2021, eq. 16),

.. math::  dx = \Big[f(t, x) - \frac{1 + \lambda^2}{2}\, g(t)^2\, \nabla_x \log p_t(x)\Big]\, dt
           + \lambda\, g(t)\, d\bar w, \qquad \lambda \ge 0,

selected by ``noise_scale`` (λ): λ = 1 is the reverse SDE above, λ = 0 the probability-flow
ODE (Euler steps), values in between trade stochasticity for smoothness. Every member
has the forward SDE's marginals ``p_t`` when the score is exact (the Fokker–Planck equation
gains ``λ²/2 g² Δp`` from the noise and loses the same from the extra drift).

The grid. Both samplers take ``steps`` and ``grid_power`` (β), which space the times as
``t0 + (t1 − t0)(k/steps)^β`` — uniform for β = 1, DiffFlow's ``L_β`` grid (Zhang & Chen 2021,
Sec. 3.3) for a model trained on it. Left unset, they come from the flow's declared
:class:`~flowkit.flow.TimeGrid` (DiffFlow declares the grid it was trained on), else 500
uniform steps (:func:`sde_grid`, the one place the grid is chosen).

``denoise=True`` ends with Tweedie's ``E[x_data | x_{t0}]`` via ``flow.denoise``; a flow
without a denoiser instead takes the last step without noise (its mean update), as Song
et al.'s reference samplers do. ``guidance`` (w) applies classifier-free guidance
(:func:`flowkit.flow.guided`) to the score. ``nfe`` counts score evaluations (a guided
evaluation is one batched call).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch import Tensor

from ..components import SAMPLERS
from ..constraints import FiniteFloat, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Rule, Seed
from ..flow import Flow, TimeGrid, guided
from .base import SampleResult, declare

__all__ = ["euler_maruyama", "predictor_corrector", "sde_grid"]

_BACKENDS = ("loop", "torchsde")

#: what both samplers use from a flow (``denoise`` too when the flow has one)
SDE_NEEDS = ("score", "drift", "diffusion")

#: ``steps`` of both samplers for a flow that declares no :class:`~flowkit.flow.TimeGrid`
DEFAULT_STEPS = 500

_torchsde_uniform = Rule(("grid_power", "backend"),
                         lambda a: a["backend"] != "torchsde" or a["grid_power"] in (None, 1.0),
                         "backend 'torchsde' takes uniform steps (grid_power 1); use backend 'loop' with "
                         "grid_power {grid_power!r}")


def _call(fn: Callable[..., Tensor], t: Tensor, x: Tensor, cond: Optional[Tensor]) -> Tensor:
    return fn(t, x) if cond is None else fn(t, x, cond)


class _Reverse:
    """The pieces of the reverse SDE of ``flow`` with a (guided) score, counting NFE."""

    def __init__(self, flow: Flow, cond: Optional[Tensor], guidance: float, by: str,
                 noise_scale: float = 1.0) -> None:
        flow.require("score", "drift", "diffusion", by=by)
        self.flow, self.cond = flow, cond
        self.noise_scale = float(noise_scale)
        self.score_weight = 0.5 * (1.0 + self.noise_scale**2)  # (1 + λ²)/2 of eq. 16
        self.score_fn = guided(flow.score, guidance) if guidance else flow.score
        self.denoise_fn = None
        if flow.denoise is not None:
            self.denoise_fn = guided(flow.denoise, guidance) if guidance else flow.denoise
        self.nfe = 0

    def score(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return _call(self.score_fn, t, x, self.cond)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """Reverse-time drift ``f(t, x) − (1 + λ²)/2 · g(t)² s(t, x)`` (times ``dt < 0``);
        ``f − g² s`` for the default λ = 1."""
        g = self.flow.diffusion(t)
        score = self.score(t, x)
        weight = g**2 if self.score_weight == 1.0 else self.score_weight * g**2
        return _call(self.flow.drift, t, x, self.cond) - weight * score

    def noise_std(self, t: Tensor) -> Tensor:
        """``λ g(t)``, the reverse SDE's diffusion coefficient."""
        g = self.flow.diffusion(t)
        return g if self.noise_scale == 1.0 else self.noise_scale * g

    def step(self, t: Tensor, x: Tensor, h: Tensor, noise: Optional[Tensor]) -> Tensor:
        """One Euler–Maruyama step of size ``h < 0``; ``noise=None`` gives the mean update."""
        mean = x + self.drift(t, x) * h
        if noise is None:
            return mean
        return mean + self.noise_std(t) * (-h).sqrt() * noise

    def finish(self, t0: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return _call(self.denoise_fn, t0, x, self.cond)


def _generator(seed: Optional[int], x: Tensor) -> Optional[torch.Generator]:
    return None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))


def sde_grid(flow: Flow, steps: Optional[int] = None, grid_power: Optional[float] = None) -> TimeGrid:
    """The grid both reverse-SDE samplers step through: ``steps`` and ``grid_power`` where
    given, else those of the flow's declared :attr:`~flowkit.flow.Flow.time_grid`, else
    :data:`DEFAULT_STEPS` uniform steps.

    Raises:
        ValueError: ``steps`` not an integer ``>= 1`` or ``grid_power`` not ``> 0``.

    Example:
        >>> from flowkit.flow import Flow, StandardNormal
        >>> flow = Flow(velocity=None, prior=StandardNormal((2,)), time_grid=TimeGrid(30, 0.9))
        >>> sde_grid(flow), sde_grid(flow, steps=4)
        (TimeGrid(steps=30, power=0.9), TimeGrid(steps=4, power=0.9))
    """
    _check(1 if steps is None else steps, **({} if grid_power is None else {"grid_power": grid_power}))
    declared = flow.time_grid or TimeGrid(DEFAULT_STEPS)
    return TimeGrid(int(declared.steps if steps is None else steps),
                    float(declared.power if grid_power is None else grid_power))


def _tweedie(flow: Flow, settings: Mapping[str, Any]) -> bool:
    """Whether a sampler with ``settings`` ends with the flow's denoiser (one more evaluation)."""
    return bool(settings["denoise"]) and flow.denoise is not None


def _euler_maruyama_evaluations(flow: Flow, steps: int, settings: Mapping[str, Any]) -> int:
    """One score a step, one denoiser call for Tweedie, and with ``backend="torchsde"`` the drift
    evaluation ``sdeint`` makes to check shapes (none where it has no step to take: one step,
    taken noise-free by the loop)."""
    tweedie = _tweedie(flow, settings)
    torchsde_steps = steps - int(bool(settings["denoise"]) and not tweedie)
    return steps + int(tweedie) + int(settings["backend"] == "torchsde" and torchsde_steps > 0)


def _predictor_corrector_evaluations(flow: Flow, steps: int, settings: Mapping[str, Any]) -> int:
    """``1 + corrector_steps`` scores a step, and one denoiser call for Tweedie."""
    return steps * (1 + int(settings["corrector_steps"])) + int(_tweedie(flow, settings))


def _check(steps: int, **positive: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@SAMPLERS.register("euler_maruyama")
@declare(needs=SDE_NEEDS, evaluations=_euler_maruyama_evaluations, argument_rules=(_torchsde_uniform,))
def euler_maruyama(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: Optional[PositiveInt] = None,
                   denoise: bool = True, guidance: FiniteFloat = 0.0, seed: Optional[Seed] = None,
                   backend: Literal["loop", "torchsde"] = "loop", noise_scale: NonNegativeFloat = 1.0,
                   grid_power: Optional[PositiveFloat] = None) -> SampleResult:
    r"""Euler–Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6), ``steps`` steps.

    ``x_{i+1} = x_i + [f(t_i, x_i) − g(t_i)² s(t_i, x_i)] h_i + g(t_i) sqrt(−h_i) z_i`` with
    ``h_i = t_{i+1} − t_i < 0`` on the grid :func:`sde_grid` (``h = (t0 − t1)/steps`` where
    uniform), from ``x`` at ``t1`` to ``t0``. With ``noise_scale`` λ the step
    is that of the marginal-equivalent SDE (Zhang & Chen 2021, eq. 16):
    ``x_{i+1} = x_i + [f − (1 + λ²)/2 · g² s] h + λ g sqrt(−h) z_i``.

    ``backend="torchsde"`` solves the same SDE with ``torchsde.sdeint(method="euler")``.
    torchsde needs increasing times, so it integrates ``y(u) = x(t1 + t0 − u)`` for
    ``u ∈ [t0, t1]``: ``dy = −[f − g² s](t1 + t0 − u, y) du + g(t1 + t0 − u) dW_u`` (the
    reversed Brownian motion is again a Brownian motion). The update is the same
    Euler–Maruyama step, driven by torchsde's Brownian interval instead of ``torch.randn``,
    so the two backends agree in distribution, not sample by sample. The plain loop is
    faster (no Brownian-tree bookkeeping); torchsde also evaluates the drift once more to
    check shapes, which ``nfe`` counts.

    Args:
        flow: a flow with ``score``, ``drift`` and ``diffusion``.
        x: samples of the prior at ``flow.t1``, ``[B, *event]``.
        cond: optional condition.
        steps: number of steps (= score evaluations); ``None``: the flow's
            ``time_grid.steps``, or 500 for a flow without one.
        denoise: finish with ``flow.denoise`` (Tweedie), or without a denoiser take the
            last step noise-free.
        guidance: classifier-free guidance scale w on the score.
        seed: seeds the noise (``None``: torch's global generator).
        backend: ``"loop"`` or ``"torchsde"``.
        noise_scale: λ ≥ 0 of eq. 16: 1 is the reverse SDE, 0 the probability-flow ODE.
        grid_power: β > 0; times ``t0 + (t1 − t0)(k/steps)^β`` (1: uniform; DiffFlow's
            ``L_β`` grid otherwise); ``None``: the flow's ``time_grid.power``, or 1 for a
            flow without one. The ``torchsde`` backend needs uniform steps.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe`` score evaluations: ``steps``,
        +1 for the Tweedie step, +1 for torchsde's shape check.

    Example:
        >>> from flowkit.flow import Flow, StandardNormal
        >>> one = lambda t: torch.ones_like(torch.as_tensor(t))
        >>> flow = Flow(velocity=lambda t, x, c=None: -0.5 * x, prior=StandardNormal((2,)),
        ...             score=lambda t, x, c=None: -x, drift=lambda t, x, c=None: 0 * x,
        ...             diffusion=one)
        >>> euler_maruyama(flow, torch.randn(4, 2), steps=10, noise_scale=0.5).x.shape
        torch.Size([4, 2])
    """
    grid = sde_grid(flow, steps, grid_power)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(_BACKENDS)}")
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale (λ) must be >= 0, got {noise_scale!r}")
    if backend == "torchsde" and grid.power != 1.0:
        source = "" if grid_power is not None else " (the flow's declared time_grid)"
        raise ValueError(f"backend='torchsde' takes uniform steps; use backend='loop' with grid_power "
                         f"{grid.power!r}{source}, or set grid_power: 1.0")
    rev = _Reverse(flow, cond, guidance, by="euler_maruyama", noise_scale=noise_scale)
    steps = grid.steps
    times = grid.times(flow.t0, flow.t1, x)
    tweedie = denoise and rev.denoise_fn is not None
    quiet_last = denoise and not tweedie  # the fallback: last step without noise
    gen = _generator(seed, x)
    with torch.no_grad():
        start = 0
        if backend == "torchsde":  # all noisy steps by torchsde, a quiet last one below
            start = steps - 1 if quiet_last else steps
            x = _torchsde_euler(rev, x, times, start, seed, gen)
        for i in range(start, steps):
            t, h = times[i], times[i + 1] - times[i]
            quiet = (quiet_last and i == steps - 1) or rev.noise_scale == 0.0
            z = None if quiet else torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
            x = rev.step(t, x, h, z)
        if tweedie:
            x = rev.finish(times[-1], x)
    return SampleResult(x, rev.nfe)


class _TimeReversedSDE(torch.nn.Module):
    """``dy = −[f − (1+λ²)/2 g² s](t1 + t0 − u, y) du + λ g(t1 + t0 − u) dW_u`` on flat ``y``
    for torchsde (λ = 1: the reverse SDE)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, rev: _Reverse, shape: tuple[int, ...], t_sum: float) -> None:
        super().__init__()
        self.rev, self.shape, self.t_sum = rev, shape, t_sum

    def f(self, u: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(-1, *self.shape)
        return -self.rev.drift(self.t_sum - u, x).reshape(y.shape)

    def g(self, u: Tensor, y: Tensor) -> Tensor:
        return torch.as_tensor(self.rev.noise_std(self.t_sum - u), dtype=y.dtype, device=y.device).expand_as(y)


def _torchsde_euler(rev: _Reverse, x: Tensor, times: Tensor, n: int, seed: Optional[int],
                    gen: Optional[torch.Generator]) -> Tensor:
    """The first ``n`` reverse steps (grid ``times``) with ``torchsde.sdeint``."""
    import torchsde

    if n == 0:
        return x
    t1, t0 = float(times[0]), float(times[-1])
    dt = (t1 - t0) / (len(times) - 1)
    u_start, u_end = t0, t0 + (float(times[0]) - float(times[n]))
    if seed is None:  # draw the Brownian interval's entropy from torch's global generator
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item())
    y = x.reshape(x.shape[0], -1)
    bm = torchsde.BrownianInterval(t0=u_start, t1=u_end, size=tuple(y.shape), dtype=y.dtype,
                                   device=y.device, entropy=int(seed))
    sde = _TimeReversedSDE(rev, tuple(x.shape[1:]), t0 + t1)
    ts = torch.tensor([u_start, u_end], dtype=y.dtype, device=y.device)
    # A hair above the grid spacing so rounding never adds a sliver of an extra step:
    # torchsde clips the last step to ``u_end``, giving exactly ``n`` steps.
    ys = torchsde.sdeint(sde, y, ts, bm=bm, method="euler", dt=dt * (1 + 1e-9))
    return ys[-1].reshape(x.shape)


@SAMPLERS.register("predictor_corrector")
@declare(needs=SDE_NEEDS, evaluations=_predictor_corrector_evaluations)
def predictor_corrector(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: Optional[PositiveInt] = None,
                        corrector_steps: NonNegativeInt = 1, snr: PositiveFloat = 0.16, denoise: bool = True,
                        guidance: FiniteFloat = 0.0, seed: Optional[Seed] = None,
                        grid_power: Optional[PositiveFloat] = None) -> SampleResult:
    r"""Predictor–corrector sampling (Song et al. 2021, Algorithms 4 and 5).

    At each time ``t_i`` of the grid (:func:`sde_grid`, from ``t1``) ``corrector_steps``
    Langevin steps at ``t_i``,

    .. math::  x \leftarrow x + \epsilon\, s(t_i, x) + \sqrt{2\epsilon}\, z, \qquad
               \epsilon = 2 a_i \Big(\mathrm{snr}\, \frac{\lVert z\rVert}{\lVert s\rVert}\Big)^2,

    then one Euler–Maruyama predictor step to ``t_{i+1}``. The norms are batch means of
    per-sample norms, as in Song et al.'s reference code. ``a_i`` is Algorithm 5's
    ``α_i = 1 − β_i`` generalised to any path and grid: ``exp(2 f(t_i) |h_i|)``, the one-step
    variance decay of the forward drift ``f(t) x`` over the step ``h_i = t_{i+1} − t_i`` (1 for
    VE, Algorithm 4); ``f(t_i)`` is read off the drift as ``⟨drift(t_i, x), x⟩ / ‖x‖²`` (exact
    for a linear drift). With ``corrector_steps=0`` it is :func:`euler_maruyama` (same grid,
    same noise for the same ``seed``).

    Args:
        flow: a flow with ``score``, ``drift`` and ``diffusion``.
        x: samples of the prior at ``flow.t1``.
        cond: optional condition.
        steps: predictor steps; ``None``: the flow's ``time_grid.steps``, or 500 for a flow
            without one.
        corrector_steps: Langevin steps before each predictor step (0: plain Euler–Maruyama).
        snr: target signal-to-noise ratio of a Langevin step.
        denoise, guidance, seed, grid_power: as for :func:`euler_maruyama`.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult`; ``nfe = steps × (1 + corrector_steps)``
        (+1 for the Tweedie step).

    Example:
        >>> from flowkit.flow import Flow, StandardNormal
        >>> seen = []
        >>> def score(t, x, c=None):
        ...     seen.append(round(float(t), 4))
        ...     return -x
        >>> one = lambda t: torch.ones_like(torch.as_tensor(t))
        >>> flow = Flow(velocity=None, prior=StandardNormal((2,)), score=score,
        ...             drift=lambda t, x, c=None: 0 * x, diffusion=one, time_grid=TimeGrid(2, 2.0))
        >>> predictor_corrector(flow, torch.randn(4, 2), corrector_steps=1, seed=0).nfe, seen
        (4, [1.0, 1.0, 0.25, 0.25])
    """
    grid = sde_grid(flow, steps, grid_power)
    _check(grid.steps, snr=snr)
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    rev = _Reverse(flow, cond, guidance, by="predictor_corrector")
    steps = grid.steps
    times = grid.times(flow.t0, flow.t1, x)
    tweedie = denoise and rev.denoise_fn is not None
    gen = _generator(seed, x)

    def randn() -> Tensor:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)

    with torch.no_grad():
        for i in range(steps):
            t, h = times[i], times[i + 1] - times[i]
            if corrector_steps:
                f = (_call(flow.drift, t, x, cond) * x).sum() / x.pow(2).sum().clamp_min(1e-30)
                a = torch.exp(2 * f * h.abs())
            for _ in range(int(corrector_steps)):
                s, z = rev.score(t, x), randn()
                ratio = _mean_norm(z) / _mean_norm(s).clamp_min(1e-30)
                eps = 2 * a * (snr * ratio) ** 2
                x = x + eps * s + (2 * eps).sqrt() * z
            quiet = denoise and not tweedie and i == steps - 1
            x = rev.step(t, x, h, None if quiet else randn())
        if tweedie:
            x = rev.finish(times[-1], x)
    return SampleResult(x, rev.nfe)


def _mean_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=-1).mean()
