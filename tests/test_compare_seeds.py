"""Comparisons that mean something: seeds, paired tests, parallel runs, and metrics that say
what they are (checked against closed forms)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import flowkit
from flowkit.compare import Budget, compare, parse_budget, summarise
from flowkit.metrics import (digits_classifier, energy_distance, frechet_distance, gaussian_frechet_distance, mmd,
                             DIGITS_CLASSIFIER_FILE)
from flowkit.recipe import RecipeError, _validate_settings, swap_objective, validate
from flowkit.stats import betainc, holm, mean_se, paired_t_test, t_sf

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.batch_size=32", "train.log_every=1000", "train.checkpoint_every=0", "train.sample_every=0",
        "eval.n=200", "eval.method=rk4", "eval.steps=4", "sampler=euler", "sampler.steps=4"]


# ------------------------------------------------------------------------------ statistics

def test_paired_t_test_agrees_with_scipy_ttest_rel():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n, shift in ((2, 0.3), (3, 0.0), (5, 1.0), (12, 0.2), (40, 0.05)):
        a = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        b = [x + shift + 0.5 * float(e) for x, e in zip(a, torch.randn(n, generator=g, dtype=torch.float64))]
        ours, ref = paired_t_test(a, b), stats.ttest_rel(a, b)
        assert ours.df == n - 1
        assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
        assert ours.p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)
    for t, df in ((0.5, 1), (2.0, 3), (12.0, 2), (3.3, 50), (1e-3, 7)):  # the t tail itself
        assert t_sf(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    assert betainc(2.5, 0.5, 0.3) == pytest.approx(stats.beta.cdf(0.3, 2.5, 0.5), rel=1e-10)


def test_paired_t_test_edge_cases_and_holm():
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]).p == 1.0  # identical: no difference
    assert paired_t_test([2.0, 3.0], [1.0, 2.0]).p == 0.0  # the same nonzero difference every seed
    assert math.isnan(paired_t_test([1.0], [2.0]).p)  # one pair: no test
    assert paired_t_test([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0]).n == 2  # a failed seed drops its pair
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert mean_se([2.0]) == (2.0, None)


def _row(run, seed, **metrics):
    return {"run": run, "seed": seed, "status": "ok", **metrics}


def test_summary_gives_mean_and_standard_error_and_marks_only_the_real_difference():
    base = [1.00, 1.20, 0.90, 1.10, 1.05]
    rows = [_row("a", s, nll=v) for s, v in enumerate(base)]
    # b: worse by 0.5 on every seed, with small seed-to-seed noise — a real difference
    rows += [_row("b", s, nll=v + 0.5 + 0.01 * (-1) ** s) for s, v in enumerate(base)]
    # c: the same as a up to noise of mean zero — no difference, though its mean is a bit worse
    rows += [_row("c", s, nll=v + d) for s, (v, d) in enumerate(zip(base, (0.05, -0.04, 0.03, -0.02, 0.0)))]
    rows.append({"run": "c", "seed": 5, "status": "diverged: the loss became nan"})
    summary, tests = summarise(rows)
    by = {s["run"]: s for s in summary}
    mean, se = mean_se(base)
    assert by["a"]["nll_mean"] == pytest.approx(mean) and by["a"]["nll_se"] == pytest.approx(se)
    assert by["a"].get("_best_nll") and by["a"]["nll_mark"] == ""
    assert by["b"]["nll_mark"] == "worse" and by["c"]["nll_mark"] == ""
    assert by["c"]["status"].startswith("5/6 ok; seed 5: diverged")
    test_b = next(t for t in tests if t["run"] == "b")
    expected = paired_t_test([r["nll"] for r in rows if r["run"] == "b"], base)
    assert test_b["p"] == pytest.approx(expected.p) and test_b["p_holm"] == pytest.approx(min(1, 2 * expected.p))
    assert next(t for t in tests if t["run"] == "c")["p"] > 0.5


# ------------------------------------------------------------------------------ metrics

def _gauss_abs_mean(m: float, s: float) -> float:
    """E|Z| for Z ~ N(m, s²) (the folded normal's mean)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))


def test_energy_distance_matches_the_closed_form_for_gaussians():
    # N(μ1, σ²) vs N(μ2, σ²) in 1-D: D = 2E|X−Y| − E|X−X'| − E|Y−Y'| with X−Y ~ N(δ, 2σ²);
    # the V-statistic's expectation adds E|X−X'|/n + E|Y−Y'|/m
    g = torch.Generator().manual_seed(0)
    sigma, delta, n = 1.0, 1.0, 3000
    within = _gauss_abs_mean(0.0, sigma * math.sqrt(2))  # 2σ/√π
    exact = 2 * _gauss_abs_mean(delta, sigma * math.sqrt(2)) - 2 * within
    expected = exact + 2 * within / n
    draws = [energy_distance(sigma * torch.randn(n, 1, generator=g), delta + sigma * torch.randn(n, 1, generator=g))
             for _ in range(4)]
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.02)
    assert exact == pytest.approx(0.5418, abs=1e-4)


