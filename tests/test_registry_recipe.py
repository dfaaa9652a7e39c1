"""Registry and recipe validation: messages, every error at once, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import flowkit
from flowkit.cli import main
from flowkit.recipe import RecipeError, apply_overrides, load_recipe, validate
from flowkit.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]


def test_registry_duplicate_and_unknown():
    reg = Registry("widget_test")

    @reg.register("alpha")
    class Alpha:
        """An alpha widget."""

    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha")(Alpha)
    with pytest.raises(RegistryError) as err:
        reg.get("alpah")
    assert "did you mean alpha?" in str(err.value) and "choose one of: alpha" in str(err.value)
    assert reg.describe("alpha") == "An alpha widget."
    assert isinstance(reg.build("alpha"), Alpha)


def test_third_party_component_usable_in_recipe():
    @flowkit.DYNAMICS.register("test_linear_field")
    class LinearField(torch.nn.Module):
        """x ↦ A x."""

        def __init__(self, dim: int, scale: float = 1.0):
            super().__init__()
            self.lin = torch.nn.Linear(dim, dim)

        def forward(self, t, x, cond=None):
            return self.lin(x)

    recipe = load_recipe(ROOT / "recipes/ffjord_8gaussians.yaml", ["dynamics=test_linear_field"])
    built = flowkit.build(recipe)
    assert isinstance(built.objective.blocks[0].field, LinearField)


def _errors(recipe):
    with pytest.raises(RecipeError) as err:
        validate(recipe, "bad.yaml")
    return err.value.errors, str(err.value)


BASE = {
    "data": {"name": "8gaussians"},
    "dynamics": {"name": "concatsquash"},
    "objective": {"name": "ffjord"},
}


def test_unknown_argument_has_path_and_suggestion():
    errors, text = _errors({**BASE, "objective": {"name": "ffjord", "divergnce": "exact"}})
    assert errors == [errors[0]] and errors[0].startswith(
        "objective.divergnce: unknown argument of ffjord (did you mean divergence?)")
    assert "bad.yaml: objective.divergnce" in text


def test_all_errors_gathered():
    recipe = {
        "data": {"name": "8gausians"},
        "dynamics": {"name": "concatsquash", "activation": "tahn", "dim": 3},
        "objective": {"name": "ffjord", "divergence": "hutchinsn", "rtol": "tight"},
        "sampler": {"name": "dopri"},
        "train": {"stpes": 10, "lr": "fast"},
        "extra": {},
    }
    errors, _ = _errors(recipe)
    text = "\n".join(errors)
    assert "data.name: unknown dataset '8gausians' (did you mean 8gaussians?)" in text
    assert "dynamics.activation: 'tahn' is not one of" in text and "did you mean tanh?" in text
    assert "dynamics.dim: set by flowkit" in text
    assert "objective.divergence: 'hutchinsn' is not one of: exact, hutchinson" in text
    assert "objective.rtol: expected a number" in text
    assert "sampler.name: unknown sampler 'dopri'" in text and "dopri5" in text
    assert "train.stpes: unknown setting (did you mean steps?)" in text
    assert "train.lr: expected a number" in text
    assert "extra: unknown section" in text
    assert len(errors) == 9


def test_missing_sections_and_names():
    errors, _ = _errors({"data": {"steps": 1}})
    text = "\n".join(errors)
    assert "data.name: missing" in text
    assert "dynamics: missing section" in text and "objective: missing section" in text


def test_overrides_parse_yaml_values():
    r = apply_overrides(BASE, ["train.steps=200", "objective.divergence=hutchinson",
                               "dynamics.hidden=[32,32]", "objective.rtol=1e-6", "sampler=rk4"])
    assert r["train"]["steps"] == 200 and r["objective"]["divergence"] == "hutchinson"
    assert r["dynamics"]["hidden"] == [32, 32] and r["objective"]["rtol"] == 1e-6
    assert r["sampler"] == {"name": "rk4"}
    assert "train" not in BASE  # no mutation


def test_cli_check_exit_codes(tmp_path, capsys):
    good = ROOT / "recipes/ffjord_8gaussians.yaml"
    assert main(["check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "objective": {"name": "ffjord", "divergnce": "exact"}}))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: objective.divergnce: unknown argument of ffjord (did you mean divergence?)" in err
    assert main(["check", str(good), "objective.method=dopri"]) == 2
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2


def test_cli_user_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "data": {"name": "nope"}}))
    proc = subprocess.run([sys.executable, "-m", "flowkit", "train", str(bad), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown dataset 'nope'" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing built or written


def test_cli_list_names_every_component(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, registry in flowkit.all_registries().items():
        for name in registry.names():
            if not name.startswith("test_"):
                assert f" {name} " in out


def test_cli_list_into_a_closed_pipe_has_no_traceback():
    """`flowkit list | head -1`: the reader leaves early; the CLI stops quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "flowkit", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
