"""Ramp loss (P28): the reference against hand-computed values and a loop, the kernels' behaviour."""

import numpy as np
import pytest
import torch

from twinops.accelerated.classification.ramp_loss import RampLoss, ramp_loss
from twinops.reference.classification.ramp_loss import ramp_loss as ref_ramp
from twinops.reference.classification.ramp_loss import ramp_loss_grad as ref_ramp_grad

SCORES = np.array([2.0, 0.5, -0.3, 0.0, 1.0, 0.25])
TARGET = np.array([1, 1, 1, -1, 0, -1])


def test_reference_hand_computed():
    # kappa y f = [2, 0.5, -0.3, 0, -1, -0.25] -> loss [0, 0.5, 1, 1, 1, 1]
    np.testing.assert_allclose(ref_ramp(SCORES, TARGET, reduction="none"), [0, 0.5, 1, 1, 1, 1])
    # kappa = 2: [4, 1, -0.6, 0, -2, -0.5] -> [0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(ref_ramp(SCORES, TARGET, kappa=2.0, reduction="none"), [0, 0, 1, 1, 1, 1])
    assert ref_ramp(SCORES, TARGET) == pytest.approx(4.5 / 6)
    assert ref_ramp(SCORES, TARGET, reduction="sum") == pytest.approx(4.5)


def test_reference_label_conventions_agree():
    pm = np.array([1, -1, 1, -1, -1, 1])
    np.testing.assert_array_equal(ref_ramp(SCORES, pm, reduction="none"),
                                  ref_ramp(SCORES, np.where(pm == 1, 1, 0), reduction="none"))


def test_reference_gradient_against_a_loop():
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=50), rng.choice([-1, 1], size=50)
    g = rng.normal(size=50)
    kappa = 1.7
    want = []
    for fi, yi, gi in zip(f, y, g):
        m = kappa * yi * fi
        want.append(-kappa * yi * gi if 0 < m < 1 else 0.0)
    np.testing.assert_allclose(ref_ramp_grad(g, f, y, kappa=kappa, reduction="none"), want)
    np.testing.assert_allclose(ref_ramp_grad(np.float64(2.0), f, y, kappa=kappa),
                               ref_ramp_grad(np.full(50, 2.0 / 50), f, y, kappa=kappa, reduction="none"))


def test_reference_corners_have_zero_gradient_and_bad_labels_raise():
    g = ref_ramp_grad(np.ones(3), np.array([0.0, 1.0, 0.5]), np.array([1, 1, 1]), reduction="none")
    np.testing.assert_array_equal(g, [0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="target"):
        ref_ramp(np.zeros(2), np.array([1, 2]))
    with pytest.raises(ValueError, match="kappa"):
        ref_ramp(np.zeros(2), np.array([1, -1]), kappa=0.0)


def test_empty_batch():
    assert np.isnan(ref_ramp(np.zeros(0), np.zeros(0, np.int64)))
    out = ramp_loss(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert torch.isnan(out)
    assert ramp_loss(torch.zeros(0), torch.zeros(0, dtype=torch.int64), reduction="sum").item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kernel_matches_reference_with_upstream_gradient(reduction):
    rng = np.random.default_rng(1)
    f = torch.tensor(rng.uniform(-1.5, 1.5, 37), dtype=torch.float32)  # crosses 16-wide tiles
    t = torch.tensor(rng.choice([-1, 0, 1], size=37))
    x = f.clone().requires_grad_(True)
    out = ramp_loss(x, t, kappa=1.5, reduction=reduction)
    g = torch.rand_like(out) + 0.5
    (gx,) = torch.autograd.grad(out, x, g)
    np.testing.assert_allclose(out.detach().numpy(), ref_ramp(f.double().numpy(), t.numpy(), kappa=1.5,
                                                                reduction=reduction), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx.numpy(), ref_ramp_grad(g.double().numpy(), f.double().numpy(), t.numpy(),
                                                         kappa=1.5, reduction=reduction), rtol=1e-6, atol=1e-7)


def test_module_view_and_inputs_untouched():
    f = torch.linspace(-2, 2, 41)
    t = torch.tensor([1, -1] * 20 + [1])
    strided = torch.zeros(82)
    strided[::2] = f
    view = strided[::2]
    f0, t0 = f.clone(), t.clone()
    want = ramp_loss(f, t, kappa=2.0, reduction="none")
    torch.testing.assert_close(RampLoss(kappa=2.0, reduction="none")(view, t), want)
    assert torch.equal(f, f0) and torch.equal(t, t0)


def test_compile_forward_and_backward():
    f = torch.linspace(-2, 2, 20).requires_grad_(True)
    t = torch.tensor([1, -1] * 10)
    fn = torch.compile(lambda f, t: ramp_loss(f, t, kappa=1.5), fullgraph=True, backend="aot_eager")
    out = fn(f, t)
    (g,) = torch.autograd.grad(out, f)
    f2 = f.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(ramp_loss(f2, t, kappa=1.5), f2)
    torch.testing.assert_close(out, ramp_loss(f2.detach(), t, kappa=1.5))
    torch.testing.assert_close(g, g2)


def test_no_graph_without_grad_and_invalid_label_is_nan():
    out = ramp_loss(torch.zeros(4), torch.tensor([1, -1, 1, 0]))
    assert out.grad_fn is None
    rows = ramp_loss(torch.zeros(3), torch.tensor([1, 5, -1]), reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_clear_errors():
    with pytest.raises(TypeError, match="target"):
        ramp_loss(torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="scores"):
        ramp_loss(torch.zeros(2, 1), torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="kappa"):
        ramp_loss(torch.zeros(2), torch.tensor([1, -1]), kappa=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        ramp_loss(torch.zeros(2), torch.tensor([1, -1]), reduction="avg")


@pytest.mark.gpu
def test_gpu_bf16_benchmark_shape_and_inductor_compile():
    """1M bf16 scores against float64 on the same values; inductor-compiled forward and backward."""
    torch.manual_seed(0)
    f = torch.randn(1 << 20, device="cuda").bfloat16().requires_grad_(True)
    t = torch.randint(0, 2, (1 << 20,), device="cuda") * 2 - 1
    for reduction in ("mean", "none"):
        out = ramp_loss(f, t, kappa=1.5, reduction=reduction)
        want = ref_ramp(f.detach().double().cpu().numpy(), t.cpu().numpy(), kappa=1.5, reduction=reduction)
        np.testing.assert_allclose(out.detach().double().cpu().numpy(), want, rtol=1.6e-2, atol=1e-3)
    compiled = torch.compile(lambda f, t: ramp_loss(f, t, kappa=1.5), fullgraph=True)
    (g,) = torch.autograd.grad(compiled(f, t), f)
    (g_eager,) = torch.autograd.grad(ramp_loss(f, t, kappa=1.5), f)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """A 1-D view with a stride of 1024 elements over 2.2M scores: offsets reach ~2.3e9 elements,
    and the view must give what its contiguous copy gives."""
    n, stride = 2_200_000, 1024
    try:
        buf = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4.5 GB buffer")
    buf[:, 0] = torch.randn(n, device="cuda").to(torch.bfloat16)
    view = buf[:, 0]
    assert (n - 1) * view.stride(0) > 2**31
    y = torch.randint(0, 2, (n,), device="cuda") * 2 - 1
    results = []
    for s in (view, view.contiguous()):
        s = s.detach().requires_grad_(True)
        loss = ramp_loss(s, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, s)
        results.append((loss, g))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
