"""`flowkit compare` on two tiny recipes: table, CSV and picture; failures are reported."""

import csv
from pathlib import Path

import yaml

from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=3", "train.batch_size=32", "train.checkpoint_every=0", "train.sample_every=0",
        "eval.n=200", "objective.method=rk4", "objective.steps=2", "sampler=rk4", "sampler.steps=2"]


def test_compare_writes_table_csv_and_png(tmp_path, capsys):
    a = ROOT / "recipes/ffjord_8gaussians.yaml"
    broken = tmp_path / "broken.yaml"
    recipe = yaml.safe_load(a.read_text())
    recipe["train"]["lr"] = 1e4  # a valid recipe whose training diverges: reported, not fatal
    broken.write_text("# flowkit train broken.yaml\n" + yaml.safe_dump(recipe))
    code = main(["compare", str(a), str(ROOT / "recipes/ffjord_checkerboard.yaml"), str(broken),
                 "--out", str(tmp_path / "cmp"), "--samples", "200", "--curve-points", "0", "--set", *TINY])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "cmp/compare.csv")))
    assert [r["run"] for r in rows] == ["ffjord_8gaussians", "ffjord_checkerboard", "broken"]
    assert rows[0]["status"] == "ok" and float(rows[0]["nll"]) > 0 and int(rows[0]["parameters"]) > 1000
    assert float(rows[0]["energy_distance"]) >= 0 and float(rows[0]["mmd"]) > 0 and rows[0]["sample_nfe"] == "8"
    assert rows[0]["lr"] == "0.005" and rows[0]["batch_size"] == "32" and rows[0]["stopped_by"] == "steps"
    assert rows[2]["status"].startswith("diverged: training diverged at step")
    assert "| run | status |" in (tmp_path / "cmp/compare.md").read_text()
    assert (tmp_path / "cmp/samples.png").stat().st_size > 1000


def test_compare_into_an_out_holding_its_runs_is_refused(tmp_path, capsys):
    a = str(ROOT / "recipes/cfm_8gaussians.yaml")
    args = ["compare", a, "--out", str(tmp_path / "cmp"), "--samples", "100", "--curve-points", "0", "--set",
            "train.steps=2", "train.batch_size=16", "eval.n=100", "sampler=euler", "sampler.steps=2"]
    assert main(args) == 0
    first = (tmp_path / "cmp/cfm_8gaussians/recipe.yaml").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds the runs cfm_8gaussians" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "cmp/cfm_8gaussians/recipe.yaml").stat().st_mtime_ns == first  # untouched
    assert main(args + ["--overwrite"]) == 0
    assert main(["compare", a, "--out", str(tmp_path / "x"), "--samples", "0"]) == 2


def test_compare_refuses_a_bad_budget_seed_count_or_jobs_before_training(tmp_path, capsys):
    a = str(ROOT / "recipes/cfm_8gaussians.yaml")
    for args, message in ((["--budget", "minutes=3"], "--budget minutes=3: expected steps=N, seconds=S or evaluations=E"),
                          (["--budget", "seconds=0"], "positive"), (["--seeds", "0"], "--seeds must be a positive"),
                          (["--jobs", "-1"], "--jobs must be a positive"), (["--curve-points", "-2"], "--curve-points")):
        assert main(["compare", a, "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_compare_objectives_use_the_recipes_compare_block_and_state_it(tmp_path, capsys):
    # the base recipe's compare block sets score matching's sampler and learning rate; the table says so
    recipe = yaml.safe_load((ROOT / "recipes/cfm_8gaussians.yaml").read_text())
    recipe["compare"] = {"score_matching": {"sampler": {"name": "euler_maruyama", "steps": 5}, "train": {"lr": 3.0e-3}}}
    base = tmp_path / "base.yaml"
    base.write_text("# flowkit compare base.yaml --objectives cfm,score_matching\n" + yaml.safe_dump(recipe))
    assert main(["train", str(base), "--out", str(tmp_path / "plain"), "--no-progress", "train.steps=2",
                 "train.checkpoint_every=0", "train.sample_every=0"]) == 0  # train validates and ignores the block
    from flowkit.compare import Budget, compare

    rows = compare([str(base)], tmp_path / "cmp", objectives="cfm,score_matching", budget=Budget("evaluations", 6),
                   overrides=["train.batch_size=16", "eval.n=100", "eval.method=rk4", "eval.steps=2",
                              "train.checkpoint_every=0", "train.sample_every=0"],
                   curve_points=0, samples=100, isolate=False, log=lambda *a: None)
    assert [(r["run"], r["lr"], r["sampler"], r["step"], r["evaluations"], r["stopped_by"]) for r in rows] == [
        ("cfm", 1e-3, "dopri5", 6, 6, "max_evaluations"), ("score_matching", 3e-3, "euler_maruyama", 6, 6, "max_evaluations")]
    table = (tmp_path / "cmp/compare.md").read_text()
    assert "| score_matching | score_matching | 0.003 | 16 |" in table
