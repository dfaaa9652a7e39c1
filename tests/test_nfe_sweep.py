"""Quality against NFE (flowkit.nfe_sweep): the budget → steps conversion of every sampler family,
checked against the NFE each sampler reports, and the sweep's mechanics on tiny untrained models."""

from __future__ import annotations

import csv
import inspect
import json
import math

import pytest
import torch

import flowkit
from flowkit.diffusion import flow_from_score
from flowkit.flow import Flow
from flowkit.nfe_sweep import SweepModel, nfe_of_steps, nfe_sweep, sampler_label, steps_for_nfe, sweep_runs
from flowkit.paths import VP, CondOT

RECIPE = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]}}


def _stepped_samplers() -> list[str]:
    return [n for n in flowkit.SAMPLERS.names() if "steps" in inspect.signature(flowkit.SAMPLERS.get(n)).parameters]


def _flow_for(name: str, path) -> Flow:
    """A cheap closed-form flow with every part a sampler may need (data N(0, I): score −x)."""
    flow = flow_from_score(lambda t, x, cond=None: -x, path, (2,))
    flow.flow_map = lambda x, t, s, cond=None: x
    return flow


@pytest.mark.parametrize("path", [VP(), CondOT()], ids=["vp", "cond_ot"])
@pytest.mark.parametrize("name", _stepped_samplers())
def test_nfe_rule_matches_what_every_sampler_spends(name, path):
    """For every registered sampler with ``steps``: the rule's NFE is the sampler's own count, and
    the steps chosen for a budget spend at most the budget, one more step more than it."""
    flow = _flow_for(name, path)
    x = torch.zeros(3, 2)
    sampler = flowkit.SAMPLERS.get(name)
    options = {"method": "rk4"} if name == "probability_flow" else {}
    for steps in (1, 2, 3, 5):
        assert nfe_of_steps(name, flow, steps, **options) == sampler(flow, x, steps=steps, **options).nfe, (name, steps)
    for budget in (1, 2, 3, 4, 7, 8, 16):
        steps = steps_for_nfe(name, flow, budget, **options)
        if steps is None:
            assert nfe_of_steps(name, flow, 1, **options) > budget
            continue
        assert nfe_of_steps(name, flow, steps, **options) <= budget < nfe_of_steps(name, flow, steps + 1, **options)


def test_costs_per_step_of_each_family():
    flow = _flow_for("x", CondOT())
    vp = _flow_for("x", VP())
    assert [steps_for_nfe("euler", flow, b) for b in (1, 2, 7)] == [1, 2, 7]
    assert [steps_for_nfe("heun", flow, b) for b in (1, 2, 3, 8)] == [None, 1, 1, 4]
    assert [steps_for_nfe("midpoint", flow, b) for b in (3, 8)] == [1, 4]
    assert [steps_for_nfe("rk4", flow, b) for b in (3, 4, 7, 16)] == [None, 1, 1, 4]
    assert steps_for_nfe("probability_flow", flow, 8, method="heun") == 4
    assert steps_for_nfe("probability_flow", flow, 8) is None  # dopri5: adaptive, no budget
    assert nfe_of_steps("dopri5", flow, 3) is None
    # EDM Heun: 2 a step, 1 out of α = 0 (cond_ot's t1) and 1 into σ = 0 (the last, "denoise")
    assert [nfe_of_steps("edm_heun", flow, k) for k in (1, 2, 3)] == [1, 2, 4]
    assert [nfe_of_steps("edm_heun", vp, k) for k in (1, 2, 3)] == [1, 3, 5]
    assert nfe_of_steps("edm_heun", vp, 3, final="t0") == 6
    assert steps_for_nfe("edm_heun", vp, 4) == 2  # 3 NFE: the budget rounded down
    assert nfe_of_steps("predictor_corrector", vp, 4, corrector_steps=2) == 4 * 3 + 1  # + Tweedie
    with pytest.raises(ValueError, match="integer >= 1"):
        steps_for_nfe("euler", flow, 0)


def _tiny(objective: dict) -> SweepModel:
    torch.manual_seed(0)
    built = flowkit.build({**RECIPE, "objective": objective})
    built.objective.eval()
    return SweepModel.from_built(built)


