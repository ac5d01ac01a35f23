"""attentive_stats_pool (P61): the reference against a loop and the authors' torch formula, its
defined edge cases, and the accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.attentive_stats_pool")
from twinops.accelerated.layers.attentive_stats_pool import AttentiveStatsPool
from twinops.accelerated.layers.attentive_stats_pool import attentive_stats_pool as acc
from twinops.reference.layers.attentive_stats_pool import attentive_stats_pool as ref
from twinops.reference.layers.attentive_stats_pool import attentive_stats_pool_grad as ref_grad


def _data(b=2, c=3, t=5, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, c, t)) + offset, rng.normal(size=(b, c, t))


def _authors(x, e, eps=1e-9):
    """The authors' layer body (sugar's attentive statistics pooling) on given logits."""
    alpha = torch.softmax(e, dim=2)
    mean = torch.sum(alpha * x, dim=2)
    residuals = torch.sum(x**2 * alpha, dim=2) - mean**2
    return torch.cat([mean, torch.sqrt(residuals.clamp(min=eps))], dim=1)


def test_reference_matches_a_loop():
    x, e = _data()
    want = np.zeros((2, 6))
    for b in range(2):
        for c in range(3):
            w = [np.exp(v) for v in e[b, c]]
            a = [v / sum(w) for v in w]
            mu = sum(ai * xi for ai, xi in zip(a, x[b, c]))
            var = sum(ai * xi * xi for ai, xi in zip(a, x[b, c])) - mu * mu
            want[b, c], want[b, 3 + c] = mu, np.sqrt(max(var, 1e-9))
    np.testing.assert_allclose(ref(x, e), want, rtol=1e-12)


def test_reference_and_gradient_match_the_authors_formula():
    x, e = _data(seed=1, offset=2.0)
    tx, te = torch.tensor(x, requires_grad=True), torch.tensor(e, requires_grad=True)
    out = _authors(tx, te)
    np.testing.assert_allclose(ref(x, e), out.detach().numpy(), rtol=1e-11)
    g = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(2, 6)
    dx, de = torch.autograd.grad(out, [tx, te], g)
    got = ref_grad(g.numpy(), x, e)
    np.testing.assert_allclose(got["x"], dx.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["logits"], de.numpy(), rtol=1e-9, atol=1e-12)


def test_reference_uniform_logits_give_mean_and_population_std():
    x, _ = _data()
    out = ref(x, np.zeros_like(x))
    np.testing.assert_allclose(out[:, :3], x.mean(axis=2), rtol=1e-13)
    np.testing.assert_allclose(out[:, 3:], x.std(axis=2), rtol=1e-12)


def test_reference_minus_inf_logits_drop_frames():
    x, e = _data(t=7)
    masked = e.copy()
    masked[:, :, 4:] = -np.inf
    np.testing.assert_allclose(ref(x, masked), ref(x[:, :, :4], e[:, :, :4]), rtol=1e-13)
    g = np.ones((2, 6))
    assert not ref_grad(g, x, masked)["x"][:, :, 4:].any()
    assert not ref_grad(g, x, masked)["logits"][:, :, 4:].any()


def test_reference_floor_and_t1():
    x, e = _data(t=1)
    out = ref(x, e)
    np.testing.assert_array_equal(out[:, :3], x[:, :, 0])
    np.testing.assert_allclose(out[:, 3:], np.sqrt(1e-9))
    grads = ref_grad(np.ones((2, 6)), x, e)
    np.testing.assert_array_equal(grads["x"], np.ones_like(x))  # d mean / d x = 1, deviation floored
    assert not grads["logits"].any()


def test_reference_nan_rules():
    x, e = _data()
    e2 = e.copy()
    e2[0, 1, :] = -np.inf
    assert np.isnan(ref(x, e2)[0, [1, 4]]).all() and np.isfinite(ref(x, e2)[1]).all()
    x2 = x.copy()
    x2[1, 2, 3] = np.nan
    out = ref(x2, e)
    assert np.isnan(out[1, [2, 5]]).all() and np.isfinite(out[0]).all()


def test_reference_errors_name_the_argument():
    x, e = _data()
    with pytest.raises(ValueError, match="logits"):
        ref(x, e[:, :, :4])
    with pytest.raises(ValueError, match="x"):
        ref(x[:, :, :0], e[:, :, :0])
    with pytest.raises(ValueError, match="eps"):
        ref(x, e, eps=0.0)


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(b=2, c=19, t=37, seed=0, offset=3.0):
    x, e = _data(b, c, t, seed, offset)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(4.0 * e, dtype=torch.float32)


def test_accelerated_matches_authors_formula_in_float64():
    x, e = _tensors()
    x.requires_grad_(True)
    e.requires_grad_(True)
    got = acc(x, e)
    xd, ed = x.detach().double().requires_grad_(True), e.detach().double().requires_grad_(True)
    want = _authors(xd, ed)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.rand_like(got)
    for a, b in zip(torch.autograd.grad(got, [x, e], g), torch.autograd.grad(want, [xd, ed], g.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_peaked_attention_with_a_large_mean_keeps_fp32_accuracy():
    """Mean 1000 against a spread of 1e-2 and logits that put ~all weight on a few frames: the shifted
    moments keep both the deviation and the gradient through (x - mu) / sigma accurate."""
    rng = np.random.default_rng(4)
    x = 1000.0 + 1e-2 * rng.normal(size=(2, 5, 40))
    e = 8.0 * rng.normal(size=(2, 5, 40))
    xt, et = torch.tensor(x, dtype=torch.float32, requires_grad=True), torch.tensor(e, dtype=torch.float32)
    xr = xt.detach().double().numpy()
    out = acc(xt, et)
    want = ref(xr, et.double().numpy())
    np.testing.assert_allclose(out[:, 5:].detach().double().numpy(), want[:, 5:], rtol=1e-3)
    g = torch.linspace(-1, 1, 20).reshape(2, 10)
    (dx,) = torch.autograd.grad(out, xt, g)
    wg = ref_grad(g.double().numpy(), xr, et.double().numpy())["x"]
    np.testing.assert_allclose(dx.double().numpy(), wg, rtol=1e-3, atol=1e-3 * np.abs(wg).max())


def test_module_computes_logits_with_two_convolutions():
    torch.manual_seed(0)
    pool = AttentiveStatsPool(19, bottleneck=8)
    x, _ = _tensors()
    logits = pool.conv2(torch.tanh(pool.conv1(x)))
    torch.testing.assert_close(pool(x), acc(x, logits))
    out = pool(x)
    out.sum().backward()
    assert pool.conv1.weight.grad is not None and pool.conv2.weight.grad is not None
    assert out.shape == (2, 38)


def test_inputs_and_incoming_gradient_are_not_written():
    x, e = _tensors()
    x.requires_grad_(True)
    e.requires_grad_(True)
    x0, e0 = x.detach().clone(), e.detach().clone()
    out = acc(x, e)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(x.detach(), x0) and torch.equal(e.detach(), e0) and torch.equal(g, g0)


def test_strided_views_equal_contiguous():
    x, e = _tensors()
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous()
    torch.testing.assert_close(acc(xs, e[:, :, :]), acc(x, e))


def test_no_backward_kernel_for_inputs_without_grad(monkeypatch):
    calls = []
    real = acc_mod._asp_bwd

    def spy(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(acc_mod, "_asp_bwd", spy)
    x, e = _tensors()
    with torch.no_grad():
        acc(x.requires_grad_(True), e)
    assert not calls
    x.requires_grad_(True)
    acc(x, e).sum().backward()
    assert calls == [(True, False)]
    assert e.grad is None


def test_torch_compile_fullgraph_forward_and_backward():
    x, e = _tensors(c=5, t=9)
    x.requires_grad_(True)
    e.requires_grad_(True)
    fn = torch.compile(lambda a, b: acc(a, b, eps=1e-6), fullgraph=True, backend="aot_eager")
    out = fn(x, e)
    torch.testing.assert_close(out, acc(x, e, eps=1e-6))
    dx, de = torch.autograd.grad(out.sum(), [x, e])
    want = torch.autograd.grad(acc(x, e, eps=1e-6).sum(), [x, e])
    torch.testing.assert_close(dx, want[0])
    torch.testing.assert_close(de, want[1])


def test_accelerated_errors():
    x, e = _tensors()
    with pytest.raises(ValueError, match="logits"):
        acc(x, e[:, :, :3])
    with pytest.raises(ValueError, match="x"):
        acc(x[:, :, :0], e[:, :, :0])
    with pytest.raises(ValueError, match="eps"):
        acc(x, e, eps=-1.0)
    with pytest.raises(TypeError, match="x"):
        acc(x.double(), e)
    assert acc_mod.HAS_TRITON_BACKWARD


# ---------------------------------------------------------------------------------------------- GPU lane


def _float64_formula(x, e, eps=1e-9):
    alpha = torch.softmax(e.double(), dim=2)
    xd = x.double()
    mean = (alpha * xd).sum(2)
    var = (alpha * (xd - mean[:, :, None]) ** 2).sum(2)
    return torch.cat([mean, torch.sqrt(var.clamp(min=eps))], dim=1)


@pytest.mark.gpu
def test_gpu_bf16_benchmark_shape_forward_and_backward():
    """ECAPA-TDNN head (128, 1536, 300) in bf16 against the float64 formula on the same rounded values."""
    torch.manual_seed(0)
    x = (torch.randn(128, 1536, 300, device="cuda") + 2.0).bfloat16().requires_grad_(True)
    e = (3.0 * torch.randn(128, 1536, 300, device="cuda")).bfloat16().requires_grad_(True)
    out = acc(x, e)
    xd, ed = x.detach().double().requires_grad_(True), e.detach().double().requires_grad_(True)
    want = _float64_formula(xd, ed)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(want)
    dx, de = torch.autograd.grad(out, [x, e], g.bfloat16())
    wx, we = torch.autograd.grad(want, [xd, ed], g)
    torch.testing.assert_close(dx.double(), wx, rtol=3e-2, atol=3e-2 * wx.abs().max().item())
    torch.testing.assert_close(de.double(), we, rtol=3e-2, atol=3e-2 * we.abs().max().item())


@pytest.mark.gpu
def test_gpu_offsets_past_2_31_and_inductor_compile():
    b, c, t = 4, 64, 300
    k = 2**31 // (b * c * t) + 1
    buf = torch.zeros((k * b, c, t), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(b, c, t, device="cuda"))
    assert x.stride(0) * (b - 1) > 2**31
    e = torch.randn(b, c, t, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(acc(x, e), acc(x.contiguous(), e))
    fn = torch.compile(acc, fullgraph=True)
    xc = x.contiguous().requires_grad_(True)
    torch.testing.assert_close(fn(xc, e), acc(xc, e))
    fn(xc, e).float().sum().backward()
    assert xc.grad is not None and torch.isfinite(xc.grad).all()
