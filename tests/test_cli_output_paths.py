"""Output file arguments of the CLI — ``sample --out`` and ``nll --save-points`` (of a run and of a
model you bring) — go through one check (``flowkit.cli._check_output_file``): every argument that
cannot work is refused in one line naming it, with exit status 2, before any model is loaded,
and a file that could not be written is reported under the argument that named it."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import flowkit
import flowkit.adapters
import flowkit.recipe
from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CFM = str(ROOT / "recipes/cfm_8gaussians.yaml")
TINY = ["train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
        "train.threads=1", "dynamics.hidden=[16]", "--no-progress"]

#: command -> (argv before the output argument, the output argument, a suffix it accepts)
COMMANDS = {
    "sample": (["sample", "RUN", "--n", "5"], "--out", ".npy"),
    "nll": (["nll", "RUN", "--n", "5"], "--save-points", ".npz"),
    "nll --model": (["nll", "--model", "MODEL", "--adapter", "edm", "--data", "DATA", "--n", "2"],
                    "--save-points", ".pt"),
}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Loading a run or a brought model, sampling and evaluating: what the checks must come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output argument was checked")

    for owner, name in ((flowkit, "load_run"), (flowkit, "generate"), (flowkit, "evaluate_model"),
                        (flowkit.adapters, "load_model"), (flowkit.recipe, "build_data")):
        monkeypatch.setattr(owner, name, forbidden)


def _argv(command: str, tmp_path: Path, target: str) -> list[str]:
    before, flag, _ = COMMANDS[command]
    where = {"RUN": tmp_path / "run", "MODEL": tmp_path / "model", "DATA": tmp_path / "data.yaml"}
    return [str(where.get(a, a)) for a in before] + [flag, target]


@pytest.fixture
def places(tmp_path):
    """An (empty) run and model directory, a data recipe, a file, a directory and a named pipe."""
    (tmp_path / "run").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "data.yaml").write_text("data: {name: digits}\n")
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("target, named", [
    ("TMP/out.jpg", "must end in"),
    ("TMP/out", "got no suffix"),
    ("TMP/adir.SUFFIX", "is a directory; give a file name ending in"),
    ("TMP/afile/out.SUFFIX", "afile is a file, not a directory"),
    ("TMP/afile/deeper/out.SUFFIX", "afile is a file, not a directory"),
    ("TMP/pipe.SUFFIX", "exists and is not a regular file"),
    ("/proc/flowkit-output.SUFFIX", "cannot write in /proc"),  # /proc refuses new files even to root
])
def test_an_output_argument_that_cannot_work_is_refused_before_any_work(places, capsys, no_work, command, target,
                                                                       named):
    _, flag, suffix = COMMANDS[command]
    target = target.replace("TMP", str(places)).replace("SUFFIX", suffix.lstrip("."))
    if "adir" in target:
        Path(target).mkdir()
    if "pipe" in target:
        os.mkfifo(target)
    before = sorted(places.rglob("*"))
    assert main(_argv(command, places, target)) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"flowkit {command.split()[0]}: {flag} {target}")
    assert named in line
    assert sorted(places.rglob("*")) == before  # no directory made, no probe left


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_suffix_message_lists_what_each_argument_accepts(places, capsys, no_work, command):
    _, flag, _ = COMMANDS[command]
    assert main(_argv(command, places, str(places / "x.csv"))) == 2
    accepted = {"--out": ".png (also writes .npy) or .npy", "--save-points": ".npz (numpy) or .pt (torch)"}[flag]
    assert f"must end in {accepted}, got .csv" in _one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "run"
    assert main(["train", CFM, *TINY, "train.steps=2", "--out", str(out)]) == 0
    return out


def test_sample_and_save_points_create_a_missing_directory(run, tmp_path, capsys):
    samples, points = tmp_path / "new/deeper/s.npy", tmp_path / "other/p.npz"
    assert main(["sample", str(run), "--n", "5", "--out", str(samples)]) == 0
    assert main(["nll", str(run), "--n", "5", "--batch-size", "5", "--json", "--save-points", str(points)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.load(samples).shape == (5, 2)
    assert -np.load(points)["log_prob"].mean() == pytest.approx(res["nll"], abs=1e-12)


def test_a_full_disk_while_saving_points_names_save_points_and_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    real_savez = np.savez

    def full(fh, **arrays):
        real_savez(fh, **arrays)  # written, then the disk is full before it is closed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    points = tmp_path / "p.npz"
    assert main(["nll", str(run), "--n", "5", "--batch-size", "5", "--json", "--save-points", str(points)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"flowkit nll: --save-points {points}: could not write it") and "No space left" in line
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


@pytest.mark.parametrize("inside", ["model.pt", "sub/points.pt"])
def test_save_points_never_writes_into_the_model_directory_you_bring(places, capsys, no_work, inside):
    (places / "model" / "model.pt").write_bytes(b"weights")
    argv = _argv("nll --model", places, str(places / "model" / inside))
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--save-points" in line and "the model's directory" in line
    assert (places / "model" / "model.pt").read_bytes() == b"weights"
    assert not (places / "model" / "sub").exists()


def test_train_out_with_an_unexpanded_tilde_goes_to_the_home_directory(tmp_path, monkeypatch):
    # `--out=~/x` reaches flowkit unexpanded (the shell expands ~ only at the start of a word)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", CFM, "train.steps=1", *TINY, "--out=~/run"]) == 0
    assert (tmp_path / "home" / "run" / "checkpoints").is_dir()
    assert not (tmp_path / "~").exists()
