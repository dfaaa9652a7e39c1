"""What a sampler's ``steps`` are: the grid they walk and the evaluations they cost.

* ``predictor_corrector`` steps through the grid ``euler_maruyama`` does (the flow's declared
  :class:`~flowkit.flow.TimeGrid` unless ``steps`` / ``grid_power`` are given; one helper,
  :func:`flowkit.samplers.sde.sde_grid`), and without corrector steps it *is* Euler–Maruyama.
* Every registered sampler declares what its ``steps`` cost (``declare(evaluations=...)``) or that
  it is adaptive; the declaration is the NFE its :class:`SampleResult` reports, and
  :mod:`flowkit.nfe_sweep` reads it instead of a table of its own.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import flowkit
from flowkit.diffusion import flow_from_score
from flowkit.flow import Flow, StandardNormal, TimeGrid
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.nfe_sweep import nfe_of_steps, steps_for_nfe
from flowkit.paths import VP, CondOT
from flowkit.samplers.base import ADAPTIVE, SampleResult, declare, declared_nfe
from flowkit.samplers.sde import euler_maruyama, predictor_corrector, sde_grid
from flowkit.solvers import ADAPTIVE as ADAPTIVE_METHODS
from flowkit.solvers import FIXED_STEP
from test_contracts import EXAMPLES

F64 = torch.float64
#: a non-uniform grid, as DiffFlow declares its L_β grid
DECLARED = TimeGrid(steps=6, power=2.5)


def recording_flow(time_grid: TimeGrid | None = DECLARED) -> tuple[Flow, list[float]]:
    """Data N(0, I) under ``dx = dw`` on ``[0.1, 1]``: score ``−x/(1 + t)``; records the times the
    score is evaluated at."""
    seen: list[float] = []

    def score(t, x, cond=None):
        seen.append(float(t))
        return -x / (1 + t)

    flow = Flow(velocity=lambda t, x, cond=None: 0.5 * x / (1 + t), prior=StandardNormal((2,), 2.0 ** 0.5),
                t0=0.1, t1=1.0, score=score, drift=lambda t, x, cond=None: 0 * x,
                diffusion=lambda t: torch.ones_like(torch.as_tensor(t)), time_grid=time_grid)
    return flow, seen


def gmm_flow(path, time_grid: TimeGrid | None = None) -> Flow:
    """A 2-D Gaussian mixture under ``path`` with its exact score: every part a sampler may need."""
    gmm = GaussianMixture(torch.tensor([[-1.5, 0.5], [1.0, -1.0]], dtype=F64),
                          torch.stack([torch.eye(2, dtype=F64) * 0.2, torch.eye(2, dtype=F64) * 0.3]),
                          torch.tensor([0.4, 0.6], dtype=F64))
    flow = flow_from_score(mixture_score_field(gmm, path), path, (2,))
    flow.flow_map = lambda x, t, s, cond=None: x * 0.9
    return dataclasses.replace(flow, time_grid=time_grid)


# ------------------------------------------------------------------------ item 1: the grid
def test_predictor_corrector_visits_the_flows_declared_grid():
    flow, seen = recording_flow()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = predictor_corrector(flow, x, corrector_steps=1, seed=0)
    grid = DECLARED.times(flow.t0, flow.t1, like=x)
    visited = torch.tensor(seen, dtype=F64)
    # a corrector and a predictor evaluation at every knot but the last (no denoiser here)
    torch.testing.assert_close(visited, grid[:-1].repeat_interleave(2), rtol=0, atol=0)
    assert res.nfe == 2 * DECLARED.steps
    # given steps and grid_power win over the declaration, as for euler_maruyama
    seen.clear()
    predictor_corrector(flow, x, steps=3, grid_power=0.5, corrector_steps=0, seed=0)
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), TimeGrid(3, 0.5).times(0.1, 1.0, like=x)[:-1])
    seen.clear()
    predictor_corrector(flow, x, steps=4, corrector_steps=0, seed=0)  # the declared power
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), TimeGrid(4, 2.5).times(0.1, 1.0, like=x)[:-1])


def test_predictor_corrector_and_euler_maruyama_take_their_grid_from_one_helper(monkeypatch):
    from flowkit.samplers import sde

    calls = []

    def spy(flow, steps=None, grid_power=None):
        calls.append((steps, grid_power))
        return sde_grid(flow, steps, grid_power)

    monkeypatch.setattr(sde, "sde_grid", spy)
    flow, _ = recording_flow()
    x = torch.zeros(2, 2, dtype=F64)
    euler_maruyama(flow, x, steps=3, seed=0)
    predictor_corrector(flow, x, steps=3, seed=0)
    predictor_corrector(flow, x, grid_power=0.5, seed=0)
    assert calls == [(3, None), (3, None), (None, 0.5)]
    # the helper: given values win, then the flow's declaration, then 500 uniform steps
    assert sde_grid(flow) == DECLARED and sde_grid(flow, 7) == TimeGrid(7, DECLARED.power)
    assert sde_grid(flow, None, 1.0) == TimeGrid(DECLARED.steps, 1.0)
    assert sde_grid(recording_flow(None)[0]) == TimeGrid(500, 1.0)


@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("options", [{}, {"steps": 9, "grid_power": 0.6}, {"steps": 8}],
                         ids=["declared", "given", "steps"])
def test_predictor_corrector_without_corrector_steps_is_euler_maruyama(options, denoise):
    """Same grid, same noise: identical samples, bit for bit (no closed form needed). On the
    uniform grid instead of the declared one the samples differ, so the grid is what is compared."""
    flow = gmm_flow(VP(), time_grid=DECLARED)
    x = flow.prior.sample(64, generator=torch.Generator().manual_seed(1), dtype=F64)
    pc = predictor_corrector(flow, x, corrector_steps=0, seed=3, denoise=denoise, **options)
    em = euler_maruyama(flow, x, seed=3, denoise=denoise, **options)
    assert torch.equal(pc.x, em.x) and pc.nfe == em.nfe
    uniform = euler_maruyama(flow, x, seed=3, denoise=denoise, **{**options, "grid_power": 1.0})
    assert not torch.equal(pc.x, uniform.x)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"steps": -3}, {"grid_power": 0.0},
                                 {"grid_power": -1.0}, {"grid_power": float("nan")}])
def test_both_reverse_sde_samplers_refuse_a_bad_grid_with_one_message(bad):
    flow = gmm_flow(VP(), time_grid=DECLARED)
    x = torch.zeros(2, 2, dtype=F64)
    messages = []
    for sampler in (euler_maruyama, predictor_corrector):
        with pytest.raises(ValueError) as err:
            sampler(flow, x, seed=0, **bad)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and next(iter(bad)) in messages[0]


# ------------------------------------------------------------ item 2: declared evaluations
#: option sets that change what steps cost, beyond the contract examples' ``fast`` ones
VARIANTS: dict[str, list[dict]] = {
    "euler_maruyama": [{"backend": "torchsde"}, {"denoise": False}, {"backend": "torchsde", "denoise": False}],
    "predictor_corrector": [{"corrector_steps": 0}, {"corrector_steps": 2, "denoise": False}],
    "probability_flow": [{"method": m} for m in FIXED_STEP],
    "edm_heun": [{"final": "t0"}, {"s_churn": 10.0, "seed": 0}, {"schedule": "uniform"}],
    "flow_map": [{"renoise": True, "seed": 0}],
    "dpmpp_3m": [{"third_order": "exact"}],
}


def _stepped(name: str) -> bool:
    return "steps" in inspect.signature(flowkit.SAMPLERS.get(name)).parameters


def _flows(name: str) -> list[tuple[str, Flow]]:
    """The flows a sampler's count may depend on: both ends of the few-step grids (α = 0 at t1 on
    cond_ot), with and without a denoiser, and stacked CNF blocks for the ODE samplers."""
    flows = [("vp", gmm_flow(VP())), ("cond_ot", gmm_flow(CondOT())),
             ("vp-no-denoiser", dataclasses.replace(gmm_flow(VP()), denoise=None))]
    if flowkit.SAMPLERS.get(name).needs == {"velocity"}:
        def field(t, x, cond=None):
            return -x

        flows.append(("two-blocks", Flow(velocity=field, prior=StandardNormal((2,)), blocks=(field, field))))
    return flows


@pytest.mark.parametrize("name", flowkit.SAMPLERS.names())
def test_every_sampler_declares_what_its_steps_cost(name):
    """The declared count is the NFE the sampler reports, for every option set and flow above;
    a sampler without ``steps`` declares itself adaptive."""
    sampler = flowkit.SAMPLERS.get(name)
    if not _stepped(name):
        assert sampler.evaluations == ADAPTIVE, f"{name} takes no steps: it must declare evaluations={ADAPTIVE!r}"
        assert nfe_of_steps(name, gmm_flow(VP()), 3) is None
        return
    assert sampler.evaluations != ADAPTIVE, f"{name} takes steps: it must declare what they cost"
    fast = {k: v for k, v in EXAMPLES["sampler"][name]["fast"].items() if k != "steps"}
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    checked = 0
    for options in [fast] + [{**fast, **v} for v in VARIANTS.get(name, [])]:
        for label, flow in _flows(name):
            for steps in (1, 2, 3, 5):
                declared = declared_nfe(sampler, flow, steps, **options)
                assert declared == nfe_of_steps(name, flow, steps, **options)
                if declared is None:  # only an adaptive method of a sampler that takes one
                    assert options.get("method", "dopri5") in ADAPTIVE_METHODS, (name, options)
                    continue
                res = sampler(flow, x, steps=steps, **options)
                assert isinstance(res, SampleResult)
                assert res.nfe == declared, \
                    f"{name} {options} on {label}, {steps} steps: spent {res.nfe}, declares {declared}"
                checked += 1
    assert checked >= 12


def test_an_adaptive_method_declares_no_step_count():
    flow = gmm_flow(VP())
    assert declared_nfe(flowkit.SAMPLERS.get("probability_flow"), flow, 4) is None  # dopri5
    assert steps_for_nfe("probability_flow", flow, 8) is None
    assert declared_nfe(flowkit.SAMPLERS.get("probability_flow"), flow, 4, method="rk4") == 16


def test_declare_refuses_a_missing_or_inconsistent_count():
    with pytest.raises(TypeError, match="evaluations"):
        declare(needs=("velocity",))  # type: ignore[call-arg]
    for bad in (0, -1, 1.5, True, "adaptve", None):
        with pytest.raises(ValueError, match="evaluations must be"):
            declare(needs=("velocity",), evaluations=bad)

    def stepped(flow, x, *, cond=None, steps: int = 4): ...

    def adaptive(flow, x, *, cond=None, rtol: float = 1e-5): ...

    with pytest.raises(ValueError, match="stepped takes steps: declare what they cost"):
        declare(needs=("velocity",), evaluations=ADAPTIVE)(stepped)
    with pytest.raises(ValueError, match="adaptive takes no steps: declare evaluations='adaptive'"):
        declare(needs=("velocity",), evaluations=2)(adaptive)


def test_nfe_sweep_reads_the_declaration(monkeypatch):
    """A sampler the sweep has never heard of is budgeted by what it declares: here three
    evaluations a step plus one at the end."""

    @declare(needs=("velocity",), evaluations=lambda flow, steps, settings: 3 * steps + settings["extra"])
    def toy(flow, x, *, cond=None, steps: int = 4, extra: int = 1) -> SampleResult:
        return SampleResult(x, 3 * steps + extra)

    monkeypatch.setitem(flowkit.SAMPLERS._entries, "toy_h2", toy)
    flow = gmm_flow(VP())
    assert nfe_of_steps("toy_h2", flow, 5) == 16 and nfe_of_steps("toy_h2", flow, 5, extra=0) == 15
    assert [steps_for_nfe("toy_h2", flow, b) for b in (3, 4, 7, 16)] == [None, 1, 2, 5]
