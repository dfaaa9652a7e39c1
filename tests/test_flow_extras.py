"""``Flow.extras`` is gone: the training grid a flow was built on is the declared, typed
``Flow.time_grid``, and ``euler_maruyama`` takes its ``steps`` and ``grid_power`` from it,
so the DiffFlow recipes no longer repeat ``beta`` and the last ``N`` by hand."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.dynamics.mlp import MLP
from flowkit.flow import Flow, StandardNormal, TimeGrid
from flowkit.recipe import build, load_recipe
from flowkit.samplers.sde import DEFAULT_STEPS, euler_maruyama

ROOT = Path(__file__).resolve().parents[1]

#: what each DiffFlow recipe's sampler section spelled out before it took them from the flow
REMOVED = {"diffflow_rings.yaml": (30, 0.9), "diffflow_rings_official.yaml": (30, 0.9),
           "diffflow_sierpinski.yaml": (30, 0.9), "diffflow_digits.yaml": (30, 0.9),
           "compare_rings/diffflow.yaml": (30, 0.9)}


def mlp(**over) -> MLP:
    return MLP(dim=2, **{"hidden": [8], **over})


def diffflow(**kwargs):
    torch.manual_seed(0)
    return flowkit.OBJECTIVES.build("diffflow", dynamics=mlp, shape=(2,), **kwargs)


def cheap_flow(time_grid: TimeGrid | None = None) -> Flow:
    return Flow(velocity=lambda t, x, c=None: -0.5 * x, prior=StandardNormal((2,)), t0=0.0, t1=1.0,
                score=lambda t, x, c=None: -x, drift=lambda t, x, c=None: 0 * x,
                diffusion=lambda t: torch.ones_like(torch.as_tensor(t)), time_grid=time_grid)


def test_flow_declares_a_typed_time_grid_and_no_untyped_extras():
    fields = {f.name: f for f in dataclasses.fields(Flow)}
    assert "extras" not in fields
    assert typing.get_type_hints(Flow)["time_grid"] == typing.Optional[TimeGrid]
    assert fields["time_grid"].default is None
    obj = diffflow(steps=[3, 7], milestones=[5], beta=0.8, end_time=0.05)
    assert obj.flow().time_grid == TimeGrid(steps=7, power=0.8)
    # models trained at continuous times declare none
    score = flowkit.OBJECTIVES.build("score_matching", dynamics=mlp, shape=(2,))
    assert score.flow().time_grid is None


def test_euler_maruyama_samples_diffflow_on_its_declared_grid():
    obj = diffflow(steps=[4, 6], milestones=[3], beta=0.9, end_time=0.05)
    flow = obj.flow()
    z = flow.prior.sample(16, generator=torch.Generator().manual_seed(0))
    default = euler_maruyama(flow, z, seed=3)
    spelled = euler_maruyama(flow, z, steps=6, grid_power=0.9, seed=3)
    assert default.nfe == spelled.nfe == 6
    assert torch.equal(default.x, spelled.x)
    # what the recipe gives still wins over the flow's declaration
    assert euler_maruyama(flow, z, steps=2, seed=3).nfe == 2
    uniform = euler_maruyama(flow, z, steps=6, grid_power=1.0, seed=3).x
    assert not torch.equal(uniform, default.x)
    partial = euler_maruyama(flow, z, steps=6, seed=3).x  # power from the flow
    assert torch.equal(partial, default.x)


def test_flow_without_time_grid_keeps_500_uniform_steps():
    flow = cheap_flow()
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = euler_maruyama(flow, z, seed=1)
    assert DEFAULT_STEPS == 500 and out.nfe == 500
    assert torch.equal(out.x, euler_maruyama(flow, z, steps=500, grid_power=1.0, seed=1).x)


def test_torchsde_backend_refuses_a_declared_nonuniform_grid():
    flow = cheap_flow(TimeGrid(steps=4, power=0.9))
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="uniform.*declared time_grid"):
        euler_maruyama(flow, z, backend="torchsde", seed=0)
    assert euler_maruyama(flow, z, backend="torchsde", grid_power=1.0, seed=0).nfe >= 4


@pytest.mark.parametrize("bad, match", [({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"),
                                        ({"steps": 3, "power": 0.0}, "power"),
                                        ({"steps": 3, "power": float("inf")}, "power")])
def test_time_grid_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=f"TimeGrid.{match}"):
        TimeGrid(**bad)


def test_time_grid_is_diffflow_power_grid_reversed():
    from flowkit.objectives.diffflow import power_grid

    times = TimeGrid(steps=30, power=0.9).times(0.0, 0.05, like=torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(times, power_grid(30, 0.05, 0.9, dtype=torch.float64).flip(0), rtol=0, atol=1e-17)


@pytest.mark.parametrize("name", sorted(REMOVED))
def test_diffflow_recipes_sample_as_when_they_spelled_the_grid_out(name):
    """Same samples for the same seed as the recipe's former ``steps``/``grid_power``."""
    recipe = load_recipe(ROOT / "recipes" / name)
    steps, power = REMOVED[name]
    assert "grid_power" not in recipe["sampler"] and "steps" not in recipe["sampler"]
    recipe["data"] = {"name": "olympic_rings"}  # the grid is the objective's; keep the build cheap
    recipe["dynamics"] = {"name": "mlp", "hidden": [8]}
    built = build(recipe)
    flow = built.objective.flow()
    z = flow.prior.sample(8, generator=torch.Generator().manual_seed(0))
    now = built.sampler(flow, z, seed=0)
    before = built.sampler(flow, z, seed=0, steps=steps, grid_power=power)
    assert now.nfe == before.nfe == steps
    assert torch.equal(now.x, before.x)
