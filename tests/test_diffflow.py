"""DiffFlow (Zhang & Chen 2021): stochastic adjoint vs backprop, memory, the g → 0 limit,
training, the progressive schedule, and sampling with the λ family of eq. 16."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

import flowkit
from flowkit.components import OBJECTIVES, SAMPLERS
from flowkit.dynamics.mlp import MLP
from flowkit.flow import Flow, StandardNormal
from flowkit.objectives.diffflow import DiffFlow, power_grid, randomised_grid
from flowkit.profiling import SavedTensorBytes
from flowkit.samplers.sde import euler_maruyama

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def make(hidden=(16, 16), **kwargs) -> DiffFlow:
    def factory(**over):
        return MLP(dim=2, **{"hidden": list(hidden), "activation": "tanh", "time_features": 4, **over})

    return DiffFlow(factory, (2,), **kwargs)


# --------------------------------------------------------------------------- construction


def test_registered_and_validated():
    assert OBJECTIVES.get("diffflow") is DiffFlow
    recipe = {"data": {"name": "olympic_rings"}, "dynamics": {"name": "mlp", "hidden": [8]},
              "objective": {"name": "diffflow", "steps": [5, 10], "milestones": [3], "grid": "fixd"}}
    with pytest.raises(flowkit.RecipeError, match="grid"):
        flowkit.validate(recipe)
    with pytest.raises(ValueError, match="one more entry"):
        make(steps=[5, 10], milestones=[])
    with pytest.raises(ValueError, match="g and g_end"):
        make(g=0.0)


def test_hidden_overrides_build_two_networks():
    obj = make(hidden=(16, 16), drift_hidden=[8], score_hidden=[4, 4])
    assert obj.drift.net[0].out_features == 8 and obj.score.net[0].out_features == 4
    assert not set(map(id, obj.drift.parameters())) & set(map(id, obj.score.parameters()))


def test_time_grids():
    fixed = power_grid(10, 0.05, 0.9, dtype=F64)
    torch.testing.assert_close(fixed, 0.05 * (torch.arange(11, dtype=F64) / 10) ** 0.9)
    mid = 0.5 * (fixed[1:] + fixed[:-1])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rnd = randomised_grid(10, 0.05, 0.9, generator=g, dtype=F64)
        assert rnd[0] == 0 and rnd[-1] == 0.05 and bool((rnd.diff() > 0).all())
        assert bool(((rnd[1:-1] >= mid[:-1]) & (rnd[1:-1] <= mid[1:])).all())


# --------------------------------------------------------------------------- stochastic adjoint


@pytest.mark.parametrize("random", [False, True], ids=["fixed-grid", "random-grid"])
def test_adjoint_gradients_equal_backprop(float64, random):
    torch.manual_seed(0)
    obj = make(end_time=0.3, g=0.5, g_end=0.8, grid="random" if random else "fixed")
    n, b = 5, 24
    x = torch.randn(b, 2)
    times = obj.time_grid(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    noise = torch.randn(n, b, 2)
    weights = torch.linspace(0.5, 1.5, b)  # a non-uniform upstream gradient
    grads = {}
    for mode in ("naive", "adjoint"):
        obj.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = obj.trajectory_loss(xg, times, noise, gradient=mode)
        (weights * out.loss).sum().backward()
        grads[mode] = (out.loss.detach(), out.x_end, xg.grad, [p.grad.clone() for p in obj.parameters()])
    (l_n, e_n, x_n, p_n), (l_a, e_a, x_a, p_a) = grads["naive"], grads["adjoint"]
    torch.testing.assert_close(l_a, l_n, rtol=1e-13, atol=0)
    torch.testing.assert_close(e_a, e_n, rtol=1e-13, atol=0)
    torch.testing.assert_close(x_a, x_n, rtol=1e-10, atol=1e-12)
    assert len(p_a) == len(p_n) > 4
    for a, b_ in zip(p_a, p_n):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_objective_loss_backward_works_for_both_modes():
    torch.manual_seed(0)
    for mode in ("adjoint", "naive"):
        obj = make(steps=[4], gradient=mode)
        out = obj.loss(torch.randn(16, 2))
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in obj.parameters())
        assert out.metrics["steps"] == 4 and out.metrics["nfe"] == 9


def saved_peak(mode: str, n: int, batch: int = 128) -> tuple[int, int]:
    torch.manual_seed(0)
    obj = make(hidden=(32, 32), steps=[n], gradient=mode)
    with SavedTensorBytes(obj.parameters()) as counter:
        out = obj.loss(torch.randn(batch, 2))
        out.loss.backward()
    assert counter.total == 0  # everything released after backward
    states = (n + 1) * batch * 2 * 4  # the adjoint's cache: x_0 … x_N in float32
    return counter.peak, states


def test_adjoint_memory_is_flat_in_steps():
    adj_small, states_small = saved_peak("adjoint", 4)
    adj_large, states_large = saved_peak("adjoint", 40)
    naive_small, _ = saved_peak("naive", 4)
    naive_large, _ = saved_peak("naive", 40)
    # beyond the cached states, the adjoint holds one node's graph whatever N is
    graph_small, graph_large = adj_small - states_small, adj_large - states_large
    assert abs(graph_large - graph_small) <= 0.01 * graph_small
    assert naive_large > 8 * naive_small  # backprop keeps all N graphs
    assert naive_large > 20 * adj_large


# --------------------------------------------------------------------------- theorem 1


class Contracting(nn.Module):
    """``−c x + net(t, x)``: a drift with a sizeable log-determinant."""

    def __init__(self, net: nn.Module, c: float) -> None:
        super().__init__()
        self.net, self.c = net, c

    def forward(self, t: Tensor, x: Tensor, cond=None) -> Tensor:
        return -self.c * x + self.net(t, x, cond)


def test_small_g_loss_is_the_discrete_flow_nll(float64):
    """Theorem 1: as g → 0 the loss minus the Gaussian terms of the forward kernels,
    ``−log p_B(x_N) + Σ ½‖δ_i^B‖² − Σ ½‖ξ_i‖²`` (the objective's reported value), becomes
    the NLL of the discrete flow ``x ↦ x + f Δ``, ``−log p_B(x_N) − Σ log|det(I + Δ_i ∂f/∂x)|``,
    on the same trajectory."""
    torch.manual_seed(0)
    n, b, g = 200, 512, 0.03
    obj = make(hidden=(32, 32), end_time=0.25, g=g, prior_std=1.0)
    obj.drift = Contracting(obj.drift, 2.0)
    x = 0.5 * torch.randn(b, 2) + 1.0
    times = obj.time_grid(n, random=True, generator=torch.Generator().manual_seed(1), dtype=F64)
    noise = torch.randn(n, b, 2)
    with torch.no_grad():
        out = obj.trajectory_loss(x, times, noise)
    nelbo = out.loss - 0.5 * noise.pow(2).sum((0, 2))
    # the same trajectory, with the exact log-determinant of each Euler step
    log_det, xs = torch.zeros(b), x
    for i in range(n):
        dt = times[i + 1] - times[i]
        xi = xs.detach().requires_grad_(True)
        f = obj.drift(times[i], xi)
        jac = torch.stack([torch.autograd.grad(f[:, k].sum(), xi, retain_graph=True)[0] for k in range(2)], 1)
        log_det += torch.linalg.slogdet(torch.eye(2) + dt * jac)[1]
        xs = (xi + f * dt + g * dt.sqrt() * noise[i]).detach()
    torch.testing.assert_close(xs, out.x_end)
    flow_nll = -obj.prior.log_prob(xs) - log_det
    diff = nelbo - flow_nll
    assert log_det.mean() < -0.9  # the test is not vacuous: ~1 nat of volume change
    assert abs(float(diff.mean())) < 0.03
    assert float(torch.corrcoef(torch.stack([nelbo, flow_nll]))[0, 1]) > 0.85


# --------------------------------------------------------------------------- training


def test_short_training_on_rings_lowers_the_loss():
    torch.manual_seed(0)
    recipe = {"data": {"name": "olympic_rings"},
              "dynamics": {"name": "mlp", "hidden": [32, 32], "time_features": 8},
              "objective": {"name": "diffflow", "steps": [5]}}
    built = flowkit.build(recipe)
    obj = built.objective
    opt = torch.optim.Adam(obj.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x, _ = built.dataset.train_batch(256, gen)
        out = obj.loss(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)


def test_progressive_schedule_switches_at_milestones():
    obj = make(steps=[2, 3, 4], milestones=[2, 5])
    assert [obj.steps_at(s) for s in range(7)] == [2, 2, 3, 3, 3, 4, 4]
    seen = []
    for step in range(1, 7):  # what the trainer does: a batch, then after_step(step)
        seen.append(int(obj.loss(torch.randn(8, 2)).metrics["steps"]))
        obj.after_step(step)
    assert seen == [2, 2, 3, 3, 3, 4]
    # the position in the schedule is saved with the weights
    fresh = make(steps=[2, 3, 4], milestones=[2, 5])
    fresh.load_state_dict(obj.state_dict())
    assert fresh.steps == 4


def test_schedule_through_the_trainer(tmp_path):
    recipe = {"data": {"name": "olympic_rings"}, "dynamics": {"name": "mlp", "hidden": [8]},
              "objective": {"name": "diffflow", "steps": [2, 3], "milestones": [2]},
              "sampler": {"name": "euler_maruyama", "steps": 3},
              "train": {"steps": 3, "batch_size": 16, "log_every": 1, "checkpoint_every": 0}}
    flowkit.train(recipe, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [2, 2, 3]
    built, _ = flowkit.load_run(tmp_path / "run", ema=False)
    assert built.objective.trained_steps == 3


# --------------------------------------------------------------------------- flow and sampling


def gaussian_flow(sigma0: float = 0.5) -> Flow:
    """``dx = dw`` from ``N(0, σ0² I)``: ``p_t = N(0, (σ0² + t) I)``, exact score."""
    def score(t, x, cond=None):
        return -x / (sigma0**2 + t)

    def drift(t, x, cond=None):
        return torch.zeros_like(x)

    return Flow(velocity=lambda t, x, cond=None: -0.5 * score(t, x), prior=StandardNormal((2,), (sigma0**2 + 1) ** 0.5),
                t0=0.0, t1=1.0, score=score, drift=drift, diffusion=lambda t: torch.ones_like(torch.as_tensor(t)))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_noise_scale_family_keeps_the_marginals(float64, lam):
    flow = gaussian_flow()
    z = flow.prior.sample(4000, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = euler_maruyama(flow, z, steps=200, noise_scale=lam, seed=1)
    assert out.nfe == 200
    var = out.x.var(0)
    se = 0.25 * (2 / 4000) ** 0.5
    assert bool(((var - 0.25).abs() < 4 * se + 0.01).all()), var
    assert out.x.mean(0).abs().max() < 4 * 0.5 / 4000**0.5


def test_noise_scale_zero_is_the_euler_pf_ode(float64):
    flow = gaussian_flow()
    z = flow.prior.sample(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    sde = euler_maruyama(flow, z, steps=20, noise_scale=0.0, seed=1).x
    ode = SAMPLERS.get("euler")(flow, z, steps=20).x
    torch.testing.assert_close(sde, ode)


def test_sampler_option_errors():
    flow = gaussian_flow()
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="noise_scale"):
        euler_maruyama(flow, z, steps=2, noise_scale=-0.1)
    with pytest.raises(ValueError, match="uniform"):
        euler_maruyama(flow, z, steps=2, grid_power=0.9, backend="torchsde")
    with pytest.raises(ValueError, match="grid_power"):
        euler_maruyama(flow, z, steps=2, grid_power=0.0)


def test_flow_fields_and_sampling(float64):
    torch.manual_seed(0)
    obj = make(end_time=0.05, g=0.2)
    flow = obj.flow()
    x, t = torch.randn(10, 2), torch.tensor(0.03)
    torch.testing.assert_close(flow.velocity(t, x), obj.drift(t, x) - 0.5 * 0.2**2 * obj.score(t, x))
    assert (flow.t0, flow.t1) == (0.0, 0.05) and flow.denoise is None
    assert flow.prior.std == pytest.approx((1 + 0.2**2 * 0.05) ** 0.5)
    z = flow.prior.sample(32, generator=torch.Generator().manual_seed(0), dtype=F64)
    for lam in (0.0, 0.5, 1.0):
        out = euler_maruyama(flow, z, steps=6, noise_scale=lam, grid_power=0.9, seed=0)
        assert out.x.shape == (32, 2) and bool(torch.isfinite(out.x).all())
    # one step with the noise-free last step is the mean of the backward kernel (eq. 12)
    one = euler_maruyama(flow, z, steps=1, seed=0).x
    t1 = torch.tensor(0.05, dtype=F64)
    torch.testing.assert_close(one, z - (obj.drift(t1, z) - 0.04 * obj.score(t1, z)) * 0.05)
    # likelihood by the probability-flow ODE, as `flowkit nll` computes it
    ll = flowkit.flow_log_likelihood(flow, x[:4], estimator="exact", method="rk4", steps=4)
    assert ll.log_prob.shape == (4,) and bool(torch.isfinite(ll.log_prob).all())
