"""Flow matching: closed-form checks on Gaussian mixtures, couplings in training, guidance, reflow.

For a Gaussian-mixture target every marginal of a Gaussian path is a mixture
(:mod:`flowkit.gmm`), so the marginal velocity the CFM loss regresses on is known exactly:
``v* = velocity_from_score(∇ log p_t)``. The closed-form tests use it in place of a
network; the training tests run the shipped recipes for a few hundred steps.
"""

import json
import math

import pytest
import torch
from torch import nn

import flowkit
import flowkit.teacher
from flowkit.couplings import Sinkhorn, Teacher
from flowkit.evaluate import sample_metrics
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.objectives.flow_matching import CFM, SBCFM, RectifiedFlow, sample_times
from flowkit.paths import CondOT, Cosine, Polynomial, VP


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]], dtype=torch.float64)
    covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.15, 0.0], [0.0, 0.40]],
                         [[0.25, -0.05], [-0.05, 0.10]]], dtype=torch.float64)
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


class MarginalVelocity(nn.Module):
    """The exact minimiser of the CFM loss for a mixture target: ``v*(t, x)``."""

    def __init__(self, gmm: GaussianMixture, path) -> None:
        super().__init__()
        self.path, self.score = path, mixture_score_field(gmm, path)

    def forward(self, t, x, cond=None):
        return self.path.velocity_from_score(self.score(t, x), t, x)


def _exact_cfm(path) -> CFM:
    gmm = _mixture()
    return CFM(lambda: MarginalVelocity(gmm, path), (2,), path=path)