def test_energy_distance_is_never_negative():
    # same law, few samples: the old estimator (unbiased within terms) went below zero about half the time
    g = torch.Generator().manual_seed(1)
    values = [energy_distance(torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)) for _ in range(40)]
    assert min(values) >= 0.0
    assert energy_distance(torch.ones(5, 2), torch.ones(5, 2)) == 0.0


def test_mmd_matches_the_closed_form_for_gaussians_with_an_rbf_kernel():
    # E k(X, Y) for X ~ N(μ1, σ1² I_d), Y ~ N(μ2, σ2² I_d), k = exp(−‖x−y‖²/(2h²)):
    # (h² / (h² + σ1² + σ2²))^{d/2} exp(−‖μ1−μ2‖² / (2(h² + σ1² + σ2²)))
    def ek(h, s1, s2, dist2, d):
        v = h * h + s1 * s1 + s2 * s2
        return (h * h / v) ** (d / 2) * math.exp(-dist2 / (2 * v))

    g = torch.Generator().manual_seed(2)
    d, h, s1, s2, n = 2, 1.0, 1.0, 0.5, 2000
    shift = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = ek(h, s1, s1, 0, d) + ek(h, s2, s2, 0, d) - 2 * ek(h, s1, s2, 1.0, d)
    # the V-statistic adds the diagonals: (1 − E k(X, X'))/n + (1 − E k(Y, Y'))/m
    expected = exact + (1 - ek(h, s1, s1, 0, d)) / n + (1 - ek(h, s2, s2, 0, d)) / n
    draws = [mmd(s1 * torch.randn(n, d, generator=g, dtype=torch.float64),
                 shift + s2 * torch.randn(n, d, generator=g, dtype=torch.float64), h, scales=(1.0,)) ** 2
             for _ in range(3)]
    assert sum(draws) / len(draws) == pytest.approx(expected, rel=0.05)
    same = mmd(torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g), 1.0)
    assert same >= 0.0


