"""Red team wave 3, the attacks that failed before their fixes (2026-12-02): a damaged step plan
in a checkpoint (a traceback, an endless solve, a field evaluated outside its interval, a resume
refused as "diverged"), an output path inside the run's checkpoints, the ``.npy`` written beside a
``.png``, ``~`` in ``--out=~/...``, and the class names of a sharded HF parquet set."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch


import flowkit  # noqa: E402
from flowkit.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from flowkit.cli import main  # noqa: E402
from flowkit.dopri5 import StepPlan, dopri5  # noqa: E402
from test_redteam_wave3 import FFJ, ROOT, SMALL, TINY, _hf_image_parquet, _train  # noqa: E402

F64 = torch.float64


def _plan(*steps: tuple[float, float, float]) -> torch.Tensor:
    return StepPlan((0.0, 1.0), tuple(steps)).to_tensor()


def _resume_with_solver(tmp_path: Path, solver, steps: int = 3) -> tuple[int, str]:
    run = tmp_path / "r"
    _train(run, 2)
    state = read_checkpoint(latest_checkpoint(run))
    state["solver"] = solver
    save_checkpoint(run, state["step"], state)
    code = main(["train", str(FFJ), *SMALL, f"train.steps={steps}", "--out", str(run), "--resume", "--no-progress"])
    return code, run


# ------------------------------------------------------------------ F1/F2: traceback on resume
@pytest.mark.parametrize("solver", [torch.zeros(3, 3), None, {"step_plan.0": torch.zeros(0, 3)}],
                         ids=["a-tensor", "None", "empty-plan"])
def test_a_corrupted_solver_state_does_not_crash_the_resume_with_a_traceback(tmp_path, solver):
    """Now: AttributeError ('Tensor'/'NoneType' has no attribute 'items') or IndexError (an empty
    plan tensor) escapes Trainer.load_state_dict and main() -> traceback, exit 1. Expected: the
    plan only proposes step sizes, so an unusable one is dropped (cold start, exit 0) -- or at
    worst a one-line exit 2."""
    code, run = _resume_with_solver(tmp_path, solver)
    assert code == 0 and load_checkpoint(run)["step"] == 3


# --------------------------------------------- F3: a zero proposal: "training diverged", forever
def test_a_plan_with_a_zero_step_is_not_reported_as_divergence(tmp_path, capsys):
    """Now: exit 3 'training diverged at step 3: the ODE solver failed (underflow in dt 0.0)',
    and the 'last good checkpoint' it points at holds the same plan, so --resume fails again
    forever. Expected: a plan proposing a step that cannot advance is not used."""
    code, run = _resume_with_solver(tmp_path, {"step_plan.0": _plan((0.0, 0.5, 0.0), (0.5, 1.0, math.inf))})
    assert code == 0, capsys.readouterr().err


# ------------------------------------------------------------------- F4: a tiny proposal hangs
def test_a_plan_with_a_vanishing_step_does_not_hang_the_solver():
    """Now: first step 1e-300 from t = 0, then every step capped at 1e-300 (t + 1e-300 != t near
    0, so the underflow check never fires): 5e299 steps, a hang (stopped here after 5 s).
    Expected: such a plan is not used (the cold solve, 14 evaluations)."""
    f = lambda t, x: -x  # noqa: E731

    def stop(*_):
        raise TimeoutError("dopri5 with the plan ran for 5 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    try:
        plan = StepPlan.from_tensor(_plan((0.0, 0.5, 1e-300), (0.5, 1.0, math.inf)))
        sol = dopri5(f, torch.ones(2, 1, dtype=F64), [0.0, 1.0], plan=plan)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert abs(sol.ys[-1, 0, 0].item() - math.exp(-1)) < 1e-4


# ------------------------------------------- F5: a negative proposal steps outside [t0, t1]
def test_a_plan_never_makes_the_solver_evaluate_the_field_outside_the_interval():
    """The module docstring: 'a field defined only on [t0, t1] is never evaluated past it'. Now:
    a plan proposing -0.3 over [0, 0.5) steps from 0 to -0.3 (accepted), back into [0, 0.5),
    where the cap sends it back again: evaluations before t0, and a solve that never ends."""
    seen = []

    def f(t, x):
        seen.append(float(t))
        if len(seen) > 10_000:  # now: it also never ends (steps back at every visit of [0, 0.5))
            raise RuntimeError(f"10,000 evaluations, times from {min(seen)} to {max(seen)}")
        return -x

    plan = StepPlan.from_tensor(_plan((0.0, 0.5, -0.3), (0.5, 1.0, math.inf)))
    dopri5(f, torch.ones(2, 1, dtype=F64), [0.0, 1.0], plan=plan)
    assert min(seen) >= 0.0 and max(seen) <= 1.0, (min(seen), max(seen))


# ------------------------------------------- F6: nll --save-points over the run's own checkpoint
@pytest.fixture(scope="module")
def cfm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w3f") / "run"
    assert main(["train", str(ROOT / "recipes/cfm_8gaussians.yaml"), *TINY, "train.steps=2", "--out", str(out)]) == 0
    return out


def test_save_points_never_overwrites_the_runs_checkpoint(cfm_run, tmp_path, capsys):
    """Run directories are never overwritten (README: --resume / a new --out / --overwrite). Now
    `flowkit nll RUN --save-points RUN/checkpoints/step_0000002.pt` (a .pt: accepted) replaces
    the run's only checkpoint with the points: the run is gone ('no intact checkpoint')."""
    import shutil

    run = tmp_path / "run"  # a copy: the module's run stays intact for the other tests
    shutil.copytree(cfm_run, run)
    ckpt = latest_checkpoint(run)
    before = ckpt.read_bytes()
    code = main(["nll", str(run), "--n", "4", "--batch-size", "4", "--save-points", str(ckpt)])
    err = capsys.readouterr().err
    assert ckpt.read_bytes() == before, "the checkpoint was overwritten by the points"
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--save-points" in err