PATHS = [CondOT(), CondOT(sigma_min=0.05), Cosine(), Polynomial(exponent=2.0), VP()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: repr(p))
def test_conditional_target_is_unbiased_for_the_marginal_velocity(path, float64):
    # v* = E[target | x_t]  ⇔  E[h(t, x_t) · (v*(t, x_t) − target)] = 0 for every h; take h = v*.
    obj = _exact_cfm(path)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = _mixture().sample(n, generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(1)  # not 0: the same seed would correlate t with the generator's draws
    t = sample_times(n, x, path.t0, path.t1)
    x_t, target = obj.conditional(x, noise, t)
    v = obj.net(t, x_t)
    for sign, unbiased in ((1.0, True), (-1.0, False)):  # −target: the flow-matching-time sign
        cross = (v * (v - sign * target)).sum(1)
        z = cross.mean() / (cross.std() / math.sqrt(n))
        assert (abs(float(z)) < 4.0) == unbiased, f"z = {float(z):.2f}"


def test_likelihood_of_the_exact_marginal_flow_matches_the_mixture(float64):
    # cond_ot with σ_min = 0: α_1 = 0, so the prior N(0, I) is the exact marginal at t1 = 1.
    gmm = _mixture()
    flow = _exact_cfm(CondOT()).flow()
    x = gmm.sample(48, generator=torch.Generator().manual_seed(1))
    out = flowkit.flow_log_likelihood(flow, x, estimator="exact", rtol=1e-8, atol=1e-8, per_sample_norm=True)
    assert float((out.log_prob - gmm.log_prob(x)).abs().max()) < 1e-3


def test_score_and_denoiser_from_the_velocity_are_the_closed_form_ones(float64):
    gmm, path = _mixture(), CondOT()
    flow = _exact_cfm(path).flow()
    score = mixture_score_field(gmm, path)
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    for t in (0.05, 0.3, 0.7, 0.95):  # away from σ_0 = 0, where the score is singular
        tt = torch.tensor(t)
        assert torch.allclose(flow.score(tt, x), score(tt, x), rtol=1e-7, atol=1e-9)
        assert torch.allclose(flow.denoise(tt, x), path.x0_from_score(score(tt, x), tt, x), rtol=1e-7, atol=1e-9)


def test_reverse_sde_sampler_runs_on_a_flow_matching_model(float64):
    # The SDE drift/diffusion/score all come through the path; t1 < 1 keeps f, g finite.
    path = CondOT(t1=0.995)
    flow = _exact_cfm(path).flow()
    sampler = flowkit.SAMPLERS.get("euler_maruyama")
    z = flow.prior.sample(3000, generator=torch.Generator().manual_seed(3))
    samples = sampler(flow, z, steps=400, seed=0).x
    data = _mixture().sample(3000, generator=torch.Generator().manual_seed(4))
    assert sample_metrics(samples, data)["energy_distance"] < 0.01


def test_time_samplers():
    like = torch.zeros(())
    torch.manual_seed(0)
    uniform = sample_times(50000, like, 0.1, 0.9)
    assert 0.1 <= float(uniform.min()) and float(uniform.max()) <= 0.9
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    logit = sample_times(50000, like, 0.0, 1.0, "logit_normal", logit_mean=1.0, logit_std=0.5)
    assert float(torch.logit(logit).mean()) == pytest.approx(1.0, abs=0.02)
    assert float(torch.logit(logit).std()) == pytest.approx(0.5, abs=0.02)


def test_objective_contract():
    obj = CFM(lambda: flowkit.DYNAMICS.build("mlp", dim=2, hidden=[16], num_classes=3), (2,), cond_dropout=0.3)
    x, labels = torch.randn(32, 2), torch.randint(0, 3, (32,))
    out = obj.loss(x, labels)
    out.loss.backward()
    assert out.loss.dim() == 0 and all(p.grad is not None for p in obj.parameters())
    flow = obj.flow()
    assert (flow.t0, flow.t1) == (0.0, 1.0) and flow.prior.shape == (2,)
    t = torch.tensor(0.5)
    for field in (flow.velocity, flow.score, flow.denoise, flow.drift):
        assert field(t, x, labels).shape == x.shape
    with pytest.raises(ValueError, match="cond_dropout"):
        CFM(lambda: nn.Identity(), (2,), cond_dropout=1.0)
    with pytest.raises(TypeError, match="GaussianPath"):
        CFM(lambda: nn.Identity(), (2,), path=Sinkhorn())


def test_sbcfm_bridge_and_flow():
    obj = SBCFM(lambda: flowkit.DYNAMICS.build("mlp", dim=2, hidden=[16]), (2,), sigma=0.3)
    assert isinstance(obj.coupling, Sinkhorn) and obj.coupling.reg == pytest.approx(2 * 0.3**2)
    x, noise = torch.randn(4000, 2), torch.randn(4000, 2)
    t = torch.full((4000,), 0.25)
    torch.manual_seed(0)
    x_t, target = obj.conditional(x, noise, t)
    bridge = x_t - (0.75 * x + 0.25 * noise)  # σ sqrt(t(1−t)) z
    assert float(bridge.std()) == pytest.approx(0.3 * math.sqrt(0.25 * 0.75), rel=0.05)
    # target = ε − x + (1 − 2t)/(2 t (1 − t)) (x_t − μ_t)  (Tong et al. 2024, eq. 16 in flowkit time)
    assert torch.allclose(target, noise - x + (0.5 / (2 * 0.1875)) * bridge, atol=1e-5)
    assert torch.isfinite(obj.loss(x[:64]).loss)
    flow = obj.flow()
    assert flow.score is None and flow.velocity is obj.net
    with pytest.raises(ValueError, match="score"):
        flowkit.SAMPLERS.get("euler_maruyama")(flow, torch.randn(4, 2), steps=2)


# ------------------------------------------------------------------------- training
SHORT = ["train.log_every=10", "train.checkpoint_every=0", "train.sample_every=0", "train.threads=1"]


def _train(name: str, out, *overrides: str):
    recipe = flowkit.load_recipe(f"recipes/{name}.yaml", [*SHORT, *overrides])
    flowkit.train(recipe, out, progress=False)
    built, _ = flowkit.load_run(out)
    return built


@pytest.fixture(scope="module")
def icfm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("icfm")
    return out, _train("cfm_8gaussians", out, "train.steps=400")


def _straightness(flow, n: int = 1000) -> float:
    """Mean squared deviation of the trajectories from the chords between their end points."""
    z = flow.prior.sample(n, generator=torch.Generator().manual_seed(5))
    path = flowkit.SAMPLERS.get("rk4")(flow, z, steps=20, n_times=21).trajectory  # t = 1 → 0
    s = torch.linspace(1.0, 0.0, 21)[:, None, None]
    chord = s * path[0] + (1 - s) * path[-1]
    return float((path - chord).square().sum(-1).mean())


def test_training_lowers_the_loss_and_improves_samples(icfm_run):
    out, built = icfm_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first
    data, _ = built.dataset.test_set(2000, seed=7)
    fresh = flowkit.build(built.recipe).objective  # same architecture, untrained
    before = flowkit.generate(fresh.flow(), built.sampler, 2000, seed=1).x
    after = flowkit.generate(built.objective.flow(), built.sampler, 2000, seed=1).x
    ed_before, ed_after = (sample_metrics(s, data)["energy_distance"] for s in (before, after))
    assert ed_after < 0.05 and ed_after < 0.2 * ed_before


def test_exact_ot_coupling_straightens_the_flow(icfm_run, tmp_path):
    _, icfm = icfm_run
    ot = _train("otcfm_8gaussians", tmp_path / "ot", "train.steps=200", "train.batch_size=64")
    s_ind, s_ot = _straightness(icfm.objective.flow()), _straightness(ot.objective.flow())
    assert s_ot < 0.25 * s_ind, (s_ot, s_ind)  # measured: 0.003 vs 0.10


def test_guidance_moves_samples_to_the_conditioned_component(tmp_path):
    built = _train("cfm_8gaussians_guided", tmp_path / "guided", "train.steps=500")
    flow, means = built.objective.flow(), built.dataset.means
    label = 3
    cond = torch.full((1000,), label, dtype=torch.long)

    rk4 = flowkit.SAMPLERS.get("rk4")

    def sample(w: float) -> torch.Tensor:
        def sampler(f, x, cond=None):
            return rk4(f, x, cond=cond, steps=20, guidance=w)

        return flowkit.generate(flow, sampler, 1000, cond=cond, seed=2).x

    plain, guided = sample(0.0), sample(2.0)
    share = [float((torch.cdist(x, means).argmin(1) == label).float().mean()) for x in (plain, guided)]
    spread = [float((x - means[label]).norm(dim=1).mean()) for x in (plain, guided)]
    assert share[0] > 0.8 and share[1] >= share[0], share  # conditioning works; w keeps the mode
    assert spread[1] < 0.8 * spread[0], spread  # and w > 0 pulls samples towards it


def test_rectified_flow_trains_on_teacher_pairs(icfm_run):
    run, teacher_built = icfm_run
    student = RectifiedFlow(lambda: flowkit.DYNAMICS.build("mlp", dim=2, hidden=[16]), (2,), teacher=str(run),
                            method="rk4", steps=8)
    flowkit.teacher.attach_teacher(student)  # what flowkit.train does for an objective that needs_teacher
    assert isinstance(student.coupling, Teacher)
    assert not any("teacher" in k for k in student.state_dict())  # the teacher is not part of the model
    noise = torch.randn(64, 2)
    x1, z = student.coupling(torch.zeros(64, 2), noise)
    expected = flowkit.SAMPLERS.get("rk4")(teacher_built.objective.flow(), noise, steps=8).x
    assert z is noise and torch.allclose(x1, expected, atol=1e-5)
    assert torch.isfinite(student.loss(torch.zeros(64, 2)).loss)
    missing = RectifiedFlow(lambda: nn.Identity(), (2,), teacher="no/such/run")
    flowkit.teacher.attach_teacher(missing)
    with pytest.raises(FileNotFoundError, match="teacher"):
        missing.loss(torch.zeros(2, 2))
