"""Checkpoints: crafted ones are refused without running code, damaged ones are survived,
non-finite weights are never saved, a full disk corrupts nothing."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit import checkpoint
from flowkit.checkpoint import (CheckpointError, NonFiniteState, last_good_checkpoint, latest_checkpoint,
                                load_checkpoint, save_checkpoint)
from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CFM = str(ROOT / "recipes/cfm_8gaussians.yaml")
TINY = ["train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.threads=1"]
NLL = ["--n", "100", "eval.method=rk4", "eval.steps=2", "eval.metrics=false", "--json"]


def _train(out, *extra):
    return main(["train", CFM, *TINY, *extra, "--out", str(out), "--no-progress"])


@pytest.fixture
def run(tmp_path):
    """A cfm run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    assert _train(out, "train.steps=4", "train.checkpoint_every=2") == 0
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*.pt"))] == ["step_0000002.pt", "step_0000004.pt"]
    return out


def _last_line(text):
    return text.strip().splitlines()[-1]


class _Payload:
    """Unpickling this object calls ``fn(*args)``: what a crafted checkpoint would run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path):
    return {"os.system": _Payload(os.system, f"touch {marker}"), "open": _Payload(open, str(marker), "w")}


# ------------------------------------------------------------------------ crafted files
@pytest.mark.parametrize("kind", ["os.system", "open"])
def test_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, run, kind, capsys):
    marker = tmp_path / "pwned"
    state = {"step": 6, "model": {}, "recipe": {}, "extra": _payloads(marker)[kind]}
    torch.save(state, run / "checkpoints" / "step_0000006.pt")
    (run / "checkpoints" / "latest").write_text("step_0000006.pt")
    capsys.readouterr()
    # an intact older checkpoint exists: used, with a warning naming the refused one
    code = main(["nll", str(run), *NLL])
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert code == 0
    assert json.loads(_last_line(out))["step"] == 4
    assert "refusing checkpoint" in err and "step_0000006.pt" in err and "using step_0000004.pt" in err
    # only crafted ones: exit 2 with one clear line, still nothing run
    for path in (run / "checkpoints").glob("step_000000[24].pt"):
        path.unlink()
    code = main(["nll", str(run), *NLL])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "never runs code" in err and "no intact checkpoint" in err
    with pytest.raises(CheckpointError, match="tensors and plain data"):
        load_checkpoint(run / "checkpoints" / "step_0000006.pt")
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../../evil.pt", "ABSOLUTE"])
def test_latest_may_only_name_a_file_in_the_runs_checkpoints(tmp_path, run, pointer, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 9, "model": {}, "recipe": {}, "x": _Payload(open, str(marker), "w")}, evil)
    (run / "checkpoints" / "latest").write_text(str(evil) if pointer == "ABSOLUTE" else pointer)
    capsys.readouterr()
    code = main(["nll", str(run), *NLL])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2 and "outside the run's checkpoints directory" in err and len(err.strip().splitlines()) == 1


def test_checkpoints_hold_only_weights_only_loadable_data(run):
    state = torch.load(latest_checkpoint(run), weights_only=True)  # raises on anything else
    assert isinstance(state["recipe"], str) and state["format"] == 2
    assert load_checkpoint(run)["recipe"]["objective"]["name"] == "cfm"


def test_old_format_checkpoint_loads_or_fails_clearly(tmp_path, run, capsys):
    # the previous code saved the recipe as a dict with torch.load(weights_only=False) in mind
    state = torch.load(latest_checkpoint(run), weights_only=True)
    state["recipe"] = flowkit.load_run(run)[0].recipe
    state.pop("format", None)
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    torch.save(state, old / "checkpoints" / "step_0000004.pt")
    built, step = flowkit.load_run(old)
    assert step == 4 and built.recipe["objective"]["name"] == "cfm"
    # one holding objects weights-only loading refuses: a clear error, not an unpickling traceback
    import argparse

    state["args"] = argparse.Namespace(lr=1.0)
    torch.save(state, old / "checkpoints" / "step_0000004.pt")
    assert main(["nll", str(old), *NLL]) == 2
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "older flowkit" in err and "Traceback" not in err


# ----------------------------------------------------------------------- damaged files
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "garbage": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_nll_falls_back_to_the_newest_intact_checkpoint(run, how, capsys):
    _damage(run / "checkpoints" / "step_0000004.pt", how)
    capsys.readouterr()
    assert main(["nll", str(run), *NLL]) == 0
    out, err = capsys.readouterr()
    assert json.loads(_last_line(out))["step"] == 2
    assert "warning" in err and "step_0000004.pt" in err and "using step_0000002.pt (step 2)" in err


def test_sample_and_resume_fall_back_and_none_intact_is_exit_2(run, tmp_path, capsys):
    _damage(run / "checkpoints" / "step_0000004.pt", "truncated")
    capsys.readouterr()
    assert main(["sample", str(run), "sampler=rk4", "sampler.steps=2", "--n", "20",
                 "--out", str(tmp_path / "s.npy")]) == 0
    assert "using step_0000002.pt" in capsys.readouterr().err
    assert _train(run, "train.steps=5", "train.checkpoint_every=2", "--resume") == 0
    out, err = capsys.readouterr()
    assert "using step_0000002.pt" in err and "from step 2" in out
    assert load_checkpoint(run)["step"] == 5
    assert (run / "checkpoints" / "step_0000004.pt.damaged").exists()  # set aside, not mistaken again
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    for path in (run / "checkpoints").glob("step_*.pt"):
        _damage(path, "garbage")
    assert main(["nll", str(run), *NLL]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------- finiteness
def test_non_finite_weights_are_never_saved(tmp_path):
    state = {"step": 1, "model": {"w": torch.tensor([1.0, float("inf")])}, "recipe": {}}
    with pytest.raises(NonFiniteState, match="model.w"):
        save_checkpoint(tmp_path, 1, state)
    assert not (tmp_path / "checkpoints").exists()


def test_last_good_checkpoint_is_verified_finite(tmp_path, run):
    # a checkpoint with inf weights (as the previous code could write) is not "last good"
    state = torch.load(latest_checkpoint(run), weights_only=True)
    state["model"] = {k: v * float("inf") for k, v in state["model"].items()}
    torch.save(state, run / "checkpoints" / "step_0000006.pt")
    (run / "checkpoints" / "latest").write_text("step_0000006.pt")
    assert last_good_checkpoint(run).name == "step_0000004.pt"


# --------------------------------------------------------------------------- full disk
def _enospc_for(marker: str):
    real = os.fsync

    def fsync(fd):
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


def test_full_disk_during_checkpoint_write_is_a_clear_error(run, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint.os, "fsync", _enospc_for(".step_0000006.pt"))
    capsys.readouterr()
    assert _train(run, "train.steps=6", "train.checkpoint_every=2", "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and "step_0000004.pt is intact" in err
    assert latest_checkpoint(run).name == "step_0000004.pt" and load_checkpoint(run)["step"] == 4
    assert not list((run / "checkpoints").glob(".*.tmp")) and not (run / "checkpoints" / "step_0000006.pt").exists()


def test_full_disk_during_metrics_write_is_a_clear_error(run, monkeypatch, capsys):
    import sys

    train_module = sys.modules["flowkit.trainer"]

    def refuse(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "open", refuse, raising=False)
    capsys.readouterr()
    assert _train(run, "train.steps=6", "--resume") == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "No space left on device" in err and "Traceback" not in err
    assert load_checkpoint(run)["step"] == 4
