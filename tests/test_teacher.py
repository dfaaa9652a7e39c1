"""The reflow teacher (flowkit.teacher): handed to the objective, loaded at the first batch,
a recipe teacher trained in this process (no subprocess) without disturbing the caller."""

import copy
import random
import subprocess

import numpy as np
import pytest
import torch
import yaml

import flowkit
import flowkit.teacher
from flowkit.checkpoint import RunDirectoryError
from flowkit.cli import main as cli_main
from flowkit.couplings import Teacher
from flowkit.dynamics.mlp import MLP
from flowkit.objectives.flow_matching import RectifiedFlow, TeacherSpec
from flowkit.teacher import LazyTeacher, attach_teacher, load_teacher
from flowkit.trainer import LaunchError

QUIET = ["train.log_every=1", "train.checkpoint_every=0", "train.sample_every=0", "train.eval_every=0",
         "train.threads=1"]
TEACHER = {
    "data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [16]},
    "objective": {"name": "cfm", "coupling": {"name": "independent"}},
    "train": {"steps": 40, "batch_size": 32, "lr": 1e-3, "seed": 3, "ema": 0.9},
}


def _student_recipe(teacher: str, steps: int = 3) -> dict:
    return {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
            "objective": {"name": "rectified_flow", "teacher": teacher, "teacher_steps": 4,
                          "method": "rk4", "steps": 2},
            "train": {"steps": steps, "batch_size": 16, "seed": 5}}


@pytest.fixture(scope="module")
def teacher_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "teacher.yaml"
    path.write_text("# flowkit train teacher.yaml --out RUN\n" + yaml.safe_dump(TEACHER))
    return path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    flowkit.train(flowkit.apply_overrides(TEACHER, QUIET), out, progress=False, log=lambda *a, **k: None)
    return out


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the teacher started a process: {args[:1]}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


def _student(teacher: str, **kwargs) -> RectifiedFlow:
    return RectifiedFlow(lambda: MLP(dim=2, hidden=[8]), (2,), teacher=teacher, method="rk4", steps=8, **kwargs)


def test_a_run_teacher_maps_noise_by_its_own_ode(teacher_run):
    student = _student(str(teacher_run))
    attach_teacher(student)
    assert isinstance(student.coupling, Teacher) and not student.coupling._transport._built  # not loaded yet
    noise = torch.randn(32, 2)
    data, z = student.coupling(torch.zeros(32, 2), noise)
    built, _ = flowkit.load_run(teacher_run)
    expected = flowkit.SAMPLERS.get("rk4")(built.objective.flow(), noise, steps=8).x
    assert z is noise and torch.allclose(data, expected, atol=1e-6)
    assert not any("teacher" in k for k in student.state_dict())  # not part of the model
    assert torch.isfinite(student.loss(torch.zeros(32, 2)).loss)


def test_a_handed_flow_is_integrated_with_the_objectives_solver():
    teacher = flowkit.Flow(velocity=lambda t, x, cond=None: -x if cond is None else -x + cond[:, None],
                           prior=flowkit.StandardNormal((2,)))
    student = _student("a closed-form flow")
    attach_teacher(student, teacher)  # dx/dt = -x from t = 1 to 0: x(0) = e x(1)
    noise, labels = torch.randn(16, 2, dtype=torch.float64), torch.ones(16)
    data, _ = student.coupling(torch.zeros(16, 2, dtype=torch.float64), noise, labels)
    assert torch.allclose(data, noise * torch.e, atol=1e-5)  # unconditional teacher: no cond
    attach_teacher(student, teacher, conditional=True)
    data, _ = student.coupling(torch.zeros(16, 2, dtype=torch.float64), noise, labels)
    assert torch.allclose(data, (noise - 1) * torch.e + 1, atol=1e-5)


def test_an_unattached_teacher_says_how_to_attach_one():
    with pytest.raises(RuntimeError, match="attach_teacher"):
        _student("runs/somewhere").loss(torch.zeros(4, 2))


