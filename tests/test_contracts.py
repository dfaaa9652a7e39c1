"""Contract tests: one per registry, run over every registered name (zuko's contract test).

Each registry — dynamics, objectives, samplers, couplings, datasets, SDEs / paths — has one
set of contracts that every component it holds must keep, run from the small *example
arguments* declared for that component in :data:`EXAMPLES` below. A component registered by
flowkit without an example fails :func:`test_every_registered_component_declares_an_example`,
so a new component cannot slip past its contract.

The contracts:

* **dynamics** — output shaped like the input, with and without a condition (label or
  vector, where the constructor declares ``num_classes`` / ``cond_dim``); a scalar time and
  one time per sample give the same field; no mixing across the batch; gradients reach every
  parameter; a weights-only ``state_dict`` round trip gives identical outputs; the same
  outputs under ``torch.no_grad``.
* **objectives** — built through :func:`flowkit.build` from a tiny recipe: a finite scalar
  loss whose gradient reaches every trainable parameter; ``flow()`` has exactly the declared
  ``provides`` parts, each of the right shape; a weights-only ``state_dict`` round trip; every
  sampler whose ``needs`` the objective ``provides`` runs on its flow, and
  :func:`flowkit.validate` refuses the others.
* **samplers** — on a closed-form flow (Gaussian data under a VP path, whose marginals,
  score and probability-flow map are known exactly) that provides only what the sampler
  declares it ``needs``: samples of the right shape, finite, ``nfe > 0``, distributed as the
  data; a fixed-step ODE sampler's empirical convergence order (steps halved) is the order
  :data:`flowkit.solvers.METHODS` declares, within ±0.5; an adaptive one's error falls with its
  tolerance.
* **couplings** — data kept in place, noise reordered or resampled from the batch, shapes
  and labels kept; ``exact_ot`` is a permutation no costlier than the identity;
  ``independent`` is the identity pairing.
* **datasets** — ``train_batch`` shaped ``[n, *shape]``, float32, finite, reproducible from
  the generator; labels ``long`` in ``[0, num_classes)``; ``test_set`` deterministic for a
  seed; ``log_prob`` / ``model_log_det`` one finite value per sample where defined. File-based
  sets run on small files written here (``hf`` on a CSV, the MAF sets on synthetic arrays).
* **SDEs and paths** — ``d_alpha`` / ``d_sigma`` match finite differences of ``alpha`` /
  ``sigma``; ``drift_coefficient`` and ``diffusion_squared`` solve the moment equation
  ``dΣ/dt = 2 f Σ + g²`` of the documented marginals ``Σ_t = α_t² Σ_data + σ_t²``;
  ``sample`` has that mean and variance (Monte Carlo); ``α ≈ 1, σ ≈ 0`` at ``t0`` and the
  marginal of unit data is the declared prior at ``t1``; the signal-to-noise ratio decreases.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch import Tensor

import flowkit
from flowkit import components
from flowkit.diffusion import flow_from_score
from flowkit.flow import Flow, StandardNormal
from flowkit.paths import VP, GaussianPath
from flowkit.recipe import RecipeError, build_component
from flowkit.registry import Registry, all_registries
from flowkit.samplers.base import FLOW_PARTS, SampleResult
from flowkit.solvers import ADAPTIVE, FIXED_STEP, METHODS

# --------------------------------------------------------------------------------------------
# Declared example arguments: one entry per registered name of every registry.
# --------------------------------------------------------------------------------------------

#: image shape of the image dynamics' examples (``digits`` for the image objectives)
IMAGE = (1, 8, 8)

#: ``{registry kind: {name: example}}``; what an example is depends on the registry:
#: dynamics ``{shape, kwargs}`` (``dim`` and ``shape`` are injected, as flowkit does);
#: objective: a list of tiny recipes (without ``sampler``/``train``); sampler ``{fast,
#: accurate}`` keyword arguments; coupling and path: constructor keyword arguments;
#: dataset: a recipe ``data`` block, ``{maf_root}`` / ``{csv}`` standing for the files the
#: fixtures write (``skip`` giving the reason where a set cannot be made here).
EXAMPLES: dict[str, dict[str, Any]] = {
    "dynamics": {
        "mlp": {"shape": (3,), "kwargs": {"hidden": [8, 8], "time_features": 4}},
        "concatsquash": {"shape": (3,), "kwargs": {"hidden": [8, 8]}},
        "fourier_mlp": {"shape": (3,), "kwargs": {"channels": 8, "layers": 1}},
        "concat_conv": {"shape": (2, 4, 4), "kwargs": {"hidden": [4, 4]}},
        "unet": {"shape": IMAGE, "kwargs": {"base": 4, "mults": [1, 2], "groups": 2}},
    },
    "objective": {
        "ffjord": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "concatsquash", "hidden": [8]},
             "objective": {"name": "ffjord", "method": "rk4", "steps": 2}},
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "ffjord", "blocks": 2, "divergence": "hutchinson", "method": "euler",
                           "steps": 2, "kinetic": 0.1, "jacobian": 0.1}},
            {"data": {"name": "digits"}, "dynamics": {"name": "concat_conv", "hidden": [4]},
             "objective": {"name": "ffjord", "multiscale": True, "divergence": "hutchinson", "method": "euler",
                           "steps": 2}},  # one Euler step would see t = 0 only: no gradient for time weights
        ],
        "cfm": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "cfm", "coupling": {"name": "exact_ot"}}},
            {"data": {"name": "digits"}, "dynamics": {"name": "unet", "base": 4, "mults": [1], "groups": 2},
             "objective": {"name": "cfm", "path": {"name": "cosine", "t1": 0.999}}},
            {"data": {"name": "gmm", "components": 3}, "dynamics": {"name": "mlp", "hidden": [8], "num_classes": 3},
             "objective": {"name": "cfm", "path": {"name": "vp"}, "coupling": {"name": "sinkhorn"},
                           "cond_dropout": 0.2}},
        ],
        "sbcfm": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "sbcfm", "sigma": 0.5}},
        ],
        "rectified_flow": [  # the teacher is handed over by the test (a closed-form flow)
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "rectified_flow", "teacher": "closed-form teacher attached by the test",
                           "method": "rk4", "steps": 2}},
        ],
        "score_matching": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "score_matching"}},
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "fourier_mlp", "channels": 8, "layers": 1},
             "objective": {"name": "score_matching", "sde": {"name": "ve"}, "weighting": "likelihood",
                           "importance_sampling": True, "grid": 65}},
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "concatsquash", "hidden": [8]},
             "objective": {"name": "score_matching", "sde": {"name": "subvp"}, "parameterisation": "score"}},
        ],
        "consistency": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "consistency", "curriculum_steps": 10},
             "sampler": {"name": "flow_map"}},  # the default sampler, dopri5, needs a velocity
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "concatsquash", "hidden": [8]},
             "objective": {"name": "consistency", "path": {"name": "cond_ot", "t1": 0.99}, "loss": "l2",
                           "target_ema": 0.9, "start_scales": 4, "end_scales": 8, "curriculum_steps": 4},
             "sampler": {"name": "flow_map"}},
        ],
        "consistency_distillation": [  # the teacher is handed over by the test (a closed-form flow)
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "consistency_distillation", "teacher": "closed-form teacher attached by the test",
                           "method": "euler"},
             "sampler": {"name": "flow_map"}},
        ],
        "meanflow": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "meanflow"}},
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "concatsquash", "hidden": [8]},
             "objective": {"name": "meanflow", "path": {"name": "vp"}, "time_sampler": "uniform",
                           "weight_power": 0.0}},
        ],
        "vae": [  # builds its own networks: no dynamics section
            {"data": {"name": "digits", "binarize": True},
             "objective": {"name": "vae", "latent": 2, "encoder": [8], "decoder": [8]}},
            {"data": {"name": "digits", "binarize": True},
             "objective": {"name": "vae", "latent": 3, "encoder": [8], "decoder": [],
                           "posterior": {"name": "planar", "flows": 2}}},
            {"data": {"name": "8gaussians"},
             "objective": {"name": "vae", "latent": 2, "encoder": [8], "decoder": [8], "likelihood": "gaussian",
                           "posterior": {"name": "iaf", "flows": 2, "hidden": [8]}}},
            {"data": {"name": "digits"},
             "objective": {"name": "vae", "latent": 2, "encoder": [8], "decoder": [8], "likelihood": "gaussian",
                           "decoder_std": 0.1, "posterior": {"name": "ffjord", "hidden": [4], "blocks": 2,
                                                             "method": "rk4", "steps": 2, "divergence": "hutchinson"}}},
        ],
        "diffflow": [
            {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
             "objective": {"name": "diffflow", "steps": 3}},
            {"data": {"name": "gmm", "components": 3}, "dynamics": {"name": "concatsquash", "hidden": [8],
                                                                   "num_classes": 3},
             "objective": {"name": "diffflow", "steps": [2, 3], "milestones": [1], "gradient": "naive",
                           "grid": "fixed", "g_end": 0.4, "cond_dropout": 0.2}},
        ],
    },
    "sampler": {
        "dopri5": {"fast": {"rtol": 1e-3, "atol": 1e-3}, "accurate": {"rtol": 1e-7, "atol": 1e-7}},
        "euler": {"fast": {"steps": 2}, "accurate": {"steps": 64}},
        "midpoint": {"fast": {"steps": 2}, "accurate": {"steps": 32}},
        "heun": {"fast": {"steps": 2}, "accurate": {"steps": 32}},
        "rk4": {"fast": {"steps": 2}, "accurate": {"steps": 16}},
        "probability_flow": {"fast": {"method": "rk4", "steps": 2}, "accurate": {}},
        "euler_maruyama": {"fast": {"steps": 3, "seed": 0}, "accurate": {"steps": 100, "seed": 0}},
        "predictor_corrector": {"fast": {"steps": 3, "seed": 0}, "accurate": {"steps": 100, "seed": 0}},
        "flow_map": {"fast": {"steps": 1}, "accurate": {"steps": 2}},
        "ddim": {"fast": {"steps": 2}, "accurate": {"steps": 64}},
        "dpmpp_2m": {"fast": {"steps": 2}, "accurate": {"steps": 20}},
        "dpmpp_3m": {"fast": {"steps": 3}, "accurate": {"steps": 20}},
        "unipc": {"fast": {"steps": 2}, "accurate": {"steps": 20}},
        "edm_heun": {"fast": {"steps": 2}, "accurate": {"steps": 40}},
        "sde_dpmpp_2m": {"fast": {"steps": 3, "seed": 0}, "accurate": {"steps": 50, "seed": 0}},
    },
    "coupling": {
        "independent": {},
        "exact_ot": {},
        "sinkhorn": {"reg": 0.5},
    },
    "dataset": {
        "8gaussians": {"name": "8gaussians"},
        "checkerboard": {"name": "checkerboard"},
        "pinwheel": {"name": "pinwheel"},
        "2spirals": {"name": "2spirals"},
        "moons": {"name": "moons"},
        "circles": {"name": "circles"},
        "swissroll": {"name": "swissroll"},
        "rings": {"name": "rings"},
        "olympic_rings": {"name": "olympic_rings"},
        "concentric_rings": {"name": "concentric_rings"},
        "sierpinski": {"name": "sierpinski", "depth": 3},
        "fractal_tree": {"name": "fractal_tree", "depth": 4},
        "gmm": {"name": "gmm", "dim": 3, "components": 3},
        "standardized": {"name": "standardized", "data": {"name": "moons"}, "reference": 500},
        "digits": {"name": "digits"},
        "hf": {"name": "hf", "path": "{csv}", "label_column": "label"},
        "power": {"name": "power", "root": "{maf_root}"},
        "gas": {"name": "gas", "root": "{maf_root}"},
        "hepmass": {"name": "hepmass", "root": "{maf_root}"},
        "miniboone": {"name": "miniboone", "root": "{maf_root}", "split": "validation"},
        "bsds300": {"name": "bsds300", "root": "{maf_root}"},
    },
    "posterior": {  # constructor keyword arguments; bound to latent 3, context 4 by the test
        "gaussian": {},
        "planar": {"flows": 2},
        "iaf": {"flows": 2, "hidden": [8]},
        "ffjord": {"hidden": [8], "method": "rk4", "steps": 2},
    },
    "path": {
        "vp": {"beta_min": 0.1, "beta_max": 20.0},
        "subvp": {"beta_min": 0.1, "beta_max": 20.0},
        "ve": {"sigma_min": 0.01, "sigma_max": 50.0},
        "cond_ot": {"sigma_min": 0.01},
        "cosine": {},
        "polynomial": {"exponent": 3.0},
    },
}


def _flowkit_names(registry: Registry) -> list[str]:
    """The names flowkit itself registers (tests may register their own components)."""
    return [n for n in registry.names() if registry.get(n).__module__.split(".")[0] == "flowkit"]


def _cases(kind: str) -> list[str]:
    return _flowkit_names(all_registries()[kind])


def test_every_registered_component_declares_an_example():
    registries = {name: getattr(components, name) for name in components.__all__}
    assert {r.kind for r in registries.values()} <= set(all_registries())
    for registry in all_registries().values():
        names = _flowkit_names(registry)
        if not names:
            continue  # a registry a test made
        assert registry.kind in EXAMPLES, f"no contract examples for the {registry.kind} registry"
        missing = sorted(set(names) - set(EXAMPLES[registry.kind]))
        stale = sorted(set(EXAMPLES[registry.kind]) - set(registry.names()))
        assert not missing, f"{registry.kind}: registered without a contract example: {missing}"
        assert not stale, f"{registry.kind}: examples for names no longer registered: {stale}"
    for kind in ("dynamics", "objective", "sampler", "coupling", "dataset", "path", "posterior"):
        assert _cases(kind), f"the {kind} registry is empty"


# --------------------------------------------------------------------------------------------
# dynamics
# --------------------------------------------------------------------------------------------

CONDITIONS = ("none", "labels", "vectors")
N_CLASSES, COND_DIM, BATCH = 3, 2, 5


def _make_dynamics(name: str, condition: str, seed: int = 0) -> torch.nn.Module:
    example = EXAMPLES["dynamics"][name]
    cls = flowkit.DYNAMICS.get(name)
    params = inspect.signature(cls).parameters
    kwargs = dict(example["kwargs"], dim=math.prod(example["shape"]))
    if "shape" in params:
        kwargs["shape"] = tuple(example["shape"])
    if condition == "labels":
        kwargs["num_classes"] = N_CLASSES
    elif condition == "vectors":
        kwargs["cond_dim"] = COND_DIM
    torch.manual_seed(seed)
    return cls(**kwargs).double().eval()


def _condition(condition: str) -> Optional[Tensor]:
    g = torch.Generator().manual_seed(3)
    if condition == "labels":
        return torch.tensor([0, 1, 2, -1, 1])  # -1: the null label of guidance
    if condition == "vectors":
        c = torch.randn(BATCH, COND_DIM, generator=g, dtype=torch.float64)
        c[3] = float("nan")  # NaNs: the null vector of guidance
        return c
    return None


def _dynamics_cases() -> list:
    out = []
    for name in _cases("dynamics"):
        params = inspect.signature(flowkit.DYNAMICS.get(name)).parameters
        for condition in CONDITIONS:
            declared = {"none": True, "labels": "num_classes" in params, "vectors": "cond_dim" in params}
            if declared[condition]:
                out.append(pytest.param(name, condition, id=f"{name}-{condition}"))
    return out


def _dynamics_inputs(name: str, condition: str):
    shape = EXAMPLES["dynamics"][name]["shape"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(BATCH, generator=g, dtype=torch.float64)
    return t, x, _condition(condition)


@pytest.mark.parametrize("name, condition", _dynamics_cases())
def test_dynamics_contract(name, condition):
    net = _make_dynamics(name, condition)
    t, x, cond = _dynamics_inputs(name, condition)

    # shape: a field of the state, for one time per sample and for one time for the batch
    out = net(t, x, cond)
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    scalar = torch.tensor(0.3, dtype=torch.float64)
    same = net(scalar, x, cond)
    assert torch.allclose(same, net(scalar.expand(BATCH), x, cond), atol=1e-12, rtol=1e-10), \
        "a scalar time and the same time per sample must give the same field"

    # no mixing across the batch: each sample's field depends on that sample alone
    rows = torch.cat([net(t[i:i + 1], x[i:i + 1], None if cond is None else cond[i:i + 1])
                      for i in range(BATCH)])
    assert torch.allclose(rows, out, atol=1e-12, rtol=1e-10)

    # the condition is used (and the null condition is what None means)
    if cond is not None:
        other = torch.roll(cond, 1, 0)
        assert not torch.allclose(net(t, x, other), out)
        null = torch.full_like(cond, -1) if condition == "labels" else torch.full_like(cond, float("nan"))
        assert torch.allclose(net(t, x, None), net(t, x, null), atol=1e-12, rtol=1e-10)

    # gradients reach every parameter (after moving zero-initialised ones off zero)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    net.zero_grad()
    (net(t, x, cond) * torch.randn_like(x)).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches {dead}"

    # a weights-only state_dict round trip gives an identical field
    expected = net(t, x, cond)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = _make_dynamics(name, condition, seed=123)
    assert not torch.equal(fresh(t, x, cond), expected)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(t, x, cond), expected)

    # under no_grad: the same values, no graph
    with torch.no_grad():
        quiet = net(t, x, cond)
    assert not quiet.requires_grad and torch.equal(quiet, expected.detach())


# --------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------


def _objective_cases() -> list:
    return [pytest.param(name, i, id=f"{name}-{i}") for name in _cases("objective")
            for i in range(len(EXAMPLES["objective"][name]))]


def _teacher() -> Flow:
    """A closed-form teacher: ``dx/dt = x`` carries ``N(0, I)`` at t1 to ``N(0, e^{-2} I)`` at t0."""
    return Flow(velocity=lambda t, x, cond=None: x, prior=StandardNormal((2,)))


def _build(name: str, index: int, seed: int = 0) -> flowkit.recipe.Built:
    torch.manual_seed(seed)
    built = flowkit.build(EXAMPLES["objective"][name][index])
    if getattr(type(built.objective), "needs_teacher", False):
        from flowkit.teacher import attach_teacher

        attach_teacher(built.objective, _teacher())
    return built


def _batch(built, n: int = 6):
    x, labels = built.dataset.train_batch(n, torch.Generator().manual_seed(2))
    return x, (labels if built.conditional else None)


def _seeded_loss(objective, x, cond) -> Tensor:
    torch.manual_seed(7)
    return objective.loss(x, cond).loss


def _check_part(flow: Flow, part: str, x: Tensor) -> None:
    t = torch.tensor(0.5 * (flow.t0 + flow.t1))
    fn = getattr(flow, part)
    if part == "path":  # a schedule, not a field: its coefficients at t are finite, σ/α > 0
        alpha, sigma = fn.alpha(t), fn.sigma(t)
        assert bool(torch.isfinite(alpha)) and bool(torch.isfinite(sigma)) and float(sigma / alpha) > 0, \
            f"flow.path at t = {float(t)}: alpha {alpha}, sigma {sigma}"
        return
    if part == "flow_map":  # x_t -> x_s for s < t, shaped like x
        s = torch.tensor(float(flow.t0))
        out = fn(x, t.expand(x.shape[0]), s.expand(x.shape[0]), None)
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), f"flow.flow_map shape {tuple(out.shape)}"
        return
    out = fn(t) if part == "diffusion" else fn(t, x)
    if part == "diffusion":
        assert torch.as_tensor(out).numel() == 1 and float(out) >= 0, f"flow.diffusion(t) = {out}"
    else:
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), f"flow.{part} shape {tuple(out.shape)}"


def _probe(flow: Flow, t: Tensor, x: Tensor, cond) -> Tensor:
    """What the model computes at ``(t, x)``: its velocity, or its flow map to ``t0`` where it has no velocity."""
    if flow.velocity is None:
        return flow.flow_map(x, t.expand(x.shape[0]), torch.tensor(float(flow.t0)).expand(x.shape[0]), cond)
    return flow.velocity(t, x, cond) if cond is not None else flow.velocity(t, x)


@pytest.mark.parametrize("name, index", _objective_cases())
def test_objective_contract(name, index):
    built = _build(name, index)
    objective = built.objective
    x, cond = _batch(built)
    objective.train()

    # a finite scalar loss whose gradient reaches every trainable parameter
    out = objective(x, cond)
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values()), out.metrics
    objective.zero_grad()
    out.loss.backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert trainable
    dead = [n for n, p in trainable if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: the loss does not reach {dead}"

    if type(objective).variational:  # declared: no flow; evaluated by its bounds instead
        _check_variational(name, index, built, x)
        return

    # flow() has exactly the declared parts
    provides = type(objective).provides
    assert provides <= set(FLOW_PARTS)
    flow = objective.flow()
    present = {p for p in FLOW_PARTS if getattr(flow, p) is not None}
    assert present == set(provides), f"{name} declares {sorted(provides)}, its flow has {sorted(present)}"
    assert flow.t0 < flow.t1 and tuple(flow.prior.shape) == tuple(built.dataset.shape)
    with torch.no_grad():
        for part in sorted(provides):
            _check_part(flow, part, x)

    # a weights-only state_dict round trip rebuilds the same model (after the trainer's step hook)
    objective.after_step(1)
    objective.eval()
    with torch.no_grad():
        t = torch.tensor(0.5 * (flow.t0 + flow.t1))
        expected_v = _probe(flow, t, x, cond)
        expected_loss = _seeded_loss(objective, x, cond)
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    buffer.seek(0)
    fresh = _build(name, index, seed=99).objective.eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    state, loaded = objective.state_dict(), fresh.state_dict()
    assert state.keys() == loaded.keys()
    for key, value in state.items():
        same = torch.equal(value, loaded[key]) if isinstance(value, Tensor) else value == loaded[key]
        assert same, f"{name}: {key} differs after the round trip"
    fresh_flow = fresh.flow()
    with torch.no_grad():
        v = _probe(fresh_flow, t, x, cond)
        assert torch.equal(v, expected_v)
        assert torch.equal(_seeded_loss(fresh, x, cond), expected_loss)


def _check_variational(name: str, index: int, built, x: Tensor) -> None:
    """A variational objective provides nothing and defines no density; its evaluation methods
    give finite bounds (IWAE ≤ negative ELBO), pictures of the data's shape, and a weights-only
    ``state_dict`` round trip reproduces its loss and bounds."""
    objective = built.objective.eval()
    assert type(objective).provides == frozenset() and not type(objective).defines_density
    with pytest.raises(flowkit.FieldError, match="defines no flow"):
        objective.flow()
    res = objective.evaluate_elbo(x, k=4, generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(res[k]) for k in ("neg_elbo", "neg_elbo_sem", "iwae_nll", "iwae_nll_sem", "recon", "kl"))
    assert res["iwae_nll"] <= res["neg_elbo"] + 1e-5 and res["n"] == x.shape[0]
    assert objective.reconstruct(x).shape == x.shape
    assert objective.generate(3, torch.Generator().manual_seed(0)).shape == (3, *built.dataset.shape)
    expected_loss = _seeded_loss(objective, x, None)
    expected = objective.evaluate_elbo(x, k=4, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    buffer.seek(0)
    fresh = _build(name, index, seed=99).objective.eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(_seeded_loss(fresh, x, None), expected_loss)
    assert fresh.evaluate_elbo(x, k=4, generator=torch.Generator().manual_seed(1)) == expected


def _sampler_needs(name: str) -> frozenset:
    return frozenset(flowkit.SAMPLERS.get(name).needs)


@pytest.mark.parametrize("name, index", _objective_cases())
def test_objective_flow_serves_every_sampler_that_fits(name, index):
    built = _build(name, index)
    objective = built.objective.eval()
    provides = type(objective).provides
    recipe = EXAMPLES["objective"][name][index]
    if type(objective).variational:  # no flow: every sampler is refused before anything is built
        for sampler in _cases("sampler"):
            with pytest.raises(RecipeError, match="sampler: objective .* defines no flow"):
                flowkit.validate({**recipe, "sampler": {"name": sampler, **EXAMPLES["sampler"][sampler]["fast"]}})
        return
    flow = objective.flow()
    x = flow.prior.sample(4, generator=torch.Generator().manual_seed(0))
    for sampler in _cases("sampler"):
        fits = _sampler_needs(sampler) <= provides
        with_sampler = {**recipe, "sampler": {"name": sampler, **EXAMPLES["sampler"][sampler]["fast"]}}
        if not fits:
            with pytest.raises(RecipeError, match="sampler.name"):
                flowkit.validate(with_sampler)
            continue
        flowkit.validate(with_sampler)
        fast = EXAMPLES["sampler"][sampler]["fast"]
        res = flowkit.SAMPLERS.get(sampler)(flow, x, **fast)
        assert isinstance(res, SampleResult) and res.x.shape == x.shape and res.nfe > 0
        assert bool(torch.isfinite(res.x).all()), f"{sampler} on {name}: non-finite samples"
        if sampler in FIXED_STEP:  # steps × stages per segment, every block of a stacked CNF
            assert res.nfe == fast["steps"] * METHODS[sampler].stages * len(flow.segments())
        if built.conditional:  # a conditional model, with classifier-free guidance where offered
            labels = torch.tensor([0, 1, 2, -1])
            guidance = {"guidance": 1.5} if "guidance" in inspect.signature(flowkit.SAMPLERS.get(sampler)).parameters \
                else {}
            res = flowkit.SAMPLERS.get(sampler)(flow, x, cond=labels, **fast, **guidance)
            assert res.x.shape == x.shape and bool(torch.isfinite(res.x).all())


# --------------------------------------------------------------------------------------------
# posteriors (of variational objectives)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _cases("posterior"))
def test_posterior_contract(name):
    """``(z, log q)`` of the right shapes and finite; eval mode deterministic for fixed noise; the
    gradient of ``log q`` and ``z`` reaches every parameter; a ``state_dict`` round trip."""
    torch.manual_seed(0)
    q = flowkit.posteriors.POSTERIORS.build(name, **EXAMPLES["posterior"][name]).bind(latent=3, context=4)
    g = torch.Generator().manual_seed(1)
    h, eps = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    z, log_q = q(h, eps)
    assert z.shape == (5, 3) and log_q.shape == (5,) and bool(torch.isfinite(z).all() and torch.isfinite(log_q).all())
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    q.zero_grad()
    z, log_q = q(h, eps)
    (log_q.sum() + (z * torch.randn_like(z)).sum()).backward()
    dead = [n for n, p in q.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches {dead}"
    q.eval()
    expected = q(h, eps)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = flowkit.posteriors.POSTERIORS.build(name, **EXAMPLES["posterior"][name]).bind(latent=3, context=4).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    again = fresh(h, eps)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------

DATA_STD = 0.5


def _gaussian_flow(path: GaussianPath, shape=(2,)) -> tuple[Flow, Callable[[float], float]]:
    """Data ``N(0, DATA_STD² I)`` under ``path``: ``p_t = N(0, v_t I)``, ``v_t = α_t² s² + σ_t²``,
    score ``−x / v_t``; the probability-flow ODE maps ``x(t1)`` to ``x(t1) sqrt(v_t0 / v_t1)``."""

    def var(t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return path.alpha(t) ** 2 * DATA_STD**2 + path.sigma(t) ** 2

    flow = flow_from_score(lambda t, x, cond=None: -x / var(t).to(x), path, shape,
                           prior=StandardNormal(tuple(shape), float(var(path.t1).sqrt())))

    def flow_map(x: Tensor, t: Tensor, s: Tensor, cond=None) -> Tensor:  # the ODE's map: x_t sqrt(v_s / v_t)
        return x * (var(s) / var(t)).sqrt().to(x).reshape(-1, *([1] * (x.dim() - 1)))

    flow.flow_map = flow_map
    return flow, lambda t: float(var(t))


def _undeclared(part: str) -> Callable:
    def refuse(*args, **kwargs):
        raise AssertionError(f"the sampler used flow.{part}, which it does not declare in its needs")

    return refuse


def _only(flow: Flow, needs: frozenset) -> Flow:
    """``flow`` with the parts outside ``needs`` removed (the velocity, always set, refuses calls)."""
    removed = {p: None for p in FLOW_PARTS if p not in needs and p != "velocity"}
    if "velocity" not in needs:
        removed["velocity"] = _undeclared("velocity")
    return dataclasses.replace(flow, **removed)


@pytest.mark.parametrize("name", _cases("sampler"))
def test_sampler_contract(name, float64):
    sampler = flowkit.SAMPLERS.get(name)
    needs = _sampler_needs(name)
    assert needs and needs <= set(FLOW_PARTS), f"{name} declares needs {sorted(needs)}"
    flow, var = _gaussian_flow(VP())
    flow = _only(flow, needs)
    x = flow.prior.sample(4000, generator=torch.Generator().manual_seed(0))

    fast = sampler(flow, x[:7], **EXAMPLES["sampler"][name]["fast"])
    assert isinstance(fast, SampleResult) and fast.x.shape == (7, 2) and fast.nfe > 0
    assert bool(torch.isfinite(fast.x).all())
    if name in FIXED_STEP:
        assert fast.nfe == EXAMPLES["sampler"][name]["fast"]["steps"] * METHODS[name].stages

    # the samples are distributed as the data (the marginal at t0)
    res = sampler(flow, x, **EXAMPLES["sampler"][name]["accurate"])
    assert res.x.shape == x.shape and res.nfe > 0 and bool(torch.isfinite(res.x).all())
    std = math.sqrt(var(flow.t0))
    assert res.x.mean(0).abs().max() < 0.05
    assert (res.x.std(0) - std).abs().max() < 0.03, f"{name}: sample std {res.x.std(0).tolist()}, data {std:.4f}"


def _order_cases() -> list:
    cases = [pytest.param(name, {}, METHODS[name].order, id=name) for name in _cases("sampler") if name in FIXED_STEP]
    cases += [pytest.param("probability_flow", {"method": m}, METHODS[m].order, id=f"probability_flow-{m}")
              for m in FIXED_STEP]
    return cases


@pytest.mark.parametrize("name, options, order", _order_cases())
def test_fixed_step_sampler_converges_at_its_declared_order(name, options, order, float64):
    # the Gaussian flow's ODE dx/dt = c(t) x has a time-dependent rate: every stage's time counts
    flow, var = _gaussian_flow(VP(beta_max=4.0))
    x1 = flow.prior.sample(16, generator=torch.Generator().manual_seed(0))
    exact = x1 * math.sqrt(var(flow.t0) / var(flow.t1))
    sampler = flowkit.SAMPLERS.get(name)
    errors = [float((sampler(flow, x1, steps=n, **options).x - exact).abs().max()) for n in (16, 32, 64)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert abs(measured[-1] - order) <= 0.5, f"{name} {options}: errors {errors}, orders {measured}, declared {order}"


def _adaptive_cases() -> list:
    cases = [pytest.param(name, {}, id=name) for name in _cases("sampler") if name in ADAPTIVE]
    cases += [pytest.param("probability_flow", {"method": m}, id=f"probability_flow-{m}") for m in ADAPTIVE]
    return cases


@pytest.mark.parametrize("name, options", _adaptive_cases())
def test_adaptive_sampler_error_follows_its_tolerance(name, options, float64):
    flow, var = _gaussian_flow(VP(beta_max=4.0))
    x1 = flow.prior.sample(16, generator=torch.Generator().manual_seed(0))
    exact = x1 * math.sqrt(var(flow.t0) / var(flow.t1))
    sampler = flowkit.SAMPLERS.get(name)
    loose, tight = (float((sampler(flow, x1, rtol=tol, atol=tol, **options).x - exact).abs().max())
                    for tol in (1e-4, 1e-6))
    assert tight < loose / 10 and tight < 1e-3, f"{name} {options}: error {loose:.2e} at tol 1e-4, {tight:.2e} at 1e-6"


def test_every_ode_sampler_is_under_an_accuracy_contract():
    """Each velocity-only sampler is a method of the table (order or tolerance contract above)
    or takes any of them (``probability_flow``, run above with every method)."""
    for name in (n for n in _cases("sampler") if _sampler_needs(n) == {"velocity"}):
        assert name in METHODS or "method" in inspect.signature(flowkit.SAMPLERS.get(name)).parameters, name


# --------------------------------------------------------------------------------------------
# couplings
# --------------------------------------------------------------------------------------------


def _row_sources(rows: Tensor, pool: Tensor) -> Tensor:
    """Index in ``pool`` of each row of ``rows`` (every row must be one of the pool's)."""
    index = {tuple(r): i for i, r in enumerate(pool.flatten(1).tolist())}
    found = [index.get(tuple(r)) for r in rows.flatten(1).tolist()]
    assert None not in found, "the coupling returned noise that is not in the batch"
    return torch.tensor(found)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)], ids=["vectors", "images"])
