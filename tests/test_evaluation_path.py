"""One evaluation path: the trainer's periodic NLL, `flowkit nll` and `flowkit compare` agree."""

import json
from pathlib import Path

import yaml

from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_nll_and_compare_report_the_same_number_in_data_units(tmp_path, capsys):
    # standardized data: the model works in standardized units, the NLL must refer to the data
    recipe = yaml.safe_load((ROOT / "recipes/cfm_8gaussians.yaml").read_text())
    recipe["data"] = {"name": "standardized", "data": {"name": "8gaussians"}, "reference": 2000}
    recipe["eval"] = {"n": 300, "metrics": True, "metric_samples": 200, "method": "rk4", "steps": 8}
    recipe["sampler"] = {"name": "euler", "steps": 4}
    path = tmp_path / "std.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fast = ["train.steps=20", "train.batch_size=64", "train.eval_every=20", "train.log_every=20",
            "train.checkpoint_every=0", "train.sample_every=0", "train.ema=0"]
    assert main(["train", str(path), *fast, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    eval_nll = [r["eval_nll"] for r in logged if "eval_nll" in r][-1]
    capsys.readouterr()

    assert main(["nll", str(tmp_path / "run"), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert abs(cli["nll"] - eval_nll) < 1e-9  # same points, same solver, same units
    assert "energy_distance" in cli and cli["sample_nfe"] == 4

    from flowkit.compare import compare

    rows = compare([str(path)], tmp_path / "cmp", overrides=fast, samples=200, log=lambda *a: None)
    assert rows[0]["status"] == "ok"
    # the standardisation's log-determinant is included: ~8gaussians' scale, far from the model's units
    from flowkit import load_run

    built, _ = load_run(tmp_path / "run")
    assert abs(float(built.dataset.model_log_det(built.dataset.test_set(2, seed=0)[0])[0])) > 0.1
