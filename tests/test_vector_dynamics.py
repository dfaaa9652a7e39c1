"""Vector fields: the Fourier-time MLP and the CPU allocator tuning used by the trainer."""

import os

import pytest
import torch

import flowkit
from flowkit.allocator import tune_cpu_allocator
from flowkit.dynamics.fourier import FourierMLP


def test_fourier_mlp_scalar_time_is_the_same_function_as_per_sample_time():
    torch.manual_seed(0)
    net = FourierMLP(3, channels=32, layers=2).double()
    x = torch.randn(17, 3, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64)
    fast = net(t, x)  # embedding computed once and folded into the input layer's bias
    general = net(t.expand(17), x)  # embedding per sample
    assert torch.allclose(fast, general, atol=1e-12, rtol=0)
    times = torch.rand(17, dtype=torch.float64)
    rows = torch.cat([net(times[i], x[i:i + 1]) for i in range(17)])
    assert torch.allclose(net(times, x), rows, atol=1e-12, rtol=0)


def test_fourier_mlp_gradients_agree_between_time_paths():
    torch.manual_seed(1)
    net = FourierMLP(2, channels=16, layers=1).double()
    x = torch.randn(9, 2, dtype=torch.float64)
    grads = []
    for t in (torch.tensor(0.1, dtype=torch.float64), torch.full((9,), 0.1, dtype=torch.float64)):
        net.zero_grad()
        net(t, x).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=0)


def test_fourier_mlp_has_the_official_diffflow_size_and_is_registered():
    net = flowkit.DYNAMICS.get("fourier_mlp")(dim=2, channels=128, layers=3)
    # phase 128 + time MLP (256·128+128 + 128·128+128) + input 2·128+128 + 3·(128·128+128) + 128·2+2
    assert sum(p.numel() for p in net.parameters()) == 99_714
    with pytest.raises(ValueError, match="one entry per sample"):
        net(torch.zeros(3), torch.randn(5, 2))


def test_fourier_mlp_conditioning_and_null_condition():
    torch.manual_seed(2)
    net = FourierMLP(2, channels=16, layers=1, num_classes=3)
    x = torch.randn(6, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = net(0.5, x, labels)
    assert out.shape == x.shape and not torch.allclose(out, net(0.5, x, (labels + 1) % 3))
    assert torch.allclose(net(0.5, x), net(0.5, x, torch.full((6,), -1)))  # None = the null label


def test_allocator_tuning_defers_to_the_user(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    from flowkit import allocator
    monkeypatch.setattr(allocator, "_applied", {})
    assert tune_cpu_allocator() is False  # the user's malloc settings win


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or os.environ.get("MALLOC_TRIM_THRESHOLD_") is not None,
                    reason="glibc/Linux only")
def test_allocator_tuning_applies_on_glibc_and_is_idempotent(monkeypatch):
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    from flowkit import allocator
    monkeypatch.setattr(allocator, "_applied", {})
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True
    x = torch.randn(1000, 128)  # still allocates and frees normally
    assert float((x @ x.T).diagonal().sum()) > 0