@pytest.mark.parametrize("name", _cases("coupling"))
def test_coupling_contract(name, shape):
    coupling = flowkit.COUPLINGS.build(name, **EXAMPLES["coupling"][name])
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(24, *shape, generator=g), torch.randn(24, *shape, generator=g)
    labels = torch.randint(0, 3, (24,), generator=g)
    for cond in (None, labels):
        torch.manual_seed(0)
        x2, z2 = coupling(x, z, cond)
        assert x2.shape == x.shape and z2.shape == z.shape and z2.dtype == z.dtype
        assert torch.equal(x2, x), "a coupling keeps the data in place (labels stay aligned)"
        source = _row_sources(z2, z)
        if cond is not None:
            assert bool((labels[source] == labels).all()), "noise slot j carries the label of data point j"
        if name == "independent":
            assert torch.equal(source, torch.arange(24))
        if name == "exact_ot":
            assert sorted(source.tolist()) == list(range(24)), "exact_ot must permute, not resample"
            if cond is None:
                assert float((x2 - z2).square().sum()) <= float((x - z).square().sum()) + 1e-4


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """Small files for the file-based sets: a CSV for ``hf`` and the MAF arrays."""
    pd = pytest.importorskip("pandas")
    root = tmp_path_factory.mktemp("contract_data")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=40), "b": rng.normal(size=40), "label": rng.integers(0, 3, 40)})
    frame.to_csv(root / "table.csv", index=False)
    maf = root / "maf"
    for sub in ("power", "miniboone", "gas", "hepmass", "BSDS300"):
        (maf / sub).mkdir(parents=True)
    np.save(maf / "power/data.npy", rng.normal(size=(60, 8)))
    np.save(maf / "miniboone/data.npy", rng.normal(size=(60, 43)))
    gas = pd.DataFrame(rng.normal(size=(60, 11)), columns=["Meth", "Eth", "Time"] + [f"s{i}" for i in range(8)])
    gas.to_pickle(maf / "gas/ethylene_CO.pickle")
    cols = ["# label"] + [f"f{i}" for i in range(27)] + ["mass"]
    for name, n in (("1000_train.csv", 60), ("1000_test.csv", 20)):
        table = rng.normal(size=(n, 29))
        table[:, 0] = np.arange(n) % 2
        pd.DataFrame(table, columns=cols).to_csv(maf / "hepmass" / name, index=False)
    try:
        import h5py
    except ImportError:
        pass
    else:
        with h5py.File(maf / "BSDS300/BSDS300.hdf5", "w") as fh:
            for split, n in (("train", 30), ("validation", 10), ("test", 10)):
                fh[split] = rng.normal(size=(n, 63))
    return {"csv": str(root / "table.csv"), "maf_root": str(maf)}


