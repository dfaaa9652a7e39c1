"""The FFJORD objective's ``compile`` modes: same loss and gradients as eager, clear errors."""

import shutil

import pytest
import torch

import flowkit
from flowkit.recipe import RecipeError

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="torch.compile on CPU needs a C++ compiler")


def _recipe(compile_mode, **objective):
    return {"data": {"name": "8gaussians"},
            "dynamics": {"name": "concatsquash", "hidden": [16, 16], "activation": "tanh"},
            "objective": {"name": "ffjord", "method": "rk4", "steps": 4, "compile": compile_mode, **objective},
            "train": {"batch_size": 32}}


def test_wrong_compile_mode_names_the_key_and_the_choices():
    with pytest.raises(RecipeError) as err:
        flowkit.build(_recipe("fast"))
    text = str(err.value)
    assert "objective.compile" in text and "reduce-overhead" in text and "max-autotune" in text
    assert "false, true, default" in text  # choices as a recipe writes them


@needs_compiler
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_exact_trace_matches_eager(mode):
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    results = []
    for compile_mode in (False, mode):
        torch.manual_seed(0)
        obj = flowkit.build(_recipe(compile_mode)).objective.train()
        out = obj.loss(x)
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in obj.parameters()])))
    (eager_loss, eager_grad), (comp_loss, comp_grad) = results
    assert torch.allclose(eager_loss, comp_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(eager_grad, comp_grad, rtol=1e-4, atol=1e-6)
