"""Couplings: exact minibatch OT and Sinkhorn pairings of data with noise, labels kept aligned.

The solvers themselves are tested in ``test_ot.py``; the reflow teacher in ``test_teacher.py``.
"""

import ast
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.couplings import ExactOT, Independent, Sinkhorn
from flowkit.ot import squared_distances

scipy_optimize = pytest.importorskip("scipy.optimize")  # the oracle, in tests only

ROOT = Path(__file__).resolve().parents[1]


def _optimum(cost: torch.Tensor) -> float:
    rows, cols = scipy_optimize.linear_sum_assignment(cost.double().cpu().numpy())
    return float(cost.double().cpu().numpy()[rows, cols].sum())


def test_exact_ot_coupling_permutes_the_noise():
    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    x2, z2 = ExactOT()(x, z)
    assert x2 is x
    assert sorted(map(tuple, z2.tolist())) == sorted(map(tuple, z.tolist()))  # no repeats
    paired = float((x2.double() - z2.double()).square().sum())
    assert paired == pytest.approx(_optimum(squared_distances(x, z)), rel=1e-9)
    assert paired < float((x.double() - z.double()).square().sum())


def test_exact_ot_coupling_keeps_labels_aligned():
    g = torch.Generator().manual_seed(6)
    x, z = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    _, z2 = ExactOT()(x, z, labels)
    source = {tuple(row): i for i, row in enumerate(z.tolist())}
    slots = torch.tensor([source[tuple(row)] for row in z2.tolist()])
    assert bool((labels[slots] == labels).all())  # noise slot j carries label j


def test_independent_is_the_identity():
    x, z = torch.randn(5, 2), torch.randn(5, 2)
    x2, z2 = Independent()(x, z)
    assert x2 is x and z2 is z


def test_sinkhorn_coupling_draws_noise_from_the_batch():
    g = torch.Generator().manual_seed(9)
    x, z = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    labels = torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(0)
    x2, z2 = Sinkhorn(reg=0.1)(x, z, labels)
    assert x2 is x
    source = {tuple(row): i for i, row in enumerate(z.tolist())}
    slots = torch.tensor([source[tuple(row)] for row in z2.tolist()])
    assert bool((labels[slots] == labels).all())
    assert (x2 - z2).square().sum() < (x - z).square().sum()  # nearly OT at small reg


def test_couplings_are_registered_and_build_from_recipes():
    assert {"independent", "exact_ot", "sinkhorn"} <= set(flowkit.COUPLINGS.names())
    recipe = flowkit.apply_overrides({
        "data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
        "objective": {"name": "cfm", "coupling": {"name": "sinkhorn", "reg": 0.2}}}, [])
    built = flowkit.build(recipe)
    assert isinstance(built.objective.coupling, Sinkhorn) and built.objective.coupling.reg == 0.2
    with pytest.raises(flowkit.RecipeError, match="objective.coupling.name"):
        flowkit.validate({**recipe, "objective": {"name": "cfm", "coupling": {"name": "exact_otx"}}})


def test_exact_ot_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        ExactOT(method="hungarian")
    with pytest.raises(ValueError, match="shape"):
        ExactOT()(torch.zeros(4, 2), torch.zeros(5, 2))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against flowkit's layout."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_couplings_import_neither_the_application_nor_the_samplers():
    # couplings are components: they pair batches with what they are handed (flowkit.ot's
    # solvers, a teacher map), and never load runs, train, start processes or integrate ODEs.
    imported = _imports(ROOT / "flowkit" / "couplings.py")
    upward = {m for m in imported if m in ("subprocess", "tempfile") or m.startswith(
        ("flowkit.run", "flowkit.trainer", "flowkit.samplers", "flowkit.recipe", "flowkit.teacher"))}
    assert not upward, upward


def test_ot_package_stands_on_torch_alone():
    paths = sorted((ROOT / "flowkit" / "ot").glob("*.py"))
    assert {p.name for p in paths} >= {"__init__.py", "assignment.py", "compiled.py", "sinkhorn.py"}
    for path in paths:
        outside = {m for m in _imports(path) if m.startswith("flowkit") and not m.startswith("flowkit.ot")}
        assert not outside, (path.name, outside)