def _fill(spec: Any, files: dict[str, str]) -> Any:
    if isinstance(spec, dict):
        return {k: _fill(v, files) for k, v in spec.items()}
    return spec.format(**files) if isinstance(spec, str) and "{" in spec else spec


@pytest.mark.parametrize("name", _cases("dataset"))
def test_dataset_contract(name, data_files):
    if name == "bsds300":
        pytest.importorskip("h5py", reason="bsds300 reads an HDF5 file; h5py is not installed")
    spec = _fill(EXAMPLES["dataset"][name], data_files)
    flowkit.validate({"data": spec, "dynamics": {"name": "mlp"}, "objective": {"name": "cfm"}})
    data = build_component(flowkit.DATASETS, spec)
    shape = tuple(data.shape)
    assert shape and all(isinstance(s, int) and s > 0 for s in shape)

    x, labels = data.train_batch(6, torch.Generator().manual_seed(0))
    assert x.shape == (6, *shape) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    again, labels_again = data.train_batch(6, torch.Generator().manual_seed(0))
    assert torch.equal(again, x), "train_batch must draw its randomness from the generator alone"
    if data.num_classes is None:
        assert labels is None
    else:
        assert labels.shape == (6,) and labels.dtype == torch.long and torch.equal(labels, labels_again)
        assert bool(((labels >= 0) & (labels < data.num_classes)).all())

    test, test_labels = data.test_set(3, seed=11)  # a finite set returns at most what it holds
    assert test.shape == (3, *shape) and test.dtype == torch.float32 and bool(torch.isfinite(test).all())
    repeat, repeat_labels = data.test_set(3, seed=11)
    assert torch.equal(repeat, test), "test_set must be deterministic for a seed"
    assert (test_labels is None) == (data.num_classes is None)
    if test_labels is not None:
        assert torch.equal(test_labels, repeat_labels)

    for extra in (data.log_prob(x), data.model_log_det(x)):
        if extra is not None:
            assert extra.shape == (6,) and bool(torch.isfinite(extra).all())


