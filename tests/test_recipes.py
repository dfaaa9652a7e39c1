"""Every shipped recipe validates and trains for a couple of steps."""

from pathlib import Path

import dataclasses

import pytest

import flowkit
import flowkit.config
from flowkit.recipe import resolve_defaults

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SMOKE = ["train.steps=2", "train.log_every=1", "train.checkpoint_every=0", "train.sample_every=0",
         "train.eval_every=0", "train.batch_size=16"]


def test_recipes_exist():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_validates_and_runs(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# flowkit "), "each recipe starts with the command that runs it"
    recipe = flowkit.load_recipe(path, SMOKE)
    flowkit.validate(recipe, str(path))
    if path.stem.endswith("_gpu"):
        pytest.skip("GPU recipe with hub data: validated only (no network in tests)")
    result = flowkit.train(recipe, tmp_path / "run", progress=False)
    assert result.step == 2
    # the run saved its recipe with every default written out, and rebuilds from it alone
    saved = flowkit.load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved == resolve_defaults(recipe)
    assert set(saved["train"]) == {f.name for f in dataclasses.fields(flowkit.config.TrainConfig)}
    built, _ = flowkit.load_run(tmp_path / "run")
    if type(built.objective).variational:  # declared: no flow, it draws its own samples
        assert built.objective.generate(8).shape == (8, *built.dataset.shape)
        return
    sample = flowkit.generate(built.objective.flow(), built.sampler, 8)
    assert sample.x.shape[0] == 8
