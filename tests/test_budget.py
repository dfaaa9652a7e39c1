"""Training budgets: a run stops on wall-clock time or network evaluations as well as on steps."""

import json
from pathlib import Path

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
