"""Sharded likelihood evaluation: the test batches dealt to several processes give the numbers of one.

The fast tests check the dealing and the merge in one process (every batch solved once, probes
seeded by the batch, not by the process); one launches two real processes with
``accelerate launch --multi_gpu --num_processes 2 -m flowkit.cli nll`` and compares every
point with the one-process evaluation.
"""

import json
import os
import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import flowkit
from flowkit.config import EvalConfig
from flowkit.evaluate import NLLPoints, Sharding, evaluate_nll, merge_points, nll_points, shard_batches
from flowkit.flow import Flow, StandardNormal

ROOT = Path(__file__).resolve().parents[1]


def _linear_flow() -> Flow:
    """``dx/dt = A x``: ``log p(x) = log N(e^{A} x) + tr A`` exactly (the solve is checked below)."""
    a = torch.tensor([[-0.3, 0.2], [0.0, -0.6]])
    return Flow(velocity=lambda t, x, cond=None: x @ a.T, prior=StandardNormal((2,)))


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (10, 3, 3), (4, 5, 3), (7, 1, 4)])
def test_every_batch_is_dealt_to_exactly_one_process_in_the_one_process_order(n, batch, world):
    dealt = sorted(b for r in range(world) for b in shard_batches(n, batch, r, world))
    assert dealt == shard_batches(n, batch)  # the one-process batching, each batch once
    assert [i for _, start, stop in dealt for i in range(start, stop)] == list(range(n))
    for r in range(world):
        assert all(b % world == r for b, _, _ in shard_batches(n, batch, r, world))


def test_shards_merged_give_the_one_process_numbers_with_hutchinson_probes():
    """Hutchinson probes are random: seeded per batch, the shards reproduce one process bit for bit
    (seeded per process, the second process's first batch would reuse batch 0's probes)."""
    flow = _linear_flow()
    x = torch.randn(11, 2, generator=torch.Generator().manual_seed(3))
    cfg = EvalConfig(n=11, batch_size=3, divergence="hutchinson", n_probes=1, seed=7)
    whole = nll_points(flow, x, cfg)
    parts = [nll_points(flow, x, cfg, sharding=Sharding(r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [5, 3, 3]
    merged = merge_points(parts)
    assert torch.equal(merged.index, torch.arange(11))
    assert torch.equal(merged.log_likelihood, whole.log_likelihood)
    assert torch.equal(merged.latent, whole.latent) and torch.equal(merged.nfe, whole.nfe)
    assert merged.process.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0]
    # and the numbers are the model's: the exact log-density within Hutchinson's noise on average
    exact = nll_points(flow, x, replace(cfg, divergence="exact")).log_likelihood
    a = torch.tensor([[-0.3, 0.2], [0.0, -0.6]], dtype=torch.float64)
    z = x.double() @ torch.linalg.matrix_exp(a).T
    closed = -0.5 * (z ** 2).sum(1) - np.log(2 * np.pi) + float(torch.trace(a))
    assert torch.allclose(exact, closed, atol=1e-4)


def test_evaluate_nll_refuses_a_gather_that_loses_points():
    flow, x = _linear_flow(), torch.randn(6, 2)
    lossy = Sharding(0, 2, gather=lambda p: p)  # returns this process's points only
    with pytest.raises(flowkit.FieldError, match="4 of 6 points came back"):
        evaluate_nll(flow, x, EvalConfig(n=6, batch_size=2), sharding=lossy)


def test_merge_refuses_a_point_solved_twice():
    p = NLLPoints(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.long),
                  torch.zeros(2, 2))
    with pytest.raises(ValueError, match="more than one process"):
        merge_points([p, p])


# ------------------------------------------------------------------ two real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_processes_give_the_one_process_points(tmp_path):
    run = tmp_path / "run"
    recipe = flowkit.load_recipe(ROOT / "recipes/cfm_8gaussians.yaml",
                                 ["train.steps=2", "dynamics.hidden=[16]", "train.sample_every=0",
                                  "train.checkpoint_every=0", "eval.divergence=hutchinson"])
    flowkit.train(recipe, run, progress=False, log=lambda *a, **k: None)
    args = ["nll", str(run), "--n", "40", "--batch-size", "10", "--json"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "flowkit.cli"]
    two = subprocess.run([*launch, *args, "--save-points", str(tmp_path / "two.npz")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("flowkit nll: 2 processes (cpu, gloo)") == 1
    one = subprocess.run(["python", "-m", "flowkit.cli", *args, "--save-points", str(tmp_path / "one.npz")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(set(a["process"].tolist())) == [0, 1] and set(b["process"].tolist()) == {0}  # two really ran
    assert a["process"].tolist() == [0] * 10 + [1] * 10 + [0] * 10 + [1] * 10
    assert a["index"].tolist() == b["index"].tolist() == list(range(40))
    np.testing.assert_array_equal(a["log_prob"], b["log_prob"])
    np.testing.assert_array_equal(a["nfe"], b["nfe"])
    np.testing.assert_array_equal(a["latent"], b["latent"])
    res_two = json.loads(two.stdout.strip().splitlines()[-1])
    res_one = json.loads(one.stdout.strip().splitlines()[-1])
    assert res_two["processes"] == 2 and res_two["nll"] == res_one["nll"] and res_two["n"] == 40
