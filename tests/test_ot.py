"""Optimal transport solvers (flowkit.ot): exact assignment against SciPy's, Sinkhorn marginals."""

import math
import shutil
import sysconfig

import pytest
import torch

import flowkit
from flowkit.couplings import ExactOT
from flowkit.ot import (auction_assignment, compiled, compiled_auction, compiled_auction_available,
                        interior_point_assignment, optimal_assignment, sinkhorn_log_plan, sinkhorn_potentials,
                        squared_distances)

scipy_optimize = pytest.importorskip("scipy.optimize")  # the oracle, in tests only


def _optimum(cost: torch.Tensor) -> float:
    rows, cols = scipy_optimize.linear_sum_assignment(cost.double().cpu().numpy())
    return float(cost.double().cpu().numpy()[rows, cols].sum())


def _total(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost.double()[torch.arange(cost.shape[0], device=cost.device), perm].sum())


def _is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))


def _cost_matrices():
    g = torch.Generator().manual_seed(0)
    data = flowkit.data.get_dataset("8gaussians")
    for n in (1, 2, 3, 7, 40, 128):
        yield f"uniform-{n}", torch.rand(n, n, generator=g, dtype=torch.float64)
        yield f"integer-ties-{n}", torch.randint(0, 4, (n, n), generator=g).double()
        x, z = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
        yield f"gauss5d-{n}", squared_distances(x, z)
    x, _ = data.train_batch(256, g)
    yield "8gaussians-256", squared_distances(x, torch.randn(256, 2, generator=g))
    yield "negative-offset", torch.rand(30, 30, generator=g, dtype=torch.float64) * 1e3 - 5e3
    yield "duplicate-rows", squared_distances(torch.zeros(50, 2), torch.randn(50, 2, generator=g))
    yield "constant", torch.ones(9, 9, dtype=torch.float64)


CASES = list(_cost_matrices())


needs_compiled = pytest.mark.skipif(not compiled_auction_available(),
                                    reason="flowkit.ot._auction was not built (no C compiler at install)")
METHODS = [pytest.param("compiled", marks=needs_compiled), "ipm", "auction"]


def test_compiled_solver_is_built_where_a_compiler_exists():
    # The install builds flowkit.ot._auction whenever a C compiler is present (setup.py); a
    # silently skipped build would leave CPU users on the slower torch solvers.
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert compiled_auction_available()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,cost", CASES, ids=[c[0] for c in CASES])
def test_optimal_assignment_is_an_optimal_permutation(name, cost, method):
    perm = optimal_assignment(cost, method=method)
    n = cost.shape[0]
    assert _is_permutation(perm, n)
    span = float(cost.max() - cost.min())
    assert _total(cost, perm) <= _optimum(cost) + 1e-7 * span + 1e-12 * abs(_optimum(cost))


def test_generic_problems_recover_scipys_permutation():
    # Continuous costs have a unique optimum almost surely: the same permutation, not just the cost.
    g = torch.Generator().manual_seed(1)
    for n in (16, 100):
        cost = squared_distances(torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g))
        rows, cols = scipy_optimize.linear_sum_assignment(cost.numpy())
        assert optimal_assignment(cost).tolist() == cols.tolist()