# ---------------------------- F7: sample --out x.png checks x.png up front, not x.npy it also writes
def test_the_npy_that_sample_png_also_writes_is_checked_before_any_work(cfm_run, tmp_path, monkeypatch, capsys):
    """`sample --out s.png` also writes s.npy. Now only s.png is checked up front: with s.npy a
    directory the model is loaded and sampled, s.png written, then the .npy write fails (exit 2
    after the work, a half output left). Expected: refused before loading, nothing written."""
    (tmp_path / "s.npy").mkdir()

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output files were checked")

    monkeypatch.setattr(flowkit, "load_run", forbidden)
    assert main(["sample", str(cfm_run), "--n", "3", "--out", str(tmp_path / "s.png")]) == 2
    assert "s.npy" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


# ------------------------------------------------------ F8: --out=~/x.npy makes a directory "~"
def test_a_tilde_path_is_the_home_directory_not_a_directory_named_tilde(cfm_run, tmp_path, monkeypatch):
    """`--out=~/s.npy` is not expanded by the shell (bash expands ~ only at a word's start or in an
    assignment); flowkit then makes ./~/s.npy. Expected: ~ is the home directory (expanduser)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["sample", str(cfm_run), "--n", "3", "--out=~/s.npy"]) == 0
    assert (home / "s.npy").is_file() and not (cwd / "~").exists()


# ------------------------------------ F9: sharded HF parquet loses the ClassLabel names (pre-existing)
def test_sharded_hf_parquet_keeps_its_class_names(tmp_path):
    """A hub snapshot with two train shards: data/train-0000{0,1}-of-00002.parquet whose schema
    names 3 classes, of which the training rows use 2. One shard: num_classes 3 (from the names);
    two shards: `_concat` drops `class_names`, num_classes = max label + 1 = 2, and a model
    built for 2 classes cannot take label 2 that the dataset card declares."""
    names = ["cat", "dog", "bird"]
    for i, labels in enumerate(([0, 1, 0], [1, 0, 1])):
        _hf_image_parquet(tmp_path / f"data/train-0000{i}-of-00002.parquet", labels, names)
    _hf_image_parquet(tmp_path / "data/test-00000-of-00001.parquet", [0, 1], names)
    from flowkit.data_real import HFDataset

    assert HFDataset(str(tmp_path), label_column="label").num_classes == 3