def test_building_a_student_never_touches_its_teacher():
    built = flowkit.build(_student_recipe("no/such/run"))  # build (and check) stay cheap
    coupling = built.objective.coupling
    assert built.objective.needs_teacher and not coupling.attached  # the application attaches it
    attach_teacher(built.objective, train=flowkit.train)
    assert coupling.attached and isinstance(coupling._transport, LazyTeacher)
    assert coupling._transport._built is None
    with pytest.raises(RunDirectoryError, match="teacher run directory no/such/run not found"):
        built.objective.loss(torch.zeros(4, 2))
    student = flowkit.build(_student_recipe("no/such.yaml")).objective
    attach_teacher(student, train=flowkit.train)
    with pytest.raises(RunDirectoryError, match="teacher recipe no/such.yaml not found"):
        student.loss(torch.zeros(4, 2))


def test_a_recipe_teacher_needs_a_training_function(teacher_recipe):
    with pytest.raises(LaunchError, match="pass train=flowkit.train"):
        load_teacher(teacher_recipe)


def test_a_missing_teacher_is_a_clean_command_line_error(tmp_path, capsys):
    recipe = tmp_path / "reflow.yaml"
    recipe.write_text("# flowkit train reflow.yaml\n" + yaml.safe_dump(_student_recipe("no/such/run")))
    code = cli_main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress", *QUIET])
    assert code == 2
    assert "teacher run directory no/such/run not found" in capsys.readouterr().err


def test_copies_of_the_student_share_one_teacher(teacher_run):
    student = _student(str(teacher_run))
    attach_teacher(student)
    student.coupling(torch.zeros(4, 2), torch.randn(4, 2))  # loads it
    twin = copy.deepcopy(student)  # what the trainer's EMA does
    assert twin.coupling._transport is student.coupling._transport


def test_a_recipe_teacher_is_trained_in_this_process_as_its_recipe_says(teacher_recipe, tmp_path, no_subprocess):
    with pytest.warns(UserWarning, match="training the reflow teacher .* in this process"):
        trained = load_teacher(teacher_recipe, train_steps=6, train=flowkit.train)
    flowkit.train(flowkit.apply_overrides(TEACHER, [*QUIET, "train.steps=6"]), tmp_path / "same",
                  progress=False, log=lambda *a, **k: None)
    same, step = flowkit.load_run(tmp_path / "same")
    assert step == 6
    for (name, a), b in zip(trained.objective.state_dict().items(), same.objective.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in trained.objective.parameters())


def test_training_a_teacher_leaves_the_callers_random_state_and_threads(teacher_recipe, teacher_run,
                                                                        no_subprocess):
    # Loading a teacher builds (and so initialises) its network, from a run as from a recipe;
    # training a recipe teacher must draw nothing more from the caller's generators.
    def states():
        return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.get_num_threads())

    def seed():
        torch.manual_seed(123), np.random.seed(4), random.seed(5)

    seed()
    flowkit.load_run(teacher_run)
    expected = states()
    seed()
    with pytest.warns(UserWarning):
        LazyTeacher(TeacherSpec(str(teacher_recipe), train_steps=3), train=flowkit.train).load()
    found = states()
    assert torch.equal(expected[0], found[0]) and (expected[1] == found[1]).all()
    assert expected[2:] == found[2:]


def test_a_student_trains_alike_on_a_recipe_teacher_and_on_its_run(teacher_recipe, tmp_path, no_subprocess):
    # The recipe teacher is trained in the middle of the student's first step, inside its
    # trainer: the student must draw the same numbers as with the same teacher loaded from a run.
    run = tmp_path / "teacher"
    flowkit.train(flowkit.apply_overrides(TEACHER, [*QUIET, "train.steps=4"]), run, progress=False,
                  log=lambda *a, **k: None)
    students = []
    for teacher in (str(run), str(teacher_recipe)):
        out = tmp_path / f"student{len(students)}"
        with pytest.warns(UserWarning) if teacher.endswith(".yaml") else _nothing():
            result = flowkit.train(flowkit.apply_overrides(_student_recipe(teacher), QUIET), out,
                                   progress=False, log=lambda *a, **k: None)
        assert result.step == 3
        students.append(flowkit.load_run(out)[0].objective.state_dict())
    for name, value in students[0].items():
        assert torch.equal(value, students[1][name]), name


def test_a_multi_process_run_is_told_to_train_its_teacher_first(teacher_recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="multi-process run cannot train its teacher.*--out RUN"):
        load_teacher(teacher_recipe, train=flowkit.train)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