@needs_compiled
def test_compiled_auction_takes_any_layout_and_recovers_scipys_permutation(monkeypatch):
    g = torch.Generator().manual_seed(11)
    for n in (2, 64, 300):
        x, z = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        cost = squared_distances(z, x).T  # non-contiguous float64
        rows, cols = scipy_optimize.linear_sum_assignment(cost.numpy())
        assert compiled_auction(cost).tolist() == cols.tolist()
        assert compiled_auction(cost.float()).tolist() == cols.tolist()
    cost = torch.rand(50, 50, generator=g, dtype=torch.float64)
    calls = []
    real = compiled.run
    monkeypatch.setattr(compiled, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    optimal_assignment(cost)  # auto on a CPU cost takes the compiled solver
    assert calls == [1]


@needs_compiled
@pytest.mark.parametrize("kernel", ["scalar", "avx2"])
def test_every_compiled_kernel_gives_the_optimum(kernel):
    # The row scan has a portable version and x86 SIMD versions picked at import; run each one
    # on odd sizes (SIMD tails), ties and clustered data.
    extension = compiled.extension()
    try:
        previous = extension.use_kernel(kernel)
    except ValueError:
        pytest.skip(f"no {kernel} kernel on this machine")
    try:
        for name, cost in CASES:
            if cost.shape[0] > 1:
                perm = compiled_auction(cost)
                span = float(cost.max() - cost.min())
                assert _is_permutation(perm, cost.shape[0]), name
                assert _total(cost, perm) <= _optimum(cost) + 1e-7 * span + 1e-12 * abs(_optimum(cost)), name
    finally:
        extension.use_kernel(previous)


def test_without_the_extension_auto_falls_back_and_compiled_says_why(monkeypatch):
    monkeypatch.setattr(compiled, "_extension", None)
    g = torch.Generator().manual_seed(12)
    cost = torch.rand(40, 40, generator=g, dtype=torch.float64)
    assert not compiled_auction_available()
    assert _total(cost, optimal_assignment(cost)) <= _optimum(cost) + 1e-7
    with pytest.raises(RuntimeError, match="C compiler"):
        optimal_assignment(cost, method="compiled")
    with pytest.raises(RuntimeError, match="C compiler"):
        ExactOT(method="compiled")(torch.randn(8, 2), torch.randn(8, 2))


def test_auction_alone_with_epsilon_scaling():
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(60, 60, generator=g, dtype=torch.float64)
    perm = auction_assignment(cost)
    assert _is_permutation(perm, 60)
    assert _total(cost, perm) <= _optimum(cost) + 1e-7


def test_interior_point_reaches_the_lp_optimum():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(50, 50, generator=g, dtype=torch.float64)
    plan, u, v = interior_point_assignment(cost, gap=1e-8)
    assert torch.allclose(plan.sum(0), torch.ones(50, dtype=plan.dtype), atol=1e-6)
    assert torch.allclose(plan.sum(1), torch.ones(50, dtype=plan.dtype), atol=1e-6)
    assert float((cost * plan).sum()) == pytest.approx(_optimum(cost), abs=1e-5)
    assert float(u.sum() + v.sum()) == pytest.approx(_optimum(cost), abs=1e-5)  # strong duality
    assert float((cost - u[:, None] - v[None, :]).min()) > -1e-6  # dual feasible


def test_groups_pair_within_labels_only():
    g = torch.Generator().manual_seed(4)
    n = 96
    cost = squared_distances(torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g))
    labels = torch.randint(0, 5, (n,), generator=g)
    perm = optimal_assignment(cost, groups=labels)
    assert _is_permutation(perm, n) and bool((labels[perm] == labels).all())
    best = sum(_optimum(cost[idx][:, idx]) for k in range(5)
               if (idx := (labels == k).nonzero().squeeze(1)).numel())
    assert _total(cost, perm) == pytest.approx(best, abs=1e-9)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="square"):
        optimal_assignment(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="finite"):
        optimal_assignment(torch.tensor([[0.0, math.inf], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="method.*compiled"):
        optimal_assignment(torch.zeros(2, 2), method="hungarian")


@pytest.mark.parametrize("reg", [0.05, 1.0])
def test_sinkhorn_plan_has_uniform_marginals(reg):
    g = torch.Generator().manual_seed(7)
    cost = squared_distances(torch.randn(50, 2, generator=g) * 2, torch.randn(70, 2, generator=g))
    plan = sinkhorn_log_plan(cost, reg, tol=1e-9, max_iter=5000).exp()
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-8)
    assert torch.allclose(plan.sum(1), torch.full((50,), 1 / 50, dtype=plan.dtype), rtol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((70,), 1 / 70, dtype=plan.dtype), rtol=1e-6)


def test_sinkhorn_approaches_exact_ot_as_reg_shrinks():
    g = torch.Generator().manual_seed(8)
    cost = squared_distances(torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g))
    optimum = _optimum(cost) / 30
    transported = [float((sinkhorn_log_plan(cost, reg, max_iter=5000, tol=1e-8).exp() * cost).sum())
                   for reg in (1.0, 0.1, 0.02)]
    assert transported[0] > transported[1] > transported[2] >= optimum - 1e-9
    assert transported[2] - optimum < 0.05 * optimum
    _, _, iterations = sinkhorn_potentials(cost, 1.0, tol=1e-6)
    assert iterations < 500


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_ot_stays_on_the_gpu():
    g = torch.Generator().manual_seed(10)
    cost = squared_distances(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g))
    perm = optimal_assignment(cost.cuda())
    assert perm.device.type == "cuda"
    assert _total(cost, perm.cpu()) == pytest.approx(_optimum(cost), abs=1e-9)
