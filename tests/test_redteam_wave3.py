"""Red team, wave 3: attacks on the FFJORD warm start (step plans in checkpoints), the
data_real package split, the CLI's output files, several Hutchinson probes through the fast
divergence paths, and the reverse-SDE samplers' declared grid. Each test guards a behaviour
the changes promise; names say what would break."""

from __future__ import annotations

import io
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import flowkit
from flowkit.checkpoint import (last_good_checkpoint, latest_checkpoint, load_checkpoint, non_finite_tensors,
                                read_checkpoint, save_checkpoint)
from flowkit.cli import main
from flowkit.dopri5 import StepPlan, dopri5
from flowkit.objectives.ffjord import FFJORD

from conftest import make_loss_nan

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
FFJ = ROOT / "recipes/ffjord_8gaussians.yaml"
#: a tiny FFJORD run: a constant schedule, so a resume with more steps changes nothing
SMALL = ["train.log_every=1", "train.checkpoint_every=0", "train.sample_every=0", "train.batch_size=32",
         "dynamics.hidden=[16,16]", "train.threads=1", "train.schedule=constant", "train.warmup=0"]


def _train(run: Path, steps: int, *extra: str, resume: bool = False) -> None:
    if resume:
        flowkit.train({}, run, overrides=[f"train.steps={steps}"], resume=True, progress=False, log=lambda m: None)
    else:
        flowkit.train(flowkit.load_recipe(FFJ, [*SMALL, f"train.steps={steps}", *extra]), run, progress=False,
                      log=lambda m: None)


def _same_weights(a: dict, b: dict) -> bool:
    return a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k])
                                                           for k in a["model"])


def _plans(state: dict) -> dict[str, StepPlan]:
    return {k: StepPlan.from_tensor(v) for k, v in state["solver"].items()}


def _nfe(run: Path) -> list[float]:
    """The training steps' forward NFE (the evaluation records hold no ``nfe``)."""
    records = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [r["nfe"] for r in records if "nfe" in r]


def _plan_of(times, steps) -> torch.Tensor:
    return StepPlan(tuple(times), tuple(steps)).to_tensor()


def _resume_with_solver(tmp_path: Path, solver, steps: int = 3) -> tuple[int, Path]:
    run = tmp_path / "r"
    _train(run, 2)
    state = read_checkpoint(latest_checkpoint(run))
    state["solver"] = solver
    save_checkpoint(run, state["step"], state)
    code = main(["train", str(FFJ), *SMALL, f"train.steps={steps}", "--out", str(run), "--resume", "--no-progress"])
    return code, run


