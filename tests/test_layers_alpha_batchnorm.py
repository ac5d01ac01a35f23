"""alpha_batchnorm (P54): the reference against PyTorch's BatchNorm at its two limits and a loop, the
running-statistics rules, and the accelerated path's behaviour (module buffers in train and eval
mode, compile, no grad kernels nobody asked for, errors)."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_mod = importlib.import_module("twinops.accelerated.layers.alpha_batchnorm")
from twinops.accelerated.layers.alpha_batchnorm import AlphaBatchNorm
from twinops.accelerated.layers.alpha_batchnorm import alpha_batchnorm as acc
from twinops.reference.layers.alpha_batchnorm import alpha_batchnorm as ref
from twinops.reference.layers.alpha_batchnorm import alpha_batchnorm_grad as ref_grad


def _data(shape=(4, 3, 5, 2), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (rng.normal(size=shape) * 2 + 1, rng.normal(size=c), rng.uniform(0.5, 2.0, size=c),
            rng.normal(size=c), rng.normal(size=c))


def test_reference_limits_are_pytorch_batchnorm():
    x, rm, rv, w, b = _data()
    t = [torch.tensor(a) for a in (x, rm, rv, w, b)]
    y, _, _ = ref(x, rm, rv, w, b, source_weight=1.0, training=False)
    np.testing.assert_allclose(y, F.batch_norm(*t, training=False).numpy(), rtol=1e-12, atol=1e-12)
    rm_t, rv_t = t[1].clone(), t[2].clone()
    want = F.batch_norm(t[0], rm_t, rv_t, t[3], t[4], training=True, momentum=0.1)
    y, new_rm, new_rv = ref(x, rm, rv, w, b, source_weight=0.0, training=True, momentum=0.1)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_rm, rm_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(new_rv, rv_t.numpy(), rtol=1e-12)


def test_reference_matches_a_loop_and_autograd():
    x, rm, rv, w, b = _data(shape=(3, 2, 4))
    a, eps = 0.3, 1e-5
    y = ref(x, rm, rv, w, b, source_weight=a, training=False, eps=eps)[0]
    for c in range(2):
        vals = x[:, c].ravel()
        mu = a * rm[c] + (1 - a) * vals.mean()
        var = a * rv[c] + (1 - a) * ((vals - vals.mean()) ** 2).mean()
        np.testing.assert_allclose(y[:, c], w[c] * (x[:, c] - mu) / np.sqrt(var + eps) + b[c], rtol=1e-12)
    tx, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    v_t, m_t = torch.var_mean(tx, dim=(0, 2), correction=0)
    mu = a * torch.tensor(rm) + (1 - a) * m_t
    var = a * torch.tensor(rv) + (1 - a) * v_t
    yt = tw[None, :, None] * (tx - mu[None, :, None]) / torch.sqrt(var[None, :, None] + eps) + tb[None, :, None]
    g = torch.linspace(-1, 2, yt.numel(), dtype=torch.float64).reshape(yt.shape)
    want = torch.autograd.grad(yt, [tx, tw, tb], g)
    got = ref_grad(g.numpy(), x, rm, rv, w, b, source_weight=a, training=False, eps=eps)
    for k, wv in zip(("x", "weight", "bias"), want):
        np.testing.assert_allclose(got[k], wv.numpy(), rtol=1e-10, atol=1e-12)


def test_reference_eval_mode_keeps_running_statistics_and_none_is_an_error():
    x, rm, rv, w, b = _data()
    _, m, v = ref(x, rm, rv, w, b, source_weight=0.5, training=False)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_array_equal(v, rv)
    with pytest.raises(ValueError, match="running_mean"):
        ref(x, None, None, w, b, source_weight=0.5, training=False)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_reference_rejects_non_finite_running_statistics(name):
    x, rm, rv, w, b = _data()
    bad = {"running_mean": rm.copy(), "running_var": rv.copy()}
    bad[name][1] = np.nan
    with pytest.raises(ValueError, match=name):
        ref(x, bad["running_mean"], bad["running_var"], w, b, source_weight=0.5)


def test_reference_source_weight_range_and_training_needs_two_values():
    x, rm, rv, w, b = _data()
    for a in (-0.01, 1.01):
        with pytest.raises(ValueError, match="source_weight"):
            ref(x, rm, rv, w, b, source_weight=a)
    with pytest.raises(ValueError, match="x"):
        ref(x[:1, :, :1, :1], rm, rv, w, b, source_weight=0.5, training=True)
    ref(x[:1, :, :1, :1], rm, rv, w, b, source_weight=0.5, training=False)  # eval with M = 1 is fine


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(shape=(3, 5, 6, 7), seed=0):
    return [torch.tensor(a, dtype=torch.float32) for a in _data(shape, seed)]


@pytest.mark.parametrize("training", [True, False])
def test_module_buffers_follow_the_reference(training):
    x, rm, rv, w, b = _tensors()
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    mod = AlphaBatchNorm.from_batchnorm(bn, source_weight=0.25).train(training)
    for step in range(2):
        x = x + step
        want_y, want_m, want_v = ref(x.double().numpy(), mod.running_mean.double().numpy(),
                                     mod.running_var.double().numpy(), w.double().numpy(), b.double().numpy(),
                                     source_weight=0.25, training=training, momentum=0.1, eps=1e-5)
        y = mod(x)
        np.testing.assert_allclose(y.detach().double().numpy(), want_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mod.running_mean.double().numpy(), want_m, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mod.running_var.double().numpy(), want_v, rtol=1e-6, atol=1e-6)
    assert int(mod.num_batches_tracked) == int(bn.num_batches_tracked) + (2 if training else 0)


def test_module_limits_match_batchnorm():
    x = _tensors()[0]
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    eval_bn = AlphaBatchNorm.from_batchnorm(bn.eval(), source_weight=1.0)
    torch.testing.assert_close(eval_bn(x), bn(x))
    train_bn = AlphaBatchNorm.from_batchnorm(bn.train(), source_weight=0.0)
    torch.testing.assert_close(train_bn(x), bn(x))
    torch.testing.assert_close(train_bn.running_var, bn.running_var)


def test_without_affine_parameters():
    x, rm, rv, _, _ = _tensors()
    y, _, _ = acc(x, rm, rv, None, None, source_weight=0.4)
    want = ref(x.double().numpy(), rm.double().numpy(), rv.double().numpy(), source_weight=0.4)[0]
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(acc(x, rm, rv, source_weight=0.4)[0].sum(), x)
    assert gx.shape == x.shape


def test_inputs_and_incoming_gradient_are_not_written():
    x, rm, rv, w, b = _tensors()
    for t in (x, w, b):
        t.requires_grad_(True)
    before = [t.detach().clone() for t in (x, rm, rv, w, b)]
    y, _, _ = acc(x, rm, rv, w, b, source_weight=0.3)
    g = torch.rand_like(y)
    g0 = g.clone()
    y.backward(g)
    assert all(torch.equal(t.detach(), t0) for t, t0 in zip((x, rm, rv, w, b), before))
    assert torch.equal(g, g0)


def test_channels_last_and_strided_views_equal_contiguous():
    x, rm, rv, w, b = _tensors()
    want = acc(x, rm, rv, w, b, source_weight=0.3)
    for view in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = acc(view, rm, rv, w, b, source_weight=0.3)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_no_backward_kernels_nobody_asked_for(monkeypatch):
    calls = []
    real = acc_mod._abn_bwd

    def spy(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(acc_mod, "_abn_bwd", spy)
    x, rm, rv, w, b = _tensors()
    with torch.no_grad():
        acc(x.requires_grad_(True), rm, rv, w.requires_grad_(True), b, source_weight=0.3)
    assert not calls
    acc(x, rm, rv, w.detach(), b, source_weight=0.3)[0].sum().backward()
    assert calls == [(True, False)]
    x2 = x.detach()
    acc(x2, rm, rv, w, b, source_weight=0.3)[0].sum().backward()
    assert calls[-1] == (False, True) and w.grad is not None


def test_torch_compile_fullgraph_module_train_and_eval():
    x, rm, rv, w, b = _tensors(shape=(2, 3, 4, 5))
    mod = AlphaBatchNorm(3, source_weight=0.2)
    with torch.no_grad():
        mod.running_mean.copy_(rm)
        mod.running_var.copy_(rv)
    plain = AlphaBatchNorm(3, source_weight=0.2)
    plain.load_state_dict(mod.state_dict())
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = compiled(xa)
    y_plain = plain(xb)
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(mod.running_var, plain.running_var)
    (ga,) = torch.autograd.grad(y.sum(), xa)
    (gb,) = torch.autograd.grad(y_plain.sum(), xb)
    torch.testing.assert_close(ga, gb)
    mod.eval()
    plain.eval()
    torch.testing.assert_close(compiled(x), plain(x))


def test_non_finite_running_statistics_poison_their_channel():
    x, rm, rv, w, b = _tensors()
    rm[1] = float("inf")
    rv[3] = -1.0
    y, _, _ = acc(x, rm, rv, w, b, source_weight=0.5)
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y[:, 3]).all()
    assert torch.isfinite(y[:, [0, 2, 4]]).all()


def test_accelerated_errors():
    x, rm, rv, w, b = _tensors()
    with pytest.raises(ValueError, match="running_mean"):
        acc(x, None, None, w, b, source_weight=0.5, training=False)
    with pytest.raises(ValueError, match="source_weight"):
        acc(x, rm, rv, w, b, source_weight=1.5)
    with pytest.raises(ValueError, match="weight"):
        acc(x, rm, rv, w[:2], b, source_weight=0.5)
    with pytest.raises(ValueError, match="x"):
        acc(x[:1, :, :1, :1], rm, rv, w, b, source_weight=0.5, training=True)
    with pytest.raises(TypeError, match="training"):
        acc(x, rm, rv, w, b, source_weight=0.5, training=1)
    with pytest.raises(ValueError, match="source_weight"):
        AlphaBatchNorm(3, source_weight=-0.5)
    assert acc_mod.HAS_TRITON_BACKWARD


# ---------------------------------------------------------------------------------------------- GPU lane


def _float64_formula(x, rm, rv, w, b, a, eps=1e-5):
    dims = [0] + list(range(2, x.ndim))
    var_t, mu_t = torch.var_mean(x.double(), dim=dims, correction=0)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = (a * rm.double() + (1 - a) * mu_t).view(shape)
    var = (a * rv.double() + (1 - a) * var_t).view(shape)
    return w.double().view(shape) * (x.double() - mu) / torch.sqrt(var + eps) + b.double().view(shape)


@pytest.mark.gpu
def test_gpu_bf16_benchmark_shape_forward_and_backward():
    """(64, 256, 56, 56) bf16 activations, fp32 running statistics, against float64 on the same values."""
    torch.manual_seed(0)
    x = (torch.randn(64, 256, 56, 56, device="cuda") * 2 + 1).bfloat16().requires_grad_(True)
    rm, rv = torch.randn(256, device="cuda"), torch.rand(256, device="cuda") + 0.5
    w = torch.randn(256, device="cuda").bfloat16().requires_grad_(True)
    b = torch.randn(256, device="cuda").bfloat16().requires_grad_(True)
    y, new_rm, new_rv = acc(x, rm, rv, w, b, source_weight=0.1)
    assert new_rm.dtype == torch.float32 and y.dtype == torch.bfloat16
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    want = _float64_formula(xd, rm, rv, wd, bd, 0.1)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, [x, w, b], g.bfloat16())
    ref_g = torch.autograd.grad(want, [xd, wd, bd], g)
    for a, e in zip(got, ref_g):
        torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2 * e.abs().max().item())


@pytest.mark.gpu
def test_gpu_offsets_past_2_31_and_inductor_compile():
    n, c, s = 4, 64, 3136
    k = 2**31 // (n * c * s) + 1
    buf = torch.zeros((k * n, c, s), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, c, s, device="cuda"))
    assert x.stride(0) * (n - 1) > 2**31
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    for got, want in zip(acc(x, rm, rv, source_weight=0.3), acc(x.contiguous(), rm, rv, source_weight=0.3)):
        torch.testing.assert_close(got, want)
    mod = AlphaBatchNorm(c, source_weight=0.3, device="cuda")
    compiled = torch.compile(mod, fullgraph=True)
    xc = x.contiguous().requires_grad_(True)
    compiled(xc).float().sum().backward()
    assert xc.grad is not None and int(mod.num_batches_tracked) == 1
