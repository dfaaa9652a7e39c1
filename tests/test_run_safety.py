"""Run directories are never lost or mixed; resume does what it says; divergence, signals and
bad arguments end with a clear message and the right exit status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.checkpoint import checkpoint_files, latest_checkpoint, load_checkpoint, save_checkpoint
from flowkit.cli import main
from flowkit.rundir import RunLock

ROOT = Path(__file__).resolve().parents[1]
CFM = str(ROOT / "recipes/cfm_8gaussians.yaml")
FFJORD = str(ROOT / "recipes/ffjord_8gaussians.yaml")
TINY = ["train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.threads=1"]


def _train(out, *extra, recipe=CFM):
    return main(["train", recipe, *TINY, *extra, "--out", str(out), "--no-progress"])


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _spawn(out, *extra):
    """``flowkit train`` of a long cfm run in its own process (stopped by the test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "flowkit", "train", CFM, *TINY, "train.steps=1000000",
                             *extra, "--out", str(out), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, ready, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training did not get going in time")
        time.sleep(0.05)


# -------------------------------------------------------------------- run directories
def test_training_into_a_directory_holding_a_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.steps=3") == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert _train(run, "train.steps=2") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(run) in line and "--resume" in line and "new --out directory" in line
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert _steps(run) == [1, 2, 3] and flowkit.load_run(run)[1] == 3


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "train.steps=4", "train.checkpoint_every=2") == 0
    (run / "notes.txt").write_text("mine")
    assert _train(run, "train.steps=3", "train.lr=2e-3", "--overwrite") == 0
    assert [s for s, _ in checkpoint_files(run)] == [3] and _steps(run) == [1, 2, 3]
    assert flowkit.load_run(run)[1] == 3 and load_checkpoint(run)["recipe"]["train"]["lr"] == 2e-3
    assert (run / "notes.txt").read_text() == "mine"


def test_retention_keeps_by_step_number_never_the_file_just_written(tmp_path):
    def state(step):
        return {"step": step, "model": {"w": torch.ones(1)}, "recipe": {}}

    # 10,000,000 sorts before 9,999,999 as a name
    save_checkpoint(tmp_path, 9_999_999, state(9_999_999), keep=1)
    save_checkpoint(tmp_path, 10_000_000, state(10_000_000), keep=1)
    assert [s for s, _ in checkpoint_files(tmp_path)] == [10_000_000]
    # a lower step written among higher ones (what reusing a directory did): never deleted
    for step in (400, 600):
        save_checkpoint(tmp_path / "b", step, state(step), keep=2)
    written = save_checkpoint(tmp_path / "b", 200, state(200), keep=2)
    assert written.exists() and latest_checkpoint(tmp_path / "b") == written
    assert [s for s, _ in checkpoint_files(tmp_path / "b")] == [200, 600]


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):
        assert _train(run, "train.steps=2") == 2
        line = _one_line(capsys.readouterr().err)
        assert f"pid {os.getpid()}" in line and "in use" in line
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert _train(run, "train.steps=2") == 0  # released: usable again