# --------------------------------------------------------------------------------------------
# SDEs and Gaussian paths
# --------------------------------------------------------------------------------------------


def _path_cases() -> list:
    return [pytest.param("path", name, id=f"path-{name}") for name in _cases("path")]


def _interior(path: GaussianPath, n: int = 41) -> Tensor:
    """Times strictly inside ``[t0, t1]`` (and away from a singular end)."""
    lo, hi = float(path.t0), float(path.t1)
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("kind, name", _path_cases())
def test_path_contract(kind, name):
    path = all_registries()[kind].build(name, **EXAMPLES[kind][name])
    assert isinstance(path, GaussianPath) and path.t0 < path.t1
    t, h = _interior(path), 1e-6

    def fd(fn: Callable[[Tensor], Tensor]) -> Tensor:
        return (fn(t + h) - fn(t - h)) / (2 * h)

    def close(a: Tensor, b: Tensor, what: str, rtol: float = 1e-5) -> None:
        assert torch.allclose(a, b, rtol=rtol, atol=1e-7), f"{kind} {name}: {what}: {a} vs {b}"

    c = path.schedule(t)
    close(c.d_alpha, fd(path.alpha), "d_alpha vs finite differences of alpha")
    close(c.d_sigma, fd(path.sigma), "d_sigma vs finite differences of sigma")
    assert bool((c.det > 0).all()), "the signal-to-noise ratio must decrease (D_t > 0)"

    # the forward SDE: f = d log α / dt, and Σ_t = α² Σ_data + σ² solves dΣ/dt = 2 f Σ + g²
    f, g2 = path.drift_coefficient(t), path.diffusion_squared(t)
    close(f, fd(lambda s: path.alpha(s).log()), "drift_coefficient vs d log alpha / dt")
    for data_var in (0.25, 1.0, 4.0):
        def sigma_t(s, v=data_var):
            return path.alpha(s) ** 2 * v + path.sigma(s) ** 2

        close(fd(sigma_t), 2 * f * sigma_t(t) + g2, f"moment equation (data variance {data_var})")
    close(path.diffusion(t) ** 2, g2, "diffusion(t)² vs diffusion_squared(t)")
    x = torch.randn(len(t), 2, dtype=torch.float64)
    close(path.drift(t, x), f[:, None] * x, "drift(t, x) vs f(t) x")

    # the parameterisations: from the (x_data, ε) that made x_t, every map gives the truth
    x0, eps = torch.randn(len(t), 2, dtype=torch.float64), torch.randn(len(t), 2, dtype=torch.float64)
    xt = path.sample(x0, t, eps)
    v = c.d_alpha[:, None] * x0 + c.d_sigma[:, None] * eps  # d x_t / dt
    score = -eps / c.sigma[:, None]  # Tweedie: s = −ε / σ
    for what, got, want in (
            ("x0_from_eps", path.x0_from_eps(eps, t, xt), x0), ("eps_from_x0", path.eps_from_x0(x0, t, xt), eps),
            ("score_from_eps", path.score_from_eps(eps, t, xt), score),
            ("eps_from_score", path.eps_from_score(score, t, xt), eps),
            ("x0_from_score", path.x0_from_score(score, t, xt), x0),
            ("score_from_x0", path.score_from_x0(x0, t, xt), score),
            ("velocity_from_eps", path.velocity_from_eps(eps, t, xt), v),
            ("eps_from_velocity", path.eps_from_velocity(v, t, xt), eps),
            ("velocity_from_x0", path.velocity_from_x0(x0, t, xt), v),
            ("x0_from_velocity", path.x0_from_velocity(v, t, xt), x0),
            ("velocity_from_score", path.velocity_from_score(score, t, xt), v),
            ("score_from_velocity", path.score_from_velocity(v, t, xt), score)):
        close(got, want, what, rtol=1e-9)

    # sample(): x_t = α x + σ ε has mean α μ and variance α² s² + σ² (Monte Carlo)
    g = torch.Generator().manual_seed(0)
    n, mu, s = 20000, 0.7, 0.5
    for tt in (float(t[0]), float(t[len(t) // 2]), float(t[-1])):
        data = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
        xt = path.sample(data, torch.full((n,), tt, dtype=torch.float64), torch.randn(n, 1, generator=g,
                                                                                     dtype=torch.float64))
        a, sg = float(path.alpha(torch.tensor(tt))), float(path.sigma(torch.tensor(tt)))
        std = math.sqrt(a**2 * s**2 + sg**2)
        assert abs(float(xt.mean()) - a * mu) < 5 * std / math.sqrt(n), f"{name} mean at t={tt}"
        assert abs(float(xt.std()) / std - 1) < 0.03, f"{name} std at t={tt}"

    # the ends: data at t0 (α ≈ 1, σ ≈ 0), the declared prior at t1
    end = path.schedule(torch.tensor([float(path.t0), float(path.t1)], dtype=torch.float64))
    assert abs(float(end.alpha[0]) - 1) < 1e-3 and float(end.sigma[0]) < 0.02, \
        f"{name} at t0: alpha {float(end.alpha[0])}, sigma {float(end.sigma[0])}"
    marginal_std = math.sqrt(float(end.alpha[1]) ** 2 + float(end.sigma[1]) ** 2)  # of unit-variance data
    assert abs(marginal_std / path.prior_std - 1) < 1e-2, f"{name}: p_t1 std {marginal_std}, prior {path.prior_std}"
    assert float(end.sigma[1] / end.alpha[1].clamp_min(1e-300)) > 10, "the noise must dominate at t1"
    assert path.prior((2,)).shape == (2,)


def _declared_order_cases() -> list:
    return [pytest.param(name, id=name) for name in _cases("sampler")
            if getattr(flowkit.SAMPLERS.get(name), "order", None) is not None and name not in METHODS]


@pytest.mark.parametrize("name", _declared_order_cases())
def test_sampler_converges_at_its_declared_order(name, float64):
    """Semi-linear samplers (DDIM, DPM-Solver++, UniPC, EDM Heun) declare an order; halving the step
    divides the endpoint error on a Gaussian (exact flow known) by about 2^order."""
    flow, var = _gaussian_flow(VP(beta_max=4.0))
    flow = _only(flow, _sampler_needs(name))
    x1 = flow.prior.sample(16, generator=torch.Generator().manual_seed(0))
    exact = x1 * math.sqrt(var(flow.t0) / var(flow.t1))
    sampler = flowkit.SAMPLERS.get(name)
    schedule = "karras" if name == "edm_heun" else "logsnr"  # even steps in the solver's own variable
    errors = [float((sampler(flow, x1, steps=n, schedule=schedule, final="t0").x - exact).abs().max())
              for n in (64, 128, 256)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert abs(measured[-1] - sampler.order) <= 0.5, f"{name}: errors {errors}, orders {measured}, declared {sampler.order}"