def test_frechet_distance_matches_the_closed_form():
    # diagonal Gaussians: ‖Δμ‖² + Σ (σ1 − σ2)²
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    exact = float((mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum())
    assert gaussian_frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(exact, rel=1e-10)
    g = torch.Generator().manual_seed(3)
    f = mu1 + s1.sqrt() * torch.randn(20000, 3, generator=g)
    h = mu2 + s2.sqrt() * torch.randn(20000, 3, generator=g)
    assert frechet_distance(f, h) == pytest.approx(exact, rel=0.03)


def test_shipped_digits_classifier_reaches_its_test_accuracy():
    from flowkit.data_real import Digits, dequantise

    assert DIGITS_CLASSIFIER_FILE.is_file() and DIGITS_CLASSIFIER_FILE.stat().st_size < 200_000
    torch.load(DIGITS_CLASSIFIER_FILE, weights_only=True)  # plain tensors only
    data = Digits()
    x = dequantise(data.test, 17, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = float((digits_classifier()(x).argmax(1) == data.test_labels).float().mean())
    assert accuracy >= 0.97  # 359 test images it never saw


def test_feature_distance_of_the_digits_separates_noise_from_data():
    from flowkit.config import EvalConfig
    from flowkit.evaluate import sample_metrics  # noqa: F401  (the same module evaluate_model uses)
    from flowkit.metrics import feature_space
    from flowkit.data_real import Digits

    data = Digits()
    name, features = feature_space(data)
    a, _ = data.test_set(359, seed=1)
    b, _ = data.test_set(359, seed=2)
    noise = torch.rand(359, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fd_data = frechet_distance(features(data.to_images(a)), features(data.to_images(b)))
    fd_noise = frechet_distance(features(noise), features(data.to_images(a)))
    assert name == "digits" and fd_noise > 20 * fd_data


# ------------------------------------------------------------------------------ settings

def test_every_objectives_training_defaults_are_valid_train_settings():
    for name in flowkit.OBJECTIVES.names():
        declared = dict(flowkit.OBJECTIVES.get(name).training_defaults)
        errors: list[str] = []
        _validate_settings(f"{name}.training_defaults", declared, flowkit.config.TrainConfig, errors)
        assert not errors, errors
        assert "steps" not in declared and "seed" not in declared  # the budget and the seed are the comparison's


def test_a_swapped_objective_trains_with_its_declared_settings_unless_the_recipe_says_otherwise(monkeypatch):
    from flowkit.objectives.flow_matching import CFM
    from flowkit.objectives.score_matching import ScoreMatching

    monkeypatch.setattr(CFM, "training_defaults", {"lr": 2e-3, "batch_size": 256})
    monkeypatch.setattr(ScoreMatching, "training_defaults", {"lr": 3e-3, "batch_size": 512, "ema": 0.999})
    recipe = yaml.safe_load((ROOT / "recipes/ffjord_8gaussians.yaml").read_text())  # FFJORD: lr 5e-3, batch 100
    recipe["compare"] = {"score_matching": {"train": {"batch_size": 128}, "sampler": {"name": "euler", "steps": 50}}}
    validate(recipe)
    cfm = swap_objective(recipe, "cfm")
    assert cfm["objective"] == {"name": "cfm"} and (cfm["train"]["lr"], cfm["train"]["batch_size"]) == (2e-3, 256)
    assert cfm["train"]["steps"] == recipe["train"]["steps"] and "compare" not in cfm
    score = swap_objective(recipe, "score_matching")
    assert (score["train"]["lr"], score["train"]["batch_size"], score["train"]["ema"]) == (3e-3, 128, 0.999)
    assert score["sampler"] == {"name": "euler", "steps": 50}
    ffjord = swap_objective(recipe, "ffjord")  # the recipe's own objective keeps its recipe's settings
    assert ffjord["objective"] == recipe["objective"] and ffjord["train"]["lr"] == recipe["train"]["lr"]
    bad = {**recipe, "compare": {"cfmm": {}, "cfm": {"data": {"name": "moons"}, "train": {"lr": -1}}}}
    with pytest.raises(RecipeError) as info:
        validate(bad)
    text = str(info.value)
    assert "compare.cfmm" in text and "compare.cfm.data: not a section" in text


def test_budget_parsing():
    assert parse_budget("steps=50") == Budget("steps", 50.0)
    assert parse_budget("evaluations=1000").overrides()[2] == "train.max_evaluations=1000"
    for bad in ("minutes=3", "seconds=-1", "steps=1.5", "seconds", "seconds=inf"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


# ------------------------------------------------------------------------------ end to end

def test_two_objectives_two_seeds_in_parallel_processes_write_table_csv_json_and_curves(tmp_path):
    out = tmp_path / "cmp"
    rows = compare([str(ROOT / "recipes/cfm_8gaussians.yaml")], out, objectives="cfm,score_matching",
                   overrides=TINY, budget=Budget("steps", 12), seeds=2, jobs=4, curve_points=3, samples=200,
                   log=lambda *a: None)
    assert [(r["run"], r["seed"], r["status"]) for r in rows] == [
        ("cfm", 0, "ok"), ("cfm", 1, "ok"), ("score_matching", 0, "ok"), ("score_matching", 1, "ok")]
    assert all(r["step"] == 12 and r["stopped_by"] == "steps" and r["evaluations"] == 12 for r in rows)
    assert all(len(r["curve"]) == 3 and r["curve"][-1]["step"] == 12 for r in rows)  # 4, 8, 12
    assert rows[0]["nll"] != rows[1]["nll"]  # the seed reached the run
    # separate processes that overlapped in time, each on its own core where there are two
    first, second = rows[0], rows[1]
    assert first["pid"] != second["pid"]
    assert first["started"] < second["finished"] and second["started"] < first["finished"]
    slots = flowkit.compare._core_slots(4)  # all four at once: two per core on a 2-core machine
    assert first["cores"] == slots[0] and second["cores"] == slots[1] and first["threads"] == len(slots[0])
    if len(set(slots[0] + slots[1])) == 2:
        assert set(first["cores"]).isdisjoint(second["cores"])
    for name in ("compare.md", "compare.csv", "compare_summary.csv", "compare.json", "curves_time.png",
                 "curves_evaluations.png", "samples.png"):
        assert (out / name).stat().st_size > 200, name
    table = (out / "compare.md").read_text()
    assert "| cfm | ok |" in table and " ± " in table and "## What each run used" in table
    summary = list(csv.DictReader(open(out / "compare_summary.csv")))
    assert [s["run"] for s in summary] == ["cfm", "score_matching"] and summary[0]["nll_se"]
    assert len(list(csv.DictReader(open(out / "compare.csv")))) == 4
    saved = json.loads((out / "compare.json").read_text())
    assert {t["metric"] for t in saved["tests"]} >= {"nll", "energy_distance", "mmd", "sliced_w2"}
    assert saved["runs"][0]["curve"][0]["evaluations"] == 4


def test_a_diverged_run_is_a_row_not_a_crash(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/cfm_8gaussians.yaml").read_text())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(recipe))
    recipe["train"]["lr"] = 1e12  # valid, and training diverges
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(recipe))
    rows = compare([str(good), str(broken)], tmp_path / "cmp", overrides=[*TINY, "train.grad_clip=0"],
                   budget=Budget("steps", 30), seeds=2, curve_points=0, samples=100, isolate=False,
                   log=lambda *a: None)
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert all(r["status"].startswith("diverged") for r in rows[2:]), [r["status"] for r in rows]
    table = (tmp_path / "cmp/compare.md").read_text()
    assert "| broken | seed 0: diverged" in table