def test_second_process_is_refused_and_sigterm_keeps_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _spawn(run, "train.checkpoint_every=200")
    try:
        _wait_for(proc, lambda: latest_checkpoint(run) is not None)
        capsys.readouterr()
        assert _train(run, "train.steps=100000", "--resume") == 2  # another process, same directory
        line = _one_line(capsys.readouterr().err)
        assert f"pid {proc.pid}" in line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert out.startswith("flowkit train: 1 process (cpu)")
    assert _one_line(err) == "flowkit train: terminated; the last checkpoint is intact (use --resume)"
    assert load_checkpoint(run)["step"] % 200 == 0
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_kill_9_leaves_no_lock_and_resume_drops_the_lost_steps(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _spawn(run, "train.checkpoint_every=300")

    def past_checkpoint():
        ckpt = latest_checkpoint(run)
        return ckpt is not None and (run / "metrics.jsonl").exists() and _steps(run)[-1] >= 340
    try:
        _wait_for(proc, past_checkpoint)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    step = load_checkpoint(run)["step"]
    logged = _steps(run)[-1]
    assert logged > step  # the killed attempt logged steps its checkpoint does not hold
    (run / "checkpoints" / ".step_0999999.pt.abc.tmp").write_bytes(b"half")  # an interrupted write
    capsys.readouterr()
    assert _train(run, f"train.steps={step + 3}", "train.checkpoint_every=300", "--resume") == 0
    assert f"from step {step}" in capsys.readouterr().out
    steps = _steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == step + 3
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.steps=4") == 0
    with open(run / "metrics.jsonl", "a") as fh:  # what a run killed at step 6 leaves
        fh.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n{"step": 7, "lo')
    assert _train(run, "train.steps=6", "--resume") == 0
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert "dropped 3 metrics records logged after step 4" in capsys.readouterr().out


# ---------------------------------------------------------------------------- resume
def test_resume_overrides_take_effect(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "train.steps=3", "train.ema=0.9") == 0
    assert _train(run, "train.steps=5", "train.lr=1e-5", "train.grad_clip=1.0", "train.ema=0.5",
                  "train.checkpoint_every=1", "--resume") == 0
    four, five = (load_checkpoint(run / "checkpoints" / f"step_000000{n}.pt") for n in (4, 5))
    for key, ema in five["ema"].items():  # EMA at the new decay: ema5 = 0.5 ema4 + 0.5 model5
        assert torch.allclose(ema, 0.5 * four["ema"][key] + 0.5 * five["model"][key], atol=1e-6), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [1e-3] * 3 + [1e-5] * 2
    assert "grad_norm" not in records[2] and "grad_norm" in records[3]
    state = load_checkpoint(run)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-5  # the optimiser's own rate
    assert state["recipe"]["train"]["lr"] == 1e-5
    assert flowkit.load_run(run)[0].recipe["train"]["grad_clip"] == 1.0
    assert "lr: 1.0e-05" in (run / "recipe.yaml").read_text()
    # a schedule takes its new base rate too
    assert _train(run, "train.steps=7", "train.lr=4e-3", "train.schedule=linear", "train.ema=0.5", "--resume") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(4e-3 * (1 - 7 / 7)) and records[-2]["lr"] == pytest.approx(4e-3 / 7)


def test_resume_refuses_changes_that_cannot_take_effect(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.steps=2") == 0
    before = latest_checkpoint(run).read_bytes()
    capsys.readouterr()
    assert _train(run, "train.steps=4", "dynamics.hidden=[8]", "train.seed=3", "--resume") == 2
    line = _one_line(capsys.readouterr().err)
    assert "dynamics.hidden ([64, 64, 64] → [8])" in line and "train.seed (0 → 3)" in line
    assert "train.steps" not in line and "new --out directory" in line
    # another recipe file: another architecture and objective, refused with the keys
    assert _train(run, "train.steps=4", "--resume", recipe=FFJORD) == 2
    line = _one_line(capsys.readouterr().err)
    assert "dynamics.name" in line and "objective.name" in line
    assert latest_checkpoint(run).read_bytes() == before and _steps(run) == [1, 2]


def test_resume_with_another_recipe_file_differing_only_in_settings(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "train.steps=2") == 0
    other = tmp_path / "slower.yaml"
    other.write_text(Path(CFM).read_text().replace("lr: 1.0e-3", "lr: 2.0e-4"))
    assert _train(run, "train.steps=3", "--resume", recipe=str(other)) == 0
    assert flowkit.load_run(run)[0].recipe["train"]["lr"] == 2e-4  # what actually ran
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 2e-4


# ------------------------------------------------------------------------ divergence
def test_solver_failure_on_the_reference_recipe_is_divergence(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", FFJORD, "train.lr=1e4", "train.threads=1", "--out", str(run), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 3
    assert "training diverged" in line and "ODE solver failed (underflow in dt" in line and "train.lr" in line


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_non_finite_gradient_with_finite_loss_stops_before_the_update(tmp_path, monkeypatch, capsys, clip):
    run = tmp_path / "run"
    assert _train(run, "train.steps=2") == 0
    from flowkit.objectives.flow_matching import CFM as Objective

    original = Objective.loss

    def poisoned(self, x, cond=None):
        out = original(self, x, cond)
        out.loss = _NanGrad.apply(out.loss)  # the loss stays finite, every gradient is NaN
        return out

    monkeypatch.setattr(Objective, "loss", poisoned)
    capsys.readouterr()
    assert _train(run, "train.steps=3", f"train.grad_clip={clip}", "--resume") == 3
    line = _one_line(capsys.readouterr().err)
    assert "training diverged at step 3: a gradient became non-finite" in line
    assert f"last good checkpoint is {run / 'checkpoints' / 'step_0000002.pt'} (verified finite)" in line
    assert load_checkpoint(run)["step"] == 2  # nothing non-finite was saved


def test_non_finite_parameters_after_the_step_are_divergence(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.steps=2") == 0
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    capsys.readouterr()
    assert _train(run, "train.steps=3", "--resume") == 3
    line = _one_line(capsys.readouterr().err)
    assert "a parameter became non-finite" in line
    assert load_checkpoint(run)["step"] == 2 and not (run / "checkpoints" / "step_0000003.pt").exists()


# --------------------------------------------------------------- processes and signals
def test_train_states_its_processes_and_ctrl_c_is_130(tmp_path, monkeypatch, capsys):
    assert _train(tmp_path / "a", "train.steps=1") == 0
    assert capsys.readouterr().out.splitlines()[0] == "flowkit train: 1 process (cpu)"

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["flowkit.trainer"].Trainer, "fit", interrupted)
    assert _train(tmp_path / "b", "train.steps=1") == 130
    assert _one_line(capsys.readouterr().err) == \
        "flowkit train: interrupted; the last checkpoint is intact (use --resume)"


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, {"LOCAL_RANK": "1"},
                                 {"OMPI_COMM_WORLD_SIZE": "4"}])
def test_launcher_processes_left_single_by_accelerate_are_refused(monkeypatch, env):
    from types import SimpleNamespace

    from flowkit.trainer import LaunchError, check_launch

    for key in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    check_launch(alone)  # not launched: fine
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match="needs train.cpu=true"):
        check_launch(alone)
    check_launch(SimpleNamespace(num_processes=2, distributed_type="DistributedType.MULTI_CPU"))


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def no_work(monkeypatch):
    """Loading or sampling a model is the work the argument checks must come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(flowkit, "load_run", forbidden)
    monkeypatch.setattr(flowkit, "generate", forbidden)
    monkeypatch.setattr(flowkit, "evaluate_nll", forbidden)


@pytest.mark.parametrize("argv, named", [
    (["sample", "RUN", "--n", "0", "--out", "OUT/s.png"], "--n"),
    (["sample", "RUN", "--n", "-3", "--out", "OUT/s.png"], "--n"),
    (["nll", "RUN", "--n", "0"], "--n"),
    (["nll", "RUN", "--batch-size", "-1"], "--batch-size"),
    (["sample", "RUN", "--out", "OUT/s.jpg"], "--out"),
    (["sample", "RUN", "--out", "OUT/s"], "--out"),
    (["sample", "RUN", "--out", "FILE/s.png"], "--out"),
    (["sample", "MISSING", "--out", "OUT/s.png"], "does not exist"),
    (["nll", "MISSING"], "does not exist"),
    (["sample", "FILE", "--out", "OUT/s.png"], "is a file"),
    (["nll", "FILE"], "is a file"),
])
def test_cli_arguments_are_checked_before_any_work(tmp_path, capsys, no_work, argv, named):
    (tmp_path / "run").mkdir()
    (tmp_path / "file.txt").write_text("x")
    where = {"RUN": tmp_path / "run", "OUT": tmp_path / "out", "FILE": tmp_path / "file.txt",
             "MISSING": tmp_path / "missing"}
    for key, path in where.items():
        argv = [a.replace(key, str(path)) if a.startswith(key) else a for a in argv]
    assert main(argv) == 2
    assert named in _one_line(capsys.readouterr().err)


def test_train_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tmp_path / "file", "train.steps=1") == 2
    assert "is a file, not a run directory" in _one_line(capsys.readouterr().err)


def test_evaluating_with_an_override_that_changes_the_model_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.steps=1") == 0
    capsys.readouterr()
    assert main(["nll", str(run), "dynamics.hidden=[8]", "--n", "10"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "does not fit the model" in line and "overrides" in line
