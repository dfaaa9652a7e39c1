"""The README's two-process command really starts two processes that form one job (gloo on CPU).

accelerate 1.x starts several processes only with ``--multi_gpu`` (its ``--cpu`` flag starts
one); on a machine without a GPU flowkit joins them as one CPU job. Every test here asserts
the world size, so a launch that quietly ran one process fails.
"""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["recipes/ffjord_8gaussians.yaml", "train.log_every=1", "train.batch_size=64",
        "objective.method=rk4", "objective.steps=4", "train.checkpoint_every=3", "train.schedule=constant",
        "train.warmup=0", "--no-progress"]

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, *extra: str, processes: int = 2) -> list[str]:
    # the README's command (Scaling out), with the run's settings and a port of its own
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "flowkit.cli", "train", *ARGS, *extra, "--out", str(out)]


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _launch(out: Path, *extra: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *extra, processes=processes), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_same_global_batch(tmp_path):
    proc = _launch(tmp_path / "ddp", "train.steps=6")
    # two processes ran and formed one job: the start line says so, once, from the main process
    assert (proc.stdout + proc.stderr).count("flowkit train: 2 processes (cpu, gloo)") == 1
    flowkit.train(flowkit.load_recipe(ROOT / ARGS[0], [a for a in ARGS[1:] if "=" in a] + ["train.steps=6"]),
                  tmp_path / "single", progress=False)
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp) == len(single) == 6
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-4
    # checkpoints written once (one file per checkpoint step, no per-rank copies)
    names = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert names == ["latest", "step_0000003.pt", "step_0000006.pt"]

    # resume under two processes continues from the last checkpoint, with a new learning rate
    proc = _launch(tmp_path / "ddp", "train.steps=8", "train.lr=5e-4", "--resume")
    out = proc.stdout + proc.stderr
    assert "2 processes (cpu, gloo)" in out and "from step 6" in out
    assert load_checkpoint(tmp_path / "ddp")["step"] == 8
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == pytest.approx([5e-3] * 6 + [5e-4] * 2)


def test_a_second_job_on_the_same_run_directory_is_refused(tmp_path):
    """Two jobs that are not one must never write one run directory: the second exits 2 at once."""
    first = subprocess.Popen(_command(tmp_path / "run", "train.steps=100000", "train.checkpoint_every=0"),
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        for line in first.stdout:  # wait until the first job holds the directory
            if "2 processes (cpu, gloo)" in line:
                break
        second = _launch(tmp_path / "run", "train.steps=2", "--resume", check=False)  # even to continue it
        assert second.returncode != 0
        # both processes of the second job refuse, naming the holder; nothing of theirs is written
        assert second.stderr.count("in use by another flowkit process") == 2, second.stderr[-3000:]
        # no traceback from flowkit (accelerate's launcher prints its own when a child exits non-zero)
        assert not [line for line in second.stderr.splitlines() if line.strip().startswith("File") and
                    f"{os.sep}flowkit{os.sep}" in line]
    finally:
        os.killpg(first.pid, 15)
        first.wait(timeout=120)


def test_two_processes_resume_with_their_own_warm_started_step_plans(tmp_path):
    """Adaptive dopri5 (the recipe's solver): each process warm-starts its solves from its own previous
    step (FFJORD's step plans, which differ between processes: each solves its own half of the batch).
    A checkpoint holds every process's plan, so a two-process resume ends with exactly the weights of
    the uninterrupted two-process run."""
    adaptive = [a for a in ARGS if not a.startswith(("objective.method", "objective.steps", "train.checkpoint"))]
    adaptive += ["objective.rtol=1e-8", "objective.atol=1e-8"]  # several steps per solve from the first training step

    def launch(out: Path, *extra: str) -> str:
        cmd = _command(out, *extra)
        cmd[cmd.index("train") + 2: cmd.index("--out")] = [*adaptive[1:], *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "2 processes (cpu, gloo)" in launch(tmp_path / "straight", "train.steps=4", "train.checkpoint_every=0")
    launch(tmp_path / "parted", "train.steps=2", "train.checkpoint_every=0")
    state = load_checkpoint(tmp_path / "parted")
    plans = state["solver_by_process"]
    assert len(plans) == 2 and plans[0].keys() == plans[1].keys() == {"step_plan.0"}
    assert not torch.equal(plans[0]["step_plan.0"], plans[1]["step_plan.0"])  # the processes' steps differ
    assert "from step 2" in launch(tmp_path / "parted", "train.steps=4", "train.checkpoint_every=0", "--resume")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "parted")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
