"""Image dynamics: ``concat_conv`` (FFJORD's ConcatConv CNF, multiscale pieces) and ``unet``."""

import math

import pytest
import torch

import flowkit
from flowkit.trace import divergence, sample_probe
from flowkit.dynamics.conv import ConcatConv2d, ConcatConvNet
from flowkit.dynamics.multiscale import (ScaleField, default_n_scales, extend, multiscale_fields, multiscale_views,
                                         restrict, split_channels, squeeze, unsqueeze)
from flowkit.dynamics.unet import UNet
from flowkit.likelihood import log_likelihood
from flowkit.flow import StandardNormal

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def conv_net(shape, **kw):
    kw.setdefault("hidden", [8, 8])
    return flowkit.DYNAMICS.build("concat_conv", dim=math.prod(shape), shape=shape, **kw)


def unet(shape, **kw):
    kw.setdefault("base", 8)
    kw.setdefault("groups", 4)
    return flowkit.DYNAMICS.build("unet", dim=math.prod(shape), shape=shape, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def trace_by_autograd(fn, x):
    """Reference ``tr ∂f/∂x`` per sample from the full autograd Jacobian."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)
        d = xi.numel()
        out.append(torch.diagonal(jac.reshape(d, d)).sum())
    return torch.stack(out)


# ----------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("build", [conv_net, unet], ids=["concat_conv", "unet"])
def test_shapes_scalar_and_batched_time(build, shape):
    torch.manual_seed(0)
    net = build(shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = net(torch.tensor(0.3), x)
        assert out.shape == x.shape
        assert net(torch.tensor([0.1, 0.7]), x).shape == x.shape
        flat = net(torch.tensor(0.3), x.flatten(1))  # flattened [B, D] input is accepted too
    assert flat.shape == (2, math.prod(shape))
    torch.testing.assert_close(flat, out.flatten(1))


def test_batched_time_matches_per_sample_calls():
    torch.manual_seed(0)
    for net in (conv_net((1, 8, 8)), unet((1, 8, 8))):
        x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
        with torch.no_grad():
            rows = torch.cat([net(t[i], x[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(net(t, x), rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build,kw", [(conv_net, {"num_classes": 3}), (conv_net, {"bottleneck": True}),
                                      (unet, {"num_classes": 3}), (unet, {"cond_dim": 2})],
                         ids=["concat_conv-cond", "concat_conv-bottleneck", "unet-labels", "unet-vector"])
def test_gradients_reach_every_parameter(build, kw):
    torch.manual_seed(0)
    shape = (1, 8, 8)
    net = build(shape, **kw)
    x = torch.randn(4, *shape)
    cond = None
    if kw.get("num_classes"):
        cond = torch.tensor([0, 2, -1, 1])
    elif kw.get("cond_dim"):
        cond = torch.tensor([[0.5, 1.0], [float("nan")] * 2, [0.0, -1.0], [2.0, 0.1]])
    net(torch.tensor(0.4), x, cond).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_unknown_shape_and_bad_config_are_rejected():
    with pytest.raises(ValueError, match="image shape"):
        ConcatConvNet(dim=2)
    with pytest.raises(ValueError, match="does not match"):
        ConcatConvNet(dim=10, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="groups"):
        UNet(dim=64, shape=(1, 8, 8), base=12, groups=8)
    with pytest.raises(ValueError, match="odd"):
        ConcatConvNet(dim=64, shape=(1, 8, 8), kernel=4)


# ----------------------------------------------------------------------------- fused time channel


@pytest.mark.parametrize("geometry", [dict(kernel=3, stride=1), dict(kernel=5, stride=1),
                                      dict(kernel=3, stride=2), dict(kernel=3, stride=1, padding=0)])
def test_fused_time_channel_equals_concatenation(float64, geometry):
    torch.manual_seed(0)
    layer = ConcatConv2d(3, 5, **geometry)
    x = torch.randn(4, 3, 7, 6)  # odd, non-square: every border case
    for t in (torch.tensor(0.37), torch.tensor([0.1, -0.4, 2.0, 0.0])):
        fused, naive = layer(t, x), layer.forward_concat(t, x)
        assert fused.shape == naive.shape
        torch.testing.assert_close(fused, naive, atol=1e-12, rtol=1e-12)
        # and the gradients of the time kernel agree too
        g1 = torch.autograd.grad(fused.sum(), layer.time_weight)[0]
        g2 = torch.autograd.grad(naive.sum(), layer.time_weight)[0]
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_fused_network_equals_concatenation_network(float64):
    torch.manual_seed(0)
    fused = conv_net((2, 6, 6), hidden=[8, 8, 8])
    naive = conv_net((2, 6, 6), hidden=[8, 8, 8], fused=False)
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(fused(torch.tensor(0.6), x), naive(torch.tensor(0.6), x), atol=1e-12, rtol=1e-12)


def test_channels_last_gives_the_same_field():
    torch.manual_seed(0)
    for build in (conv_net, unet):
        ref = build((1, 8, 8))
        cl = build((1, 8, 8), channels_last=True)
        cl.load_state_dict(ref.state_dict())
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(cl(torch.tensor(0.2), x), ref(torch.tensor(0.2), x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- divergence


def test_bottleneck_split_composes_to_forward():
    torch.manual_seed(0)
    net = conv_net((2, 8, 8), bottleneck=True, num_classes=3)
    x, cond = torch.randn(3, 2, 8, 8), torch.tensor([0, -1, 2])
    h, g = net.split(torch.tensor(0.5), x, cond)
    assert h.shape == (3, 8, 8, 8)
    torch.testing.assert_close(g(h), net(torch.tensor(0.5), x, cond))


@pytest.mark.parametrize("build", [conv_net, unet], ids=["concat_conv", "unet"])
def test_exact_divergence_matches_autograd_jacobian(float64, build):
    torch.manual_seed(0)
    net = build((1, 4, 4)) if build is conv_net else build((1, 4, 4), mults=[1, 2])
    x, t = torch.randn(2, 1, 4, 4), torch.tensor(0.3)
    out = divergence(lambda t_, x_: net(t_, x_), t, x, estimator="exact")
    torch.testing.assert_close(out.div, trace_by_autograd(lambda v: net(t, v), x))
    torch.testing.assert_close(out.dx, net(t, x))


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bottleneck", "plain"])
def test_hutchinson_is_unbiased(float64, bottleneck):
    """Mean of many single-probe estimates (one per copy of the same image) ≈ the exact trace."""
    torch.manual_seed(0)
    net = conv_net((1, 4, 4), hidden=[2, 8], bottleneck=bottleneck)
    t = torch.tensor(0.7)
    x0 = torch.randn(1, 1, 4, 4)
    exact = divergence(lambda t_, x_: net(t_, x_), t, x0, estimator="exact").div[0]
    copies = x0.expand(4000, 1, 4, 4).clone()
    split = (lambda t_, x_: net.split(t_, x_)) if bottleneck else None
    template = net.split(t, copies)[0] if bottleneck else copies
    probe = sample_probe(template.detach(), "rademacher", generator=torch.Generator().manual_seed(1))
    est = divergence(lambda t_, x_: net(t_, x_), t, copies, estimator="hutchinson", probe=probe,
                     split=split).div.detach()
    sem = est.std() / math.sqrt(est.numel())
    assert abs(est.mean() - exact) < 4 * sem + 1e-9, (est.mean().item(), exact.item(), sem.item())


def test_bottleneck_through_likelihood_and_time_scaling():
    """``AugmentedDynamics`` draws the probe in the bottleneck and gets the exact answer in mean."""
    from flowkit.objectives.ffjord import TimeScaledField

    torch.manual_seed(0)
    field = TimeScaledField(conv_net((1, 4, 4), hidden=[2, 8], bottleneck=True), 0.5, learn=False)
    assert field.divergence_paths == {"jvp", "bottleneck"}  # the wrapper carries the network's declaration
    x = torch.randn(1, 1, 4, 4).expand(256, 1, 4, 4).clone()
    opts = dict(method="rk4", steps=2, times=(0.0, 1.0))
    exact = log_likelihood(field, x[:1], StandardNormal((1, 4, 4)), **opts)
    est = log_likelihood(field, x, StandardNormal((1, 4, 4)), estimator="hutchinson",
                         generator=torch.Generator().manual_seed(0), **opts)
    sem = est.delta.std() / math.sqrt(est.delta.numel())
    assert abs(est.delta.mean() - exact.delta[0]) < 4 * sem + 1e-5


def test_forward_mode_jvp_matches_autograd(float64):
    torch.manual_seed(0)
    net = conv_net((2, 5, 6), num_classes=3)
    x, v, cond, t = torch.randn(3, 2, 5, 6), torch.randn(3, 2, 5, 6), torch.tensor([0, -1, 2]), torch.tensor(0.4)
    f, jv = net.forward_with_jvp(t, x, v, cond)
    f_ref, jv_ref = torch.func.jvp(lambda x_: net(t, x_, cond), (x,), (v,))
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(jv, jv_ref)
    # embedded in a multiscale stage, and flattened
    view = multiscale_views((1, 4, 4), n_scales=2)[2]
    field = ScaleField(conv_net(view.shape), view)
    x, v = torch.randn(2, 16), torch.randn(2, 16)
    f, jv = field.forward_with_jvp(t, x, v)
    f_ref, jv_ref = torch.func.jvp(lambda x_: field(t, x_), (x,), (v,))
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(jv, jv_ref)
    # gelu has no closed-form derivative: no jvp declared, and the method refuses rather than guess
    gelu = conv_net((1, 4, 4), activation="gelu")
    assert gelu.divergence_paths == frozenset()
    with pytest.raises(ValueError, match="gelu"):
        gelu.forward_with_jvp(t, x[:, :16].reshape(2, 1, 4, 4), v.reshape(2, 1, 4, 4))


# ----------------------------------------------------------------------------- multiscale


def test_squeeze_is_a_volume_preserving_permutation(float64):
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(unsqueeze(squeeze(x)), x, rtol=0, atol=0)
    y = torch.randn(2, 12, 2, 3)
    torch.testing.assert_close(squeeze(unsqueeze(y)), y, rtol=0, atol=0)
    torch.testing.assert_close(unsqueeze(squeeze(torch.randn(1, 1, 8, 8), 2), 2).shape, torch.Size([1, 1, 8, 8]))
    jac = torch.autograd.functional.jacobian(lambda v: squeeze(v[None])[0].flatten(), x[0]).reshape(72, 72)
    assert torch.equal(jac.abs().sum(0), torch.ones(72)) and torch.equal(jac.abs().sum(1), torch.ones(72))
    sign, logdet = torch.linalg.slogdet(jac)
    assert sign.abs() == 1 and logdet.abs() < 1e-12
    with pytest.raises(ValueError, match="even"):
        squeeze(torch.randn(1, 1, 7, 7))


def test_views_match_explicit_squeeze_and_factor_out():
    """``restrict(x, view)`` is the tensor FFJORD's ODENVP hands to each stage."""
    x = torch.randn(2, 1, 28, 28)
    views = multiscale_views((1, 28, 28))
    assert [v.shape for v in views] == [(1, 28, 28), (4, 14, 14), (2, 14, 14), (8, 7, 7), (4, 7, 7)]
    assert default_n_scales((1, 28, 28)) == 3 and default_n_scales((3, 32, 32)) == 4
    explicit, factored, y = [], [], x
    for scale in range(3):
        explicit.append(y)
        if scale < 2:
            y = squeeze(y)
            explicit.append(y)
            out, y = split_channels(y)
            factored.append(out)
    for view, y_ref in zip(views, explicit):
        assert torch.equal(restrict(x, view), y_ref)
        assert view.image_shape == (1, 28, 28)
        assert torch.equal(extend(restrict(x, view), view, frozen=x), x)
    # the frozen coordinates plus the last stage are a permutation of the image
    parts = torch.cat([f.flatten(1) for f in factored] + [explicit[-1].flatten(1)], 1)
    assert torch.equal(parts.sort(1).values, x.flatten(1).sort(1).values)


def test_multiscale_stack_equals_explicit_pipeline():
    """Stacked :class:`ScaleField` blocks on the full image give FFJORD's explicit multiscale
    pipeline (solve, squeeze, solve, factor out, ...): same latent, same Δ log p."""
    torch.manual_seed(0)
    shape = (1, 4, 4)
    fields = multiscale_fields(lambda shape: conv_net(shape), shape, blocks=1, n_scales=2)
    x = torch.randn(3, *shape)
    opts = dict(method="rk4", steps=2, times=(0.0, 1.0))
    stacked = log_likelihood(None, x, StandardNormal(shape), blocks=fields, **opts)
    delta, y, outs = torch.zeros(3), x, []
    for f in fields:
        if f.view.start > 0 and y.shape[1:] != f.view.shape:
            out, y = split_channels(y)
            outs.append(out)
        if y.shape[1:] != f.view.shape:
            y = squeeze(y)
        res = log_likelihood(f.field, y, StandardNormal(f.view.shape), **opts)
        y, delta = res.z, delta + res.delta
    torch.testing.assert_close(stacked.delta, delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restrict(stacked.z, fields[-1].view), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(squeeze(stacked.z)[:, :2], outs[0], atol=1e-5, rtol=1e-5)


def test_scale_field_divergence_and_bottleneck(float64):
    torch.manual_seed(0)
    view = multiscale_views((1, 4, 4), n_scales=2)[2]  # (2, 2, 2) inside (1, 4, 4)
    field = ScaleField(conv_net(view.shape, bottleneck=True), view)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor(0.2)
    full = divergence(lambda t_, x_: field(t_, x_), t, x, estimator="exact")
    inner = divergence(lambda t_, y: field.field(t_, y), t, restrict(x, view), estimator="exact")
    torch.testing.assert_close(full.div, inner.div)
    assert torch.equal(squeeze(full.dx)[:, :2], torch.zeros(2, 2, 2, 2))  # frozen coordinates
    h, g = field.split(t, x)
    torch.testing.assert_close(g(h), field(t, x))
    torch.testing.assert_close(field(t, x.flatten(1)), field(t, x).flatten(1))


# ----------------------------------------------------------------------------- conditioning


def test_unet_class_conditioning_and_null_label():
    torch.manual_seed(0)
    net = unet((1, 8, 8), num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor(0.5)
    with torch.no_grad():
        labels = torch.tensor([0, 3, 9, -1])
        out = net(t, x, labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the null label (-1) is the unconditional model: same as passing no condition
        torch.testing.assert_close(net(t, x, torch.full((4,), -1)), net(t, x))
        assert not torch.allclose(net(t, x, torch.zeros(4, dtype=torch.long)),
                                  net(t, x, torch.ones(4, dtype=torch.long)))
        guided = flowkit.guided(net, 2.0)(t, x, labels)
        torch.testing.assert_close(guided, 3 * out - 2 * net(t, x))


def test_parameter_counts_for_mnist(capsys):
    """FFJORD's MNIST field is 3 ConcatConv layers of 64 filters; its multiscale model 0.8 M."""
    def factory(shape):
        return ConcatConvNet(dim=math.prod(shape), shape=shape)

    single = n_params(factory((1, 28, 28)))
    multiscale = n_params(torch.nn.ModuleList(multiscale_fields(factory, (1, 28, 28), blocks=2)))
    unet_mnist = n_params(UNet(dim=784, shape=(1, 28, 28)))
    with capsys.disabled():
        print(f"\nconcat_conv (1,28,28) hidden [64,64,64]: {single:,} parameters; "
              f"multiscale (3 scales, 2 blocks/stage): {multiscale:,}; unet base 32 [1,2,2]: {unet_mnist:,}")
    assert single == 76_810
    assert multiscale == 800_636  # FFJORD's official MNIST model: 0.8 M
    assert 0.5e6 < unet_mnist < 2e6