def test_sweep_skips_what_does_not_apply_and_writes_table_and_plot(tmp_path):
    models = {"cfm": _tiny({"name": "cfm"}), "meanflow": _tiny({"name": "meanflow"})}
    if "flow_map" not in models["meanflow"].objective.provides:
        pytest.skip("meanflow provides no flow_map")
    res = nfe_sweep(models, ["heun", "dpmpp_2m", "flow_map"], [1, 3], n=32, seeds=(0, 1))
    rows = {(r.model, r.sampler, r.budget): r for r in res.rows}
    assert rows["cfm", "flow_map", 1].status.startswith("skipped: needs flow_map")
    assert rows["cfm", "heun", 1].status == "skipped: one step costs more than the budget"
    heun = rows["cfm", "heun", 3]  # rounded down: one step, 2 NFE
    assert heun.status == "ok" and heun.nfe == 2 and heun.steps == 1
    assert rows["cfm", "dopri5", None].status == "reference" and rows["cfm", "dopri5", None].nfe > 4
    ok = rows["meanflow", "flow_map", 3]
    assert ok.status == "ok" and ok.nfe == 3 and ok.seeds == 2
    assert ok.energy_distance >= 0 and ok.sliced_w2 > 0 and not math.isnan(ok.energy_distance_se)
    assert len(ok.values["energy_distance"]) == 2
    paths = res.write(tmp_path / "sweep")
    md, table, data, png = (p.read_text() if p.suffix != ".png" else p.read_bytes() for p in paths)
    assert "| cfm | flow_map | skipped |" in md and "needs flow_map" in md
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(table.splitlines()))) == len(res.rows)
    assert len(json.loads(data)["rows"]) == len(res.rows)


def test_sweep_metrics_are_the_metrics_of_the_samples():
    """One model, one seed: the row's numbers are energy distance / sliced W2 of the very samples
    the sampler draws from the seeded prior, against the seeded test set."""
    model = _tiny({"name": "cfm"})
    res = nfe_sweep({"m": model}, ["euler"], [3], n=50, seeds=(4,), reference=None)
    (row,) = res.rows
    flow = model.objective.flow()
    z = flow.prior.sample(50, generator=torch.Generator().manual_seed(4))
    x = flowkit.SAMPLERS.get("euler")(flow, z, steps=3).x
    test = model.dataset.test_set(50, seed=1234 + 4)[0]
    assert row.energy_distance == pytest.approx(flowkit.metrics.energy_distance(x, test), rel=1e-6)
    assert row.sliced_w2 == pytest.approx(flowkit.metrics.sliced_wasserstein(x, test, seed=4), rel=1e-6)
    assert math.isnan(row.energy_distance_se)  # one seed: no standard error


def test_bad_inputs_are_refused():
    model = _tiny({"name": "cfm"})
    with pytest.raises(ValueError, match="NFE budget"):
        nfe_sweep({"m": model}, ["euler"], [0], n=8)
    with pytest.raises(ValueError, match="set by the NFE budget"):
        nfe_sweep({"m": model}, [{"name": "euler", "steps": 3}], [2], n=8)
    with pytest.raises(Exception, match="eulr"):
        nfe_sweep({"m": model}, ["eulr"], [2], n=8)
    assert sampler_label({"name": "flow_map", "renoise": True}) == "flow_map renoise=True"


def test_cli_lists_are_parsed_and_checked():
    from flowkit.nfe_sweep import parse_nfes, parse_samplers

    assert parse_nfes("1, 2,4") == [1, 2, 4]
    for bad in ("0", "1,x", "2,-1", ""):
        with pytest.raises(ValueError, match="--nfe"):
            parse_nfes(bad)
    assert parse_samplers("dpmpp_2m,unipc") == ["dpmpp_2m", "unipc"]
    with pytest.raises(ValueError, match="unknown sampler dpmpp_9m"):
        parse_samplers("dpmpp_2m,dpmpp_9m")


def test_sweep_runs_loads_run_directories(tmp_path):
    flowkit.train({**RECIPE, "objective": {"name": "cfm"},
                   "train": {"steps": 2, "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "sample_every": 0}},
                  tmp_path / "run", progress=False, log=lambda *_: None)
    result, paths = sweep_runs({"tiny": tmp_path / "run"}, ["euler"], [2], tmp_path / "nfe", n=16, seeds=(0,),
                               reference=None)
    assert [(r.model, r.sampler, r.nfe) for r in result.rows] == [("tiny", "euler", 2)]
    assert [p.name for p in paths] == ["nfe.md", "nfe.csv", "nfe.json", "nfe.png"] and all(p.is_file() for p in paths)
