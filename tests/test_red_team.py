"""Cases a red-team pass over the trust contract found: each fails on the code before its fix."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from flowkit.checkpoint import load_checkpoint
from flowkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CFM = str(ROOT / "recipes/cfm_8gaussians.yaml")
FFJORD = str(ROOT / "recipes/ffjord_8gaussians.yaml")
TINY = ["train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.threads=1", "--no-progress"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "run"
    assert main(["train", CFM, *TINY, "train.steps=4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv, named", [
    (["--cond", "abc"], "--cond abc"),
    (["--cond", "3"], "takes no condition"),
    (["--cond", "1,nan"], "finite"),
    (["--guidance", "nan"], "--guidance"),
    (["--device", "cuda:7"], "--device"),
    (["--device", "bogus"], "--device bogus"),
])
def test_sample_arguments_are_user_errors(run, tmp_path, capsys, argv, named):
    assert main(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy"), *argv]) == 2
    assert named in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "s.npy").exists()


def test_out_in_a_directory_that_cannot_be_written_is_refused_before_sampling(run, tmp_path, capsys, monkeypatch):
    import flowkit

    monkeypatch.setattr(flowkit, "generate", lambda *a, **k: pytest.fail("sampled before --out was checked"))
    # /proc refuses new files even to root (os.access says it may)
    assert main(["sample", str(run), "--n", "5", "--out", "/proc/flowkit-samples.png"]) == 2
    assert "--out /proc/flowkit-samples.png: cannot write" in _one_line(capsys.readouterr().err)


def test_full_disk_while_writing_samples_leaves_nothing_truncated(run, tmp_path, capsys, monkeypatch):
    real_save = np.save

    def full(fh, array):
        real_save(fh, array[: len(array) // 2])  # part of it is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "--n", "50", "--out", str(out)]) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_resume_to_fewer_steps_than_reached_is_refused(run, capsys):
    before = (run / "recipe.yaml").read_text()
    assert main(["train", CFM, *TINY, "train.steps=2", "--out", str(run), "--resume"]) == 2
    assert "train.steps (2 is below step 4" in capsys.readouterr().err
    assert (run / "recipe.yaml").read_text() == before  # the run still describes its model


def test_the_divergence_advice_can_be_followed(tmp_path, capsys):
    out = tmp_path / "dv"
    fast = ["objective.method=rk4", "objective.steps=2", "train.warmup=0", "train.schedule=constant"]
    assert main(["train", FFJORD, *TINY, *fast, "train.steps=2", "train.checkpoint_every=1", "--out", str(out)]) == 0
    code = main(["train", FFJORD, *TINY, *fast, "train.steps=30", "train.lr=1e4", "train.checkpoint_every=0",
                 "--out", str(out), "--resume"])
    assert code == 3
    err = capsys.readouterr().err
    assert "step_0000002.pt (verified finite)" in err
    assert "tighter solver (objective.rtol / objective.atol / objective.steps)" in err
    # the advice: a lower rate and a tighter solver, on resume; both take effect
    assert main(["train", FFJORD, *TINY, *fast, "objective.steps=4", "train.steps=4", "train.lr=1e-4",
                 "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out)["step"] == 4
    import yaml

    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["objective"]["steps"] == 4 and saved["train"]["lr"] == 1e-4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the diverged attempt's records were dropped
    assert records[-1]["nfe"] == 16  # rk4, 4 steps: the tighter solver is the one running


def test_compare_refuses_two_runs_of_one_name_before_training(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.yaml").write_text((ROOT / "recipes/cfm_8gaussians.yaml").read_text())
    code = main(["compare", str(tmp_path / "a/x.yaml"), str(tmp_path / "b/x.yaml"), "--out", str(tmp_path / "cmp")])
    assert code == 2
    assert "two runs would be named x" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_resume_of_a_recipe_that_relies_on_a_tuple_default(tmp_path, capsys):
    # the run saves its recipe with defaults written out (mlp's hidden=(64, 64, 64) as a YAML
    # list); resuming with the same file, which leaves hidden out, is no change of architecture
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# flowkit train r.yaml\ndata: {name: 8gaussians}\ndynamics: {name: mlp}\n"
                      "objective: {name: cfm}\nsampler: {name: euler, steps: 2}\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), *TINY, "train.steps=2", "--out", str(out)]) == 0
    assert main(["train", str(recipe), *TINY, "train.steps=3", "--out", str(out), "--resume"]) == 0
    assert "changed: train.steps (2 → 3)" in capsys.readouterr().out
    assert load_checkpoint(out)["step"] == 3
