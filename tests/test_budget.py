"""Training budgets: a run stops on wall-clock time or network evaluations as well as on steps."""

import json
from pathlib import Path

import pytest

from flowkit.checkpoint import load_checkpoint
from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.batch_size=32", "train.log_every=1000", "train.checkpoint_every=0", "train.sample_every=0",
        "train.threads=1", "--no-progress"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_evaluation_budget_counts_the_solvers_evaluations(tmp_path, capsys):
    # FFJORD with rk4 in 2 steps: 8 evaluations per training step, so a budget of 20 ends at step 3
    run = tmp_path / "ffjord"
    assert main(["train", str(ROOT / "recipes/ffjord_8gaussians.yaml"), *FAST, "objective.method=rk4",
                 "objective.steps=2", "train.steps=1000", "train.max_evaluations=20", "--out", str(run)]) == 0
    assert "to step 3 (stopped by train.max_evaluations)" in capsys.readouterr().out
    last = _records(run)[-1]
    assert last["step"] == 3 and last["evaluations"] == 24
    state = load_checkpoint(run)
    assert state["step"] == 3 and state["evaluations"] == 24

    # a flow-matching step is one evaluation
    run = tmp_path / "cfm"
    assert main(["train", str(ROOT / "recipes/cfm_8gaussians.yaml"), *FAST, "train.steps=1000",
                 "train.max_evaluations=5", "--out", str(run)]) == 0
    assert _records(run)[-1]["step"] == 5


def test_a_time_budget_is_summed_over_resumes(tmp_path, capsys):
    run = tmp_path / "cfm"
    recipe = str(ROOT / "recipes/cfm_8gaussians.yaml")
    assert main(["train", recipe, *FAST, "train.steps=1000000", "train.max_seconds=0.2", "--out", str(run)]) == 0
    assert "stopped by train.max_seconds" in capsys.readouterr().out
    first = load_checkpoint(run)
    assert 0.2 <= first["train_seconds"] < 5 and 0 < first["step"] < 1000000
    assert main(["train", recipe, *FAST, "train.steps=1000000", "train.max_seconds=0.4", "--out", str(run),
                 "--resume"]) == 0
    second = load_checkpoint(run)
    assert second["step"] > first["step"]
    assert 0.4 <= second["train_seconds"] < 0.4 + (0.2 + first["train_seconds"])  # carried over, not restarted
    assert _records(run)[-1]["train_seconds"] == second["train_seconds"]


def test_each_budget_stops_within_one_step_of_being_spent(tmp_path, capsys):
    logged = [*FAST[:-1], "train.log_every=1", "--no-progress"]
    recipe = str(ROOT / "recipes/cfm_8gaussians.yaml")
    # steps: exactly the count
    assert main(["train", recipe, *logged, "train.steps=7", "--out", str(tmp_path / "steps")]) == 0
    assert [r["step"] for r in _records(tmp_path / "steps")][-1] == 7
    # seconds and evaluations: the step that spent the budget is the last, the one before had not
    for name, key, setting in (("seconds", "train_seconds", "train.max_seconds=0.15"),
                               ("evaluations", "evaluations", "train.max_evaluations=9")):
        run = tmp_path / name
        assert main(["train", recipe, *logged, "train.steps=1000000", setting, "--out", str(run)]) == 0
        limit = float(setting.split("=")[1])
        records = _records(run)
        assert records[-2][key] < limit <= records[-1][key], (records[-2][key], records[-1][key])
        assert load_checkpoint(run)["step"] == records[-1]["step"]
    assert [r["step"] for r in _records(tmp_path / "evaluations")][-1] == 9


def test_the_schedule_and_the_curve_points_follow_the_budget(tmp_path, capsys):
    # a cosine schedule over an evaluation budget of 20 (steps unlimited): half-way down at step 11
    # (the schedule's progress is read before that step's evaluation is counted); four periodic
    # evaluations at 1/4 .. 4/4 of the budget, each logged with the budget's counters
    run = tmp_path / "cfm"
    assert main(["train", str(ROOT / "recipes/cfm_8gaussians.yaml"), *FAST, "train.log_every=1", "train.steps=1000000",
                 "train.max_evaluations=20", "train.schedule=cosine", "train.lr=0.01", "train.curve_points=4",
                 "train.eval_points=100", "train.eval_samples=50", "eval.method=rk4", "eval.steps=2",
                 "--out", str(run)]) == 0
    records = _records(run)
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lr[1] == pytest.approx(0.01) and lr[11] == pytest.approx(0.005, rel=1e-6) and lr[20] < 1e-4
    evals = [r for r in records if "eval_nll" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    assert [r["evaluations"] for r in evals] == [5, 10, 15, 20] and all(r["train_seconds"] > 0 for r in evals)
    assert all(r["eval_energy_distance"] >= 0 and r["eval_mmd"] > 0 for r in evals)
