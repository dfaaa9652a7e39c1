"""``flowkit nll`` and evaluation by what the objective declares: no density (consistency), a
variational bound (vae), per-point results (``--save-points``) and a model you bring
(``--model DIR --adapter NAME --data RECIPE``)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flowkit
from flowkit.cli import main
from flowkit.compare import run_one
from flowkit.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *a, **k: None)


def _train(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    run = tmp_path / Path(recipe).stem
    flowkit.train(flowkit.load_recipe(ROOT / "recipes" / recipe, ["train.sample_every=0", "train.checkpoint_every=0",
                                                                   *overrides]), run, **QUIET)
    return run


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return rc, out.out, out.err


# ------------------------------------------------------------------ models without a density


@pytest.fixture(scope="module")
def consistency_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    return _train(tmp, "consistency_8gaussians.yaml", "train.steps=2", "dynamics.hidden=[16]", "train.eval_every=2",
                  "train.eval_points=64", "train.eval_samples=64", "eval.n=64")


def test_flowkit_nll_refuses_a_consistency_model_in_one_line(consistency_run, capsys):
    rc, out, err = _cli(["nll", str(consistency_run)], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("flowkit nll: flowkit nll: ConsistencyTraining defines no density")
    assert len(err.strip().splitlines()) == 1


def test_a_consistency_model_is_evaluated_by_its_samples_alone(consistency_run):
    built, _ = flowkit.load_run(consistency_run)
    assert built.sampler.name == "flow_map"
    ev = flowkit.evaluate_model(built.objective.eval(), built.dataset, built.sampler, EvalConfig(n=64, metric_samples=64))
    res = ev.metrics
    assert res["nll"] is None and res["bpd"] is None and res["nfe"] is None and res["sample_nfe"] == 1
    assert math.isfinite(res["energy_distance"]) and res["energy_distance"] >= 0
    with pytest.raises(flowkit.objectives.NoDensityError, match="defines no density"):
        flowkit.evaluate_model(built.objective, built.dataset, built.sampler, EvalConfig(n=64, metrics=False))
    # the periodic evaluation logged a row with no NLL and a sample metric
    records = [json.loads(line) for line in (consistency_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_nll" in r]
    assert evals and evals[-1]["eval_nll"] is None and math.isfinite(evals[-1]["eval_energy_distance"])


def test_compare_gives_a_consistency_model_a_row_without_nll(consistency_run, tmp_path):
    recipe = flowkit.load_recipe(ROOT / "recipes/consistency_8gaussians.yaml",
                                 ["train.steps=2", "dynamics.hidden=[16]", "train.sample_every=0",
                                  "train.checkpoint_every=0"])
    row = run_one({"name": "ct", "seed": None, "source": "ct.yaml", "recipe": recipe, "run_dir": str(tmp_path / "ct"),
                   "eval": dict(vars(EvalConfig(n=64, metric_samples=64)))})
    assert row["status"] == "ok", row["status"]
    assert row["nll"] is None and row["sampler"] == "flow_map" and math.isfinite(row["energy_distance"])


def test_a_consistency_recipe_without_a_sampler_gets_one_it_can_serve():
    recipe = flowkit.load_recipe(ROOT / "recipes/consistency_8gaussians.yaml")
    recipe.pop("sampler")
    flowkit.validate(recipe)  # was refused: the default dopri5 needs a velocity
    assert flowkit.recipe.resolve_defaults(recipe)["sampler"]["name"] == "flow_map"


# ------------------------------------------------------------------ a variational model


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    return _train(tmp, "vae_digits_planar.yaml", "train.steps=3", "objective.encoder=[16]", "objective.decoder=[16]",
                  "train.eval_every=3", "train.eval_points=32", "eval.iwae_k=4")


def test_flowkit_nll_of_a_vae_prints_its_bounds(vae_run, capsys):
    rc, out, _ = _cli(["nll", str(vae_run), "--n", "32", "--json"], capsys)
    res = json.loads(out)
    assert rc == 0 and res["iwae_k"] == 4 and res["n"] == 32
    assert res["nll"] <= res["neg_elbo"] + 1e-6  # IWAE bound (k = 4) below the negative ELBO
    assert res["neg_elbo"] == pytest.approx(res["recon"] + res["kl"], abs=1e-6)
    rc, out, _ = _cli(["nll", str(vae_run), "--n", "32"], capsys)
    assert rc == 0 and out.startswith("test negative ELBO ") and "IWAE NLL (k=4)" in out
    record = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["eval_iwae_k"] == 4 and record["eval_nll"] <= record["eval_neg_elbo"] + 1e-6


def test_flowkit_sample_of_a_vae_writes_prior_samples_and_reconstructions(vae_run, tmp_path, capsys):
    out_png = tmp_path / "s.png"
    rc, out, _ = _cli(["sample", str(vae_run), "--n", "16", "--out", str(out_png)], capsys)
    assert rc == 0 and out_png.is_file() and (tmp_path / "s_reconstructions.png").is_file()
    assert np.load(tmp_path / "s.npy").shape == (16, 1, 8, 8)
    rc, _, err = _cli(["sample", str(vae_run), "--n", "4", "--out", str(tmp_path / "c.png"), "--cond", "3"], capsys)
    assert rc == 2 and "--cond / --guidance" in err


# ------------------------------------------------------------------ per-point results of a trained run


def test_save_points_of_a_trained_run_are_the_reported_nll(tmp_path, capsys):
    run = _train(tmp_path, "cfm_8gaussians.yaml", "train.steps=2", "dynamics.hidden=[16]")
    points = tmp_path / "p.npz"
    rc, out, _ = _cli(["nll", str(run), "--n", "12", "--batch-size", "5", "--json", "--save-points", str(points)],
                      capsys)
    res = json.loads(out)
    saved = np.load(points)
    assert rc == 0 and saved["index"].tolist() == list(range(12)) and saved["latent"].shape == (12, 2)
    assert -saved["log_prob"].mean() == pytest.approx(res["nll"], abs=1e-12)
    assert (saved["nfe"][:5] == saved["nfe"][0]).all() and saved["nfe"].min() > 0  # one solve per batch
    # the latent is the flow's image of the point: its prior density plus the log-determinant
    built, _ = flowkit.load_run(run)
    x, _ = built.dataset.test_set(12, seed=built.eval.seed)
    direct = flowkit.flow_log_likelihood(built.objective.flow(), x[:5], solver=built.eval.solver)
    assert np.allclose(saved["latent"][:5], direct.z.double().numpy(), atol=1e-6)
    rc, _, err = _cli(["nll", str(run), "--save-points", str(tmp_path / "p.csv")], capsys)
    assert rc == 2 and "--save-points" in err and ".npz" in err


# ------------------------------------------------------------------ a model you bring


class _Gaussian(torch.nn.Module):
    """The exact EDM denoiser of N(0, I) data: ``D(x, σ) = x / (1 + σ²)``."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def _edm_dir(tmp_path: Path) -> Path:
    model = tmp_path / "edm"
    model.mkdir()
    torch.jit.save(torch.jit.script(_Gaussian()), str(model / "model.pt"))
    (model / "adapter.json").write_text(json.dumps({"shape": [1, 8, 8], "sigma_min": 0.01, "sigma_max": 80.0}))
    return model