# ======================================================================= (a) FFJORD warm start
RESUME_CASES = {
    "default": [],
    "blocks=2": ["objective.blocks=2"],
    "adjoint": ["objective.adjoint=true"],
    "rk4": ["objective.method=rk4", "objective.steps=3"],
    "per_sample_norm": ["objective.per_sample_norm=true"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, case):
    extra = RESUME_CASES[case]
    _train(tmp_path / "straight", 4, *extra)
    _train(tmp_path / "parted", 2, *extra)
    part = load_checkpoint(tmp_path / "parted")
    warm = "adjoint" not in case and "rk4" not in case  # the lean dopri5 only
    blocks = 2 if case == "blocks=2" else 1
    assert sorted(part["solver"]) == ([f"step_plan.{i}" for i in range(blocks)] if warm else [])
    _train(tmp_path / "parted", 4, resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "parted")
    assert a["step"] == b["step"] == 4
    assert _same_weights(a, b)
    assert _plans(a) == _plans(b)
    assert _nfe(tmp_path / "straight") == _nfe(tmp_path / "parted")


def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    """checkpoint_every=2 of a 3-step run: the step-2 checkpoint holds step 2's plan (not the
    last one's), so continuing from it after losing step 3 repeats the uninterrupted run."""
    _train(tmp_path / "straight", 4)
    run = tmp_path / "killed"
    _train(run, 3, "train.checkpoint_every=2", "train.keep_checkpoints=3")
    (run / "checkpoints/step_0000003.pt").unlink()  # as if killed during step 3
    (run / "checkpoints/latest").write_text("step_0000002.pt")
    assert load_checkpoint(run)["step"] == 2
    _train(run, 4, resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    assert _same_weights(a, b) and _plans(a) == _plans(b)


def test_resume_of_a_checkpoint_written_before_plans_starts_cold(tmp_path, monkeypatch):
    """A checkpoint without "solver" (flowkit before the warm start) resumes; its next step is
    solved cold: exactly the uninterrupted run with the plan dropped before that step, and not
    the warm one (the plan matters, so this test can tell)."""
    run = tmp_path / "old"
    _train(run, 2)
    state = read_checkpoint(latest_checkpoint(run))
    del state["solver"]
    save_checkpoint(run, state["step"], state)
    assert "solver" not in torch.load(latest_checkpoint(run), weights_only=True)
    _train(run, 4, resume=True)
    assert _plans(load_checkpoint(run))  # new checkpoints carry plans again

    _train(tmp_path / "warm", 4)
    original, calls = FFJORD.loss, []

    def drop_before_third(self, x, cond=None):
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                self.step_plans = []
        return original(self, x, cond)

    monkeypatch.setattr(FFJORD, "loss", drop_before_third)
    _train(tmp_path / "cold3", 4)
    old, cold, warm = (load_checkpoint(p) for p in (run, tmp_path / "cold3", tmp_path / "warm"))
    assert _same_weights(old, cold)
    assert not _same_weights(old, warm)
    assert _nfe(run)[2] > _nfe(tmp_path / "warm")[2]  # the cold step pays the probe and the small first step


def test_a_healthy_plan_with_inf_and_nan_markers_is_a_healthy_checkpoint(tmp_path):
    run = tmp_path / "r"
    _train(run, 2)
    state = load_checkpoint(run)  # refuses non-finite weights: the plan's markers are not weights
    plan = state["solver"]["step_plan.0"]
    assert torch.isinf(plan).any() and torch.isnan(plan).any()  # a landing step; the times row's padding
    assert non_finite_tensors(state, ("model", "ema", "optimizer")) == []
    assert last_good_checkpoint(run) == latest_checkpoint(run)


def test_eval_and_no_grad_calls_between_steps_neither_use_nor_change_the_plan():
    torch.manual_seed(0)
    obj = flowkit.build(flowkit.load_recipe(FFJ, SMALL)).objective
    cold_obj = flowkit.build(flowkit.load_recipe(FFJ, [*SMALL, "objective.warm_start=false"])).objective
    cold_obj.load_state_dict(obj.state_dict())
    x, x2 = torch.randn(32, 2), torch.randn(32, 2) * 1.5
    obj.train()
    obj.loss(x)
    plans = list(obj.step_plans)
    assert plans and plans[0] is not None
    cold_obj.train()
    with torch.no_grad():
        cold = cold_obj.loss(x2).metrics
        for mode in ("train", "eval"):
            getattr(obj, mode)()
            assert obj.loss(x2).metrics == cold  # solved cold: the plan not used
            assert obj.step_plans == plans  # nor changed
    obj.eval()
    out = obj.loss(x2)  # eval with gradients (a validation loss): the same
    assert out.metrics == cold_obj.loss(x2).metrics and obj.step_plans == plans
    with torch.inference_mode():
        obj.train()
        assert obj.loss(x2).metrics == cold and obj.step_plans == plans
    obj.train()
    warm = obj.loss(x2).metrics
    assert warm["nfe"] != cold["nfe"]  # and the training call does use it
    assert obj.step_plans != plans


def test_periodic_evaluations_between_training_steps_change_nothing_of_the_training(tmp_path):
    """eval_every=1: the trainer evaluates (model.eval(), no_grad solves) after every step; the
    weights, plans and per-step NFE are those of the run without evaluations."""
    _train(tmp_path / "plain", 4)
    _train(tmp_path / "evaluated", 4, "train.eval_every=1", "train.eval_points=32")
    a, b = load_checkpoint(tmp_path / "plain"), load_checkpoint(tmp_path / "evaluated")
    assert _same_weights(a, b) and _plans(a) == _plans(b)
    assert _nfe(tmp_path / "plain") == _nfe(tmp_path / "evaluated")
    assert "eval_nll" in (tmp_path / "evaluated" / "metrics.jsonl").read_text()


def test_a_plan_of_another_interval_is_not_used():
    f = lambda t, x: -3.0 * x * (1 + torch.sin(6 * t))  # noqa: E731
    y0 = torch.ones(3, 2, dtype=F64)
    plan = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7).plan
    for times in ([1.0, 0.0], [0.0, 0.5], [0.0, 0.5, 1.0], [0.0, 2.0]):
        cold = dopri5(f, y0, times, rtol=1e-7, atol=1e-7)
        other = dopri5(f, y0, times, rtol=1e-7, atol=1e-7, plan=plan)
        assert (other.nfe, other.accepted, other.rejected) == (cold.nfe, cold.accepted, cold.rejected)
        assert torch.equal(other.ys, cold.ys)
    # through the objective: a checkpoint's plan of another interval is loaded and ignored
    torch.manual_seed(0)
    obj = flowkit.build(flowkit.load_recipe(FFJ, SMALL)).objective
    x = torch.randn(32, 2)
    with torch.no_grad():
        cold = obj.loss(x).metrics
    obj.load_solver_state({"step_plan.0": StepPlan((0.0, 0.5), ((0.0, 0.5, 0.01),)).to_tensor()})
    obj.train()
    assert obj.loss(x).metrics["nfe"] == cold["nfe"]


def test_warm_start_false_takes_torchdiffeqs_step_sequence_at_every_step():
    """warm_start=false: every training step's forward solve is the cold one, step for step what
    torchdiffeq's dopri5 (the adjoint's forward solve) takes on the same weights and batch."""
    torch.manual_seed(0)
    lean = flowkit.build(flowkit.load_recipe(FFJ, [*SMALL, "objective.warm_start=false"])).objective
    ref = flowkit.build(flowkit.load_recipe(FFJ, [*SMALL, "objective.adjoint=true"])).objective
    warm = flowkit.build(flowkit.load_recipe(FFJ, SMALL)).objective
    ref.load_state_dict(lean.state_dict())
    warm.load_state_dict(lean.state_dict())
    opt = torch.optim.Adam(lean.parameters(), lr=5e-3)
    differed = False
    for step in range(3):
        x = torch.randn(32, 2)
        for m in (lean, ref, warm):
            m.train()
        out = lean.loss(x)
        assert out.metrics["nfe"] == ref.loss(x).metrics["nfe"], step
        differed |= warm.loss(x).metrics["nfe"] != out.metrics["nfe"]
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ref.load_state_dict(lean.state_dict())
        warm.load_state_dict(lean.state_dict())
        assert lean.solver_state() == {}
    assert differed


def test_a_nan_step_with_a_plan_exits_3_and_leaves_the_checkpoint_and_its_plan_intact(tmp_path, monkeypatch, capsys):
    run = tmp_path / "nan"
    _train(run, 2)
    before = load_checkpoint(run)
    original = make_loss_nan(monkeypatch, FFJORD)
    assert main(["train", str(FFJ), *SMALL, "train.steps=4", "--out", str(run), "--resume", "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("flowkit train: training diverged at step 3")
    after = load_checkpoint(run)
    assert after["step"] == 2 and _same_weights(before, after) and _plans(before) == _plans(after)
    monkeypatch.setattr(FFJORD, "loss", original)
    assert main(["train", str(FFJ), *SMALL, "train.steps=4", "--out", str(run), "--resume", "--no-progress"]) == 0


@pytest.mark.parametrize("solver", [
    {"step_plan.0": torch.tensor([0.0, 1.0, 0.5])},  # 1-D
    {"step_plan.0": torch.tensor(1.0)},  # a scalar
    {"step_plan.0": torch.tensor([[0.0, 1.0], [0.0, 0.5]])},  # two columns
    {"step_plan.x": torch.zeros(2, 3)},  # not a block index
    {"step_plan.7": _plan_of((0.0, 1.0), ((0.0, 1.0, math.inf),))},  # a block the model does not have
], ids=["1d", "scalar", "2-columns", "bad-key", "no-such-block"])
def test_a_malformed_plan_in_a_checkpoint_is_never_a_traceback(tmp_path, capsys, solver):
    """A damaged plan is dropped (the resume starts that block cold: exit 0) or refused in one
    line (exit 2); never a traceback."""
    code, run = _resume_with_solver(tmp_path, solver)
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 0:
        assert load_checkpoint(run)["step"] == 3
    else:
        assert err.strip().splitlines()[-1].startswith("flowkit train: ")


def test_plans_with_nan_entries_are_ignored_not_crashed_on():
    f = lambda t, x: -3.0 * x * (1 + torch.sin(6 * t))  # noqa: E731
    y0 = torch.ones(3, 2, dtype=F64)
    cold = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7)
    for plan in (StepPlan.from_tensor(torch.full((3, 3), math.nan, dtype=F64)),  # no times: does not fit
                 StepPlan((0.0, 1.0), ((math.nan, math.nan, math.nan),))):  # covers nothing, first step the whole
        sol = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7, plan=plan)
        assert torch.allclose(sol.ys[-1], cold.ys[-1], rtol=1e-5)


# ========================================================================= (b) data_real split
def test_every_dataset_name_is_still_registered_and_every_old_import_works():
    import flowkit.data_real as dr

    names = set(flowkit.DATASETS.names())
    assert {"digits", "hf", "power", "gas", "hepmass", "miniboone", "bsds300"} <= names
    old_all = ["QuantisedImages", "Digits", "HFDataset", "TabularArrays", "DataUnavailable", "dequantise",
               "binarise", "binarize_excludes_logit", "logit_transform", "load_maf"]
    assert sorted(dr.__all__) == sorted(old_all)
    for name in old_all:
        assert getattr(dr, name) is not None
    assert issubclass(dr.DataUnavailable, flowkit.data.DataError)
    # the registered classes are the package's
    assert flowkit.DATASETS.get("digits") is dr.Digits and flowkit.DATASETS.get("hf") is dr.HFDataset


def test_the_digits_recipe_trains_two_steps(tmp_path):
    out = tmp_path / "digits"
    assert main(["train", str(ROOT / "recipes/cfm_digits.yaml"), "train.steps=2", "train.batch_size=8",
                 "train.log_every=1", "train.checkpoint_every=0", "train.threads=1", "--out", str(out),
                 "--no-progress"]) == 0
    assert load_checkpoint(out)["step"] == 2


def _hf_image_parquet(path: Path, labels: list[int], names: list[str]) -> None:
    """A parquet file as HF ``datasets`` writes it: ``{bytes, path}`` images and ClassLabel names
    in the schema's ``huggingface`` metadata."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    Image = pytest.importorskip("PIL.Image")
    images = []
    for i, _ in enumerate(labels):
        buf = io.BytesIO()
        arr = np.random.default_rng(i).integers(0, 256, (4, 4), dtype=np.uint8)
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": images, "label": labels})
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": names, "_type": "ClassLabel"}}}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_hf_style_local_snapshot_through_a_recipe(tmp_path):
    """A hub snapshot's layout (README.md, .gitattributes, data/train-*.parquet, data/test-*.parquet),
    and a CSV, through ``data: {name: hf, path: ...}``."""
    snap = tmp_path / "snap"
    _hf_image_parquet(snap / "data/train-00000-of-00001.parquet", [0, 1, 2, 1, 0, 2], ["a", "b", "c"])
    _hf_image_parquet(snap / "data/test-00000-of-00001.parquet", [2, 0], ["a", "b", "c"])
    (snap / "README.md").write_text("# a dataset card\n")
    (snap / ".gitattributes").write_text("*.parquet filter=lfs\n")
    recipe = {"data": {"name": "hf", "path": str(snap), "label_column": "label"},
              "dynamics": {"name": "unet", "base": 8, "mults": [1], "groups": 4, "num_classes": 3},
              "objective": {"name": "cfm"}, "sampler": {"name": "euler", "steps": 2}}
    data = flowkit.build(recipe).dataset
    assert data.shape == (1, 4, 4) and data.num_classes == 3 and data.discrete
    assert data.test_set(100)[0].shape[0] == 2
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    pd.DataFrame({"u": rng.normal(size=40), "v": rng.normal(size=40)}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "r.yaml").write_text(
        f"data: {{name: hf, path: {tmp_path / 't.csv'}}}\ndynamics: {{name: mlp, hidden: [8]}}\n"
        "objective: {name: cfm}\nsampler: {name: euler, steps: 2}\n")
    assert main(["train", str(tmp_path / "r.yaml"), "train.steps=2", "train.batch_size=8", "train.log_every=1",
                 "train.checkpoint_every=0", "train.threads=1", "--out", str(tmp_path / "run"), "--no-progress"]) == 0


# ======================================================================== (c) CLI output files
TINY = ["train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
        "train.threads=1", "dynamics.hidden=[16]", "--no-progress"]


@pytest.fixture(scope="module")
def cfm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w3") / "run"
    assert main(["train", str(ROOT / "recipes/cfm_8gaussians.yaml"), *TINY, "train.steps=2", "--out", str(out)]) == 0
    return out


def test_relative_output_paths_are_relative_to_the_working_directory(cfm_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(cfm_run), "--n", "4", "--out", "rel/s.npy"]) == 0
    assert main(["nll", str(cfm_run), "--n", "4", "--batch-size", "4", "--save-points", "p.npz"]) == 0
    assert np.load(tmp_path / "rel/s.npy").shape == (4, 2) and (tmp_path / "p.npz").is_file()


def test_an_existing_output_file_is_replaced_atomically(cfm_run, tmp_path):
    out = tmp_path / "s.npy"
    out.write_bytes(b"old")
    assert main(["sample", str(cfm_run), "--n", "3", "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]  # no temporary file left


@pytest.mark.parametrize("target", ["out/", "x.npyz", ".", "~"])
def test_an_out_without_a_sample_suffix_is_one_line_exit_2(cfm_run, tmp_path, monkeypatch, capsys, target):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(cfm_run), "--n", "3", "--out", target]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowkit sample: --out")


# ============================================================== (d) several probes, fast paths
def _mean_over_probes(fn, probes, **kw):
    outs = [fn(p, **kw) for p in probes]
    return outs[0].dx, torch.stack([o.div for o in outs]).mean(0)


@pytest.mark.parametrize("kind", ["jvp", "bottleneck"])
def test_several_probes_under_no_grad_with_a_condition_equal_the_probes_one_by_one(kind):
    from flowkit.dynamics.conv import ConcatConvNet
    from flowkit.dynamics.mlp import ConcatSquashMLP
    from flowkit.fast_divergence import bind
    from flowkit.trace import divergence

    torch.manual_seed(0)
    cond = torch.tensor([0, 2, 1])
    if kind == "jvp":
        net = ConcatConvNet(16, shape=(1, 4, 4), hidden=(6, 6), num_classes=3).double()
        x = torch.randn(3, 1, 4, 4, dtype=F64)
        probes = torch.randn(4, *x.shape, dtype=F64)
    else:
        net = ConcatSquashMLP(3, (5, 8), bottleneck=True, num_classes=3).double()
        x = torch.randn(3, 3, dtype=F64)
        probes = torch.randn(4, 3, 5, dtype=F64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)  # one time per sample
    paths = bind(net, cond)
    fn = lambda tt, xx: net(tt, xx, cond)  # noqa: E731
    with torch.no_grad():
        batched = divergence(fn, t, x, estimator="hutchinson", probe=probes, paths=paths)
        dx, div = _mean_over_probes(lambda p: divergence(fn, t, x, estimator="hutchinson", probe=p, paths=paths),
                                    probes)
    assert torch.allclose(batched.dx, net(t, x, cond), atol=1e-12)
    assert torch.allclose(batched.div, div, atol=1e-10)
    if kind == "jvp":  # εᵀJε by reverse mode on the plain field: the same numbers
        generic = divergence(fn, t, x, estimator="hutchinson", probe=probes)
        assert torch.allclose(batched.div, generic.div, atol=1e-10)
    # the condition matters: another class changes the estimate
    other = divergence(lambda tt, xx: net(tt, xx, cond.flip(0)), t, x, estimator="hutchinson", probe=probes,
                       paths=bind(net, cond.flip(0)))
    assert not torch.allclose(other.div, batched.div)


def test_several_probes_with_per_sample_times_give_the_closed_form_likelihood():
    """Class-conditional Gaussian data N(μ_c, s² I) under VP: the score is exact and its Jacobian
    a multiple of I, so Rademacher Hutchinson is exact. Three probes, per-sample times (the
    per-sample solver), under no_grad: the change of variables ``delta`` must carry the exact
    marginal at t1 back to the exact log N(x; α μ_c, (α² s² + σ²) I) at t0."""
    from flowkit.diffusion import score_log_likelihood
    from flowkit.paths import VP

    path = VP()
    s2, means = 0.3, torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=F64)

    def score(x, t, c):
        a, sig = path.alpha(t).view(-1, 1), path.sigma(t).view(-1, 1)
        return -(x - a * means[c]) / (a ** 2 * s2 + sig ** 2)

    def marginal(x, t, c):  # log p_t(x | c)
        t = torch.tensor(t, dtype=F64)
        a, var = path.alpha(t), path.alpha(t) ** 2 * s2 + path.sigma(t) ** 2
        return -0.5 * ((x - a * means[c]) ** 2).sum(1) / var - math.log(2 * math.pi * var)

    cond = torch.tensor([0, 1, 1, 0, 1])
    x = means[cond] + torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * s2 ** 0.5
    with torch.no_grad():
        out = score_log_likelihood(score, x, path, cond=cond, estimator="hutchinson", n_probes=3, rtol=1e-8,
                                   atol=1e-8, generator=torch.Generator().manual_seed(1))
    assert out.steps is not None  # stepped per sample
    assert torch.allclose(marginal(out.z, path.t1, cond) + out.delta, marginal(x, path.t0, cond), atol=1e-5)


# ================================================================ (e) reverse-SDE samplers' grid
def test_predictor_corrector_on_a_declared_non_uniform_grid_samples_the_data_variance():
    """Gaussian data N(0, s² I) under VP with its exact score, the flow declaring a squared grid
    (as DiffFlow declares its L_β grid): predictor–corrector with no steps given walks that grid
    and its samples have the data's variance (Langevin's a_i uses each step's own h_i)."""
    from flowkit.diffusion import flow_from_score
    from flowkit.flow import TimeGrid
    from flowkit.paths import VP
    from flowkit.samplers.sde import predictor_corrector
    import dataclasses

    path, s2 = VP(), 0.25

    def score(t, x, cond=None):
        a, sig = path.alpha(t), path.sigma(t)
        return -x / (a ** 2 * s2 + sig ** 2)

    flow = dataclasses.replace(flow_from_score(score, path, (2,)), time_grid=TimeGrid(60, 2.0))
    x = flow.prior.sample(4000, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = predictor_corrector(flow, x, corrector_steps=1, seed=0)
    assert res.nfe == 60 * 2 + 1  # the declared grid's steps, a corrector each, the Tweedie step
    var = res.x.var(0)
    # Tweedie's E[x0 | x_t0] shrinks by a negligible amount at t0 = 1e-5
    assert torch.allclose(var, torch.full((2,), s2, dtype=F64), rtol=0.08), var


# ============================== (f) attacks that failed before their fixes (damaged plans, output paths, HF)
# ------------------------------------------------------------------ F1/F2: traceback on resume
@pytest.mark.parametrize("solver", [torch.zeros(3, 3), None, {"step_plan.0": torch.zeros(0, 3)}],
                         ids=["a-tensor", "None", "empty-plan"])
def test_a_corrupted_solver_state_does_not_crash_the_resume_with_a_traceback(tmp_path, solver):
    """Before the fix: AttributeError ('Tensor'/'NoneType' has no attribute 'items') or IndexError (an empty
    plan tensor) escapes Trainer.load_state_dict and main() -> traceback, exit 1. Expected: the
    plan only proposes step sizes, so an unusable one is dropped (cold start, exit 0) -- or at
    worst a one-line exit 2."""
    code, run = _resume_with_solver(tmp_path, solver)
    assert code == 0 and load_checkpoint(run)["step"] == 3


# --------------------------------------------- F3: a zero proposal: "training diverged", forever
def test_a_plan_with_a_zero_step_is_not_reported_as_divergence(tmp_path, capsys):
    """Before the fix: exit 3 'training diverged at step 3: the ODE solver failed (underflow in dt 0.0)',
    and the 'last good checkpoint' it points at holds the same plan, so --resume fails again
    forever. Expected: a plan proposing a step that cannot advance is not used."""
    zero_step = _plan_of((0.0, 1.0), ((0.0, 0.5, 0.0), (0.5, 1.0, math.inf)))
    code, run = _resume_with_solver(tmp_path, {"step_plan.0": zero_step})
    assert code == 0, capsys.readouterr().err


# ------------------------------------------------------------------- F4: a tiny proposal hangs
def test_a_plan_with_a_vanishing_step_does_not_hang_the_solver():
    """Before the fix: first step 1e-300 from t = 0, then every step capped at 1e-300 (t + 1e-300 != t near
    0, so the underflow check never fires): 5e299 steps, a hang (stopped here after 5 s).
    Expected: such a plan is not used (the cold solve, 14 evaluations)."""
    f = lambda t, x: -x  # noqa: E731

    def stop(*_):
        raise TimeoutError("dopri5 with the plan ran for 5 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    try:
        plan = StepPlan.from_tensor(_plan_of((0.0, 1.0), ((0.0, 0.5, 1e-300), (0.5, 1.0, math.inf))))
        sol = dopri5(f, torch.ones(2, 1, dtype=F64), [0.0, 1.0], plan=plan)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert abs(sol.ys[-1, 0, 0].item() - math.exp(-1)) < 1e-4


# ------------------------------------------- F5: a negative proposal steps outside [t0, t1]
def test_a_plan_never_makes_the_solver_evaluate_the_field_outside_the_interval():
    """The module docstring: 'a field defined only on [t0, t1] is never evaluated past it'. Before the fix:
    a plan proposing -0.3 over [0, 0.5) steps from 0 to -0.3 (accepted), back into [0, 0.5),
    where the cap sends it back again: evaluations before t0, and a solve that never ends."""
    seen = []

    def f(t, x):
        seen.append(float(t))
        if len(seen) > 10_000:  # before the fix it also never ended (steps back at every visit of [0, 0.5))
            raise RuntimeError(f"10,000 evaluations, times from {min(seen)} to {max(seen)}")
        return -x

    plan = StepPlan.from_tensor(_plan_of((0.0, 1.0), ((0.0, 0.5, -0.3), (0.5, 1.0, math.inf))))
    dopri5(f, torch.ones(2, 1, dtype=F64), [0.0, 1.0], plan=plan)
    assert min(seen) >= 0.0 and max(seen) <= 1.0, (min(seen), max(seen))


# ------------------------------------------- F6: nll --save-points over the run's own checkpoint
def test_save_points_never_overwrites_the_runs_checkpoint(cfm_run, tmp_path, capsys):
    """Run directories are never overwritten (README: --resume / a new --out / --overwrite). Before the fix,
    `flowkit nll RUN --save-points RUN/checkpoints/step_0000002.pt` (a .pt: accepted) replaces
    the run's only checkpoint with the points: the run is gone ('no intact checkpoint')."""
    import shutil

    run = tmp_path / "run"  # a copy: the module's run stays intact for the other tests
    shutil.copytree(cfm_run, run)
    ckpt = latest_checkpoint(run)
    before = ckpt.read_bytes()
    code = main(["nll", str(run), "--n", "4", "--batch-size", "4", "--save-points", str(ckpt)])
    err = capsys.readouterr().err
    assert ckpt.read_bytes() == before, "the checkpoint was overwritten by the points"
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--save-points" in err


# ---------------------------- F7: sample --out x.png checks x.png up front, not x.npy it also writes
def test_the_npy_that_sample_png_also_writes_is_checked_before_any_work(cfm_run, tmp_path, monkeypatch, capsys):
    """`sample --out s.png` also writes s.npy. Before the fix only s.png was checked up front: with s.npy a
    directory the model is loaded and sampled, s.png written, then the .npy write fails (exit 2
    after the work, a half output left). Expected: refused before loading, nothing written."""
    (tmp_path / "s.npy").mkdir()

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output files were checked")

    monkeypatch.setattr(flowkit, "load_run", forbidden)
    assert main(["sample", str(cfm_run), "--n", "3", "--out", str(tmp_path / "s.png")]) == 2
    assert "s.npy" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


# ------------------------------------------------------ F8: --out=~/x.npy makes a directory "~"
def test_a_tilde_path_is_the_home_directory_not_a_directory_named_tilde(cfm_run, tmp_path, monkeypatch):
    """`--out=~/s.npy` is not expanded by the shell (bash expands ~ only at a word's start or in an
    assignment); flowkit then makes ./~/s.npy. Expected: ~ is the home directory (expanduser)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["sample", str(cfm_run), "--n", "3", "--out=~/s.npy"]) == 0
    assert (home / "s.npy").is_file() and not (cwd / "~").exists()


# ------------------------------------ F9: sharded HF parquet loses the ClassLabel names (pre-existing)
def test_sharded_hf_parquet_keeps_its_class_names(tmp_path):
    """A hub snapshot with two train shards: data/train-0000{0,1}-of-00002.parquet whose schema
    names 3 classes, of which the training rows use 2. One shard: num_classes 3 (from the names);
    two shards: `_concat` drops `class_names`, num_classes = max label + 1 = 2, and a model
    built for 2 classes cannot take label 2 that the dataset card declares."""
    names = ["cat", "dog", "bird"]
    for i, labels in enumerate(([0, 1, 0], [1, 0, 1])):
        _hf_image_parquet(tmp_path / f"data/train-0000{i}-of-00002.parquet", labels, names)
    _hf_image_parquet(tmp_path / "data/test-00000-of-00001.parquet", [0, 1], names)
    from flowkit.data_real import HFDataset

    assert HFDataset(str(tmp_path), label_column="label").num_classes == 3
