"""The trainer end to end: learning, resume, NaN handling, CLI sample / nll."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flowkit
from flowkit.checkpoint import latest_checkpoint, load_checkpoint
from flowkit.cli import main
from flowkit.likelihood import flow_log_likelihood

from conftest import make_loss_nan

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.log_every=5", "train.checkpoint_every=0", "train.sample_every=0"]


def _recipe(*overrides):
    return flowkit.load_recipe(ROOT / "recipes/ffjord_8gaussians.yaml", [*FAST, *overrides])


def _nll(objective, n=1000):
    x, _ = flowkit.build(_recipe()).dataset.test_set(n, seed=7)
    return -flow_log_likelihood(objective.flow(), x, rtol=1e-5, atol=1e-5).log_prob.mean().item()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "ffj"
    # a fixed-step training solver keeps the cost known (NFE 6 × 4 per step)
    code = main(["train", str(ROOT / "recipes/ffjord_8gaussians.yaml"), "train.steps=200",
                 "train.batch_size=200", "train.lr=3e-3", "objective.method=rk4", "objective.steps=6",
                 *FAST, "--out", str(run), "--no-progress"])
    assert code == 0
    return run


def test_training_lowers_nll(trained_run):
    built, step = flowkit.load_run(trained_run)
    assert step == 200
    untrained = flowkit.build(_recipe()).objective
    before, after = _nll(untrained), _nll(built.objective)
    assert after < before - 1.0, (before, after)
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 200 and {"loss", "nfe", "nfe_backward", "it_per_s"} <= set(records[-1])
    assert records[-1]["loss"] < records[0]["loss"]


def test_trained_density_integrates_to_one(trained_run):
    built, _ = flowkit.load_run(trained_run)
    n, lim = 120, 4.5
    g = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    logp = flow_log_likelihood(built.objective.flow(), grid, rtol=1e-5, atol=1e-5).log_prob
    mass = logp.exp().sum().item() * (2 * lim / (n - 1)) ** 2
    assert abs(mass - 1.0) < 0.03, mass


def test_cli_nll_json_and_sample(trained_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["nll", str(trained_run), "--n", "500", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"nll", "bpd", "nfe", "n", "energy_distance", "sliced_w2"} <= set(res)
    assert res["n"] == 500 and res["bpd"] is None and res["nfe"] > 0 and math.isfinite(res["nll"])
    png = tmp_path / "s.png"
    assert main(["sample", str(trained_run), "--n", "300", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and np.load(tmp_path / "s.npy").shape == (300, 2)
    assert main(["sample", str(trained_run), "sampler=rk4", "sampler.steps=8", "--n", "50",
                 "--out", str(tmp_path / "s2.npy")]) == 0
    assert "NFE 32" in capsys.readouterr().out


def test_resume_continues_with_identical_state(tmp_path):
    # a constant schedule: a cosine one is defined by train.steps, which the resume extends
    opts = ["train.ema=0.9", "train.schedule=constant", "train.warmup=0"]
    straight = tmp_path / "straight"
    flowkit.train(_recipe("train.steps=8", *opts), straight, progress=False)
    parted = tmp_path / "parted"
    flowkit.train(_recipe("train.steps=4", *opts), parted, progress=False)
    messages = []
    flowkit.train({}, parted, overrides=["train.steps=8"], resume=True, progress=False, log=messages.append)
    assert messages[0] == "flowkit train: 1 process (cpu)"
    assert any("from step 4" in m for m in messages), messages
    a, b = load_checkpoint(straight), load_checkpoint(parted)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_nan_loss_stops_cleanly_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "nan"
    flowkit.train(_recipe("train.steps=3"), run, progress=False)
    kept = latest_checkpoint(run)
    from flowkit.objectives.ffjord import FFJORD

    make_loss_nan(monkeypatch, FFJORD)
    with pytest.raises(flowkit.TrainingDiverged, match="step 4"):
        flowkit.train({}, run, overrides=["train.steps=6"], resume=True, progress=False, log=lambda m: None)
    assert latest_checkpoint(run) == kept and load_checkpoint(run)["step"] == 3
    # on --resume the recipe file is compared with the run's: the same file, more steps
    assert main(["train", str(ROOT / "recipes/ffjord_8gaussians.yaml"), *FAST, "train.steps=6", "--out", str(run),
                 "--resume", "--no-progress"]) == 3


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from flowkit import checkpoint

    def state(step, w):  # what load_checkpoint accepts: step, model weights, recipe
        return {"step": step, "model": {"w": w}, "recipe": {"data": {"name": "8gaussians"}}}

    checkpoint.save_checkpoint(tmp_path, 1, state(1, torch.ones(2)))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, state(2, torch.zeros(2)))
    assert latest_checkpoint(tmp_path).name == "step_0000001.pt"
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.ones(2))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_learnable_end_time_receives_gradient():
    built = flowkit.build(_recipe())
    x, _ = built.dataset.train_batch(32, torch.Generator().manual_seed(0))
    built.objective.loss(x).loss.backward()
    grad = built.objective.blocks[0].log_end_time.grad
    assert grad is not None and grad.abs() > 0


@pytest.mark.parametrize("options", [
    ["objective.adjoint=true"],
    ["objective.divergence=hutchinson", "objective.noise=gaussian"],
    ["objective.kinetic=0.1", "objective.jacobian=0.1", "objective.method=rk4", "objective.steps=4"],
    ["objective.blocks=2", "dynamics.hidden=[16,16]"],
])
def test_objective_options_give_finite_gradients(options):
    built = flowkit.build(_recipe(*options))
    x, _ = built.dataset.train_batch(16, torch.Generator().manual_seed(0))
    out = built.objective.loss(x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in built.objective.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.after_backward()["nfe_backward"] > 0