def test_flowkit_nll_of_a_brought_model_is_the_dequantisation_bound(tmp_path, capsys):
    from flowkit.adapters import load_model
    from flowkit.dequantise import Quantisation, discrete_log_likelihood
    from flowkit.solvers import SolverSpec

    model, data = _edm_dir(tmp_path), tmp_path / "digits.yaml"
    data.write_text("data: {name: digits}\n")
    points = tmp_path / "pts.npz"
    rc, out, _ = _cli(["nll", "--model", str(model), "--adapter", "edm", "--data", str(data), "--n", "4",
                       "--batch-size", "2", "--draws", "2", "--json", "--save-points", str(points)], capsys)
    res = json.loads(out)
    assert rc == 0 and res["n"] == 4 and res["draws"] == 2 and res["processes"] == 1
    # the same numbers, batch by batch, as flowkit.dequantise called directly (batch b seeded by b)
    from flowkit.evaluate import _batch_seed

    flow, dataset = load_model(model, "edm"), flowkit.recipe.build_data({"data": {"name": "digits"}})
    quant = Quantisation.centred(dataset.levels, -1.0, 1.0)
    values = torch.cat([discrete_log_likelihood(
        flow, dataset.test[s:s + 2], quant, draws=2, generator=torch.Generator().manual_seed(_batch_seed(0, b)),
        dtype=torch.float32, solver=SolverSpec("dopri5", rtol=1e-5, atol=1e-5)).values for b, s in ((0, 0), (1, 2))], 1)
    expected = -values.mean() / (64 * math.log(2))
    assert res["bpd"] == pytest.approx(float(expected), rel=1e-9)
    saved = np.load(points)
    assert saved["index"].tolist() == list(range(4)) and saved["latent"].shape == (4, 1, 8, 8)
    assert np.allclose(saved["log_prob"], values.mean(0).numpy())


@pytest.mark.parametrize("argv,message", [
    (["--adapter", "edm"], "--model DIR, --data RECIPE"),
    (["--adapter", "edm", "--model", "M"], "--data RECIPE"),
])
def test_a_brought_model_needs_model_adapter_and_data(argv, message, capsys):
    rc, _, err = _cli(["nll", *argv], capsys)
    assert rc == 2 and message in err


def test_a_brought_model_needs_quantised_image_data(tmp_path, capsys):
    data = tmp_path / "g.yaml"
    data.write_text("data: {name: 8gaussians}\n")
    rc, _, err = _cli(["nll", "--model", str(_edm_dir(tmp_path)), "--adapter", "edm", "--data", str(data)], capsys)
    assert rc == 2 and f"--data {data}" in err and "quantised images" in err


def test_a_missing_model_directory_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.yaml"
    data.write_text("data: {name: digits}\n")
    rc, _, err = _cli(["nll", "--model", str(tmp_path / "none"), "--adapter", "edm", "--data", str(data)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
