"""The exact-trace strategy by dimension (a declared, measured table) and concatsquash's fused Jacobian path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowkit.dynamics import ConcatSquashMLP
from flowkit.fast_divergence import EXACT_TRACE_BY_DIM, STRATEGIES, choose_strategy
from flowkit.trace import divergence

RESULTS = Path(__file__).resolve().parents[1] / "bench/results/trace_strategies.json"


def test_exact_trace_strategy_follows_the_measured_table():
    assert choose_strategy("exact", dim=2) == "exact"
    assert choose_strategy("exact", dim=32) == "exact_loop"  # evaluation: D backward passes from D = 16
    assert choose_strategy("exact", dim=32, create_graph=True) == "exact"  # training: one batched backward
    assert choose_strategy("exact", dim=64, create_graph=True) == "exact"
    assert choose_strategy("exact", dim=64, device="cuda") == "exact"  # not measured: the batched backward
    assert choose_strategy("exact", frozenset({"jacobian"}), dim=64) == "jacobian"  # a declared path wins
    assert {way for rows in EXACT_TRACE_BY_DIM.values() for _, way in rows} <= set(STRATEGIES)


def test_the_table_agrees_with_the_bench_it_cites():
    """Every measured (D, use): the table's way is within 15% of the faster of the two it chooses between."""
    rows = json.loads(RESULTS.read_text())["rows"]
    names = {"exact": "vjp_batched", "exact_loop": "vjp_loop"}
    for row in rows:
        way = choose_strategy("exact", dim=row["dim"], create_graph=row["mode"] == "train")
        best = min(row["ms"]["vjp_batched"], row["ms"]["vjp_loop"])
        assert row["ms"][names[way]] <= 1.15 * best, (row["dim"], row["mode"], way, row["ms"])


@pytest.mark.parametrize("create_graph", [False, True])
def test_exact_trace_at_large_dim_gives_the_closed_form_trace_and_frobenius_norm(create_graph):
    torch.manual_seed(0)
    a = torch.randn(40, 40, dtype=torch.float64)
    x = torch.randn(5, 40, dtype=torch.float64)
    assert choose_strategy("exact", dim=40, create_graph=create_graph) == ("exact" if create_graph else "exact_loop")
    out = divergence(lambda t, y: y @ a.T, torch.tensor(0.0), x, frobenius=True, create_graph=create_graph)
    assert torch.allclose(out.div, torch.full((5,), float(a.trace()), dtype=torch.float64))
    assert torch.allclose(out.jac_frobenius, torch.full((5,), float(a.pow(2).sum()), dtype=torch.float64))


@pytest.mark.parametrize("kwargs,tshape", [({}, ()), ({"num_classes": 3}, (4,)), ({"time_features": 4}, ()),
                                           ({"hidden": ()}, ())])
def test_fused_tanh_jacobian_is_one_node_with_the_double_backprop_gradients(kwargs, tshape):
    """concatsquash (tanh) carries (f, J) through one autograd node whose hand-written backward equals
    autograd's double backpropagation through f (J by torch.func.jacrev), for x, t and every parameter."""
    torch.manual_seed(1)
    hidden = kwargs.pop("hidden", (7, 5))
    net = ConcatSquashMLP(3, hidden, **kwargs).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(tshape, dtype=torch.float64, requires_grad=True)
    cond = torch.tensor([0, 1, 2, -1]) if "num_classes" in kwargs else None
    f, jac = net.forward_with_jacobian(t, x, cond)
    assert type(f.grad_fn).__name__ == "_TanhJacobianBackward"

    def single(xi, ti, ci):
        return net(ti.reshape(1) if ti.dim() else ti, xi[None], None if ci is None else ci[None])[0]

    ref_f = net(t, x, cond)
    ref_j = torch.stack([torch.func.jacrev(single)(x[b], t[b] if t.dim() else t, None if cond is None else cond[b])
                         for b in range(4)]).transpose(1, 2)  # J[b, i, j] = ∂f_j/∂x_i
    assert torch.allclose(f, ref_f, atol=1e-12) and torch.allclose(jac, ref_j, atol=1e-12)
    gf, gj = torch.randn_like(f), torch.randn_like(jac)
    inputs = [x, t, *[p for p in net.parameters() if p.requires_grad]]
    ours = torch.autograd.grad((f * gf).sum() + (jac * gj).sum(), inputs, allow_unused=True)
    ref = torch.autograd.grad((ref_f * gf).sum() + (ref_j * gj).sum(), inputs, allow_unused=True)
    for mine, theirs in zip(ours, ref):
        if theirs is None:
            assert mine is None or float(mine.abs().max()) == 0.0
        else:
            assert torch.allclose(mine, theirs, atol=1e-10), (mine - theirs).abs().max()
