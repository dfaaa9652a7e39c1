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
                 "--out", str(tmp_path / "cmp"), "--samples", "200", "--set", *TINY])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "cmp/compare.csv")))
    assert [r["run"] for r in rows] == ["ffjord_8gaussians", "ffjord_checkerboard", "broken"]
    assert rows[0]["status"] == "ok" and float(rows[0]["nll"]) > 0 and int(rows[0]["parameters"]) > 1000
    assert rows[0]["energy_distance"] and rows[0]["sample_nfe"] == "8"
    assert rows[2]["status"].startswith("failed (exit 3)")
    assert "| run | status |" in (tmp_path / "cmp/compare.md").read_text()
    assert (tmp_path / "cmp/samples.png").stat().st_size > 1000


def test_compare_into_an_out_holding_its_runs_is_refused(tmp_path, capsys):
    a = str(ROOT / "recipes/cfm_8gaussians.yaml")
    args = ["compare", a, "--out", str(tmp_path / "cmp"), "--samples", "100", "--set",
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
