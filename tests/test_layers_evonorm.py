"""evonorm_s0 / evonorm_b0 (P51): the reference against loops and torch autograd, its defined edge
cases, and the accelerated path's behaviour beyond conformance (channels_last, modules, buffers,
torch.compile, skipped gradient work)."""

import importlib

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.evonorm")
from twinops.accelerated.layers.evonorm import EvoNorm2dB0, EvoNorm2dS0
from twinops.reference.layers.evonorm import evonorm_b0, evonorm_b0_grad, evonorm_s0, evonorm_s0_grad

acc_s0, acc_b0 = acc_mod.evonorm_s0, acc_mod.evonorm_b0
NAMES = ("x", "v", "weight", "bias")


def _data(shape=(2, 6, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (rng.normal(size=shape) * 1.5 + 0.3, rng.normal(size=c), rng.normal(size=c), rng.normal(size=c),
            rng.uniform(0.5, 2.0, c), rng.normal(size=shape))


# ------------------------------------------------------------------------------------------- reference


def test_reference_s0_matches_a_loop():
    x, v, w, b, _, _ = _data()
    groups = 3
    want = np.zeros_like(x)
    n, c = x.shape[:2]
    for i in range(n):
        for g in range(groups):
            chans = range(g * c // groups, (g + 1) * c // groups)
            vals = [float(x[i, k, p, q]) for k in chans for p in range(x.shape[2]) for q in range(x.shape[3])]
            mean = sum(vals) / len(vals)
            std = (sum((t - mean) ** 2 for t in vals) / len(vals) + 1e-5) ** 0.5
            for k in chans:
                gate = 1.0 / (1.0 + np.exp(-v[k] * x[i, k]))
                want[i, k] = w[k] * x[i, k] * gate / std + b[k]
    np.testing.assert_allclose(evonorm_s0(x, v, w, b, groups=groups), want, rtol=1e-12, atol=1e-12)


def _torch_s0(x, v, w, b, groups, eps):
    """timm's EvoNorm2dS0 forward, in float64 torch."""
    n, c, h, ww = x.shape
    xg = x.reshape(n, groups, -1)
    std = (xg.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    y = ((x * torch.sigmoid(v.view(1, -1, 1, 1) * x)).reshape(n, groups, -1) / std).reshape(x.shape)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _torch_b0(x, v, w, b, rv, training, eps):
    inst = (x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    var = x.var(dim=(0, 2, 3), unbiased=False) if training else rv
    left = (var.view(1, -1, 1, 1) + eps).sqrt()
    return x / torch.maximum(left, v.view(1, -1, 1, 1) * x + inst) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _torch_grads(fn, arrays, g):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = fn(*ts)
    return y.detach().numpy(), dict(zip(NAMES, (t.numpy() for t in torch.autograd.grad(y, ts, torch.tensor(g)))))


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_reference_s0_matches_torch_autograd(eps):
    x, v, w, b, _, g = _data(seed=1)
    y, grads = _torch_grads(lambda *t: _torch_s0(*t, 2, eps), (x, v, w, b), g)
    np.testing.assert_allclose(evonorm_s0(x, v, w, b, groups=2, eps=eps), y, rtol=1e-12, atol=1e-12)
    ours = evonorm_s0_grad(g, x, v, w, b, groups=2, eps=eps)
    for k in NAMES:
        np.testing.assert_allclose(ours[k], grads[k], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("training", [True, False])
def test_reference_b0_matches_torch_autograd(training):
    x, v, w, b, rv, g = _data(seed=2)
    y, grads = _torch_grads(lambda *t: _torch_b0(*t, torch.tensor(rv), training, 1e-5), (x, v, w, b), g)
    out, _ = evonorm_b0(x, v, w, b, rv, training=training)
    np.testing.assert_allclose(out, y, rtol=1e-12, atol=1e-12)
    ours = evonorm_b0_grad(g, x, v, w, b, rv, training=training)
    for k in NAMES:
        np.testing.assert_allclose(ours[k], grads[k], rtol=1e-10, atol=1e-11)


def test_reference_b0_tie_splits_the_gradient_like_torch_maximum():
    """x = 0 everywhere: a = sqrt(eps) = 0 * v + s, an exact tie in every entry."""
    _, v, w, b, rv, g = _data(seed=3)
    x = np.zeros((2, 6, 3, 4))
    _, grads = _torch_grads(lambda *t: _torch_b0(*t, torch.tensor(rv), True, 1e-5), (x, v, w, b), g)
    ours = evonorm_b0_grad(g, x, v, w, b, rv, training=True)
    for k in NAMES:
        np.testing.assert_allclose(ours[k], grads[k], rtol=1e-10, atol=1e-11)


def test_reference_b0_running_variance():
    x, v, w, b, rv, _ = _data(seed=4)
    _, new = evonorm_b0(x, v, w, b, rv, training=True, momentum=0.25)
    np.testing.assert_allclose(new, 0.75 * rv + 0.25 * x.var(axis=(0, 2, 3)), rtol=1e-13)  # biased variance
    y_eval, same = evonorm_b0(x, v, w, b, new, training=False)
    np.testing.assert_array_equal(same, new)
    assert same is not new
    assert evonorm_b0(x, v, w, b, None, training=True)[1] is None
    with pytest.raises(ValueError, match="running_var"):
        evonorm_b0(x, v, w, b, None, training=False)
    with pytest.raises(ValueError, match="running_var"):
        evonorm_b0(x, v, w, b, np.full(6, np.nan), training=True)


def test_reference_constant_group_has_std_sqrt_eps():
    x = np.full((1, 2, 2, 2), 3.0)
    y = evonorm_s0(x, np.zeros(2), np.ones(2), np.zeros(2), groups=1, eps=1e-4)
    np.testing.assert_allclose(y, 3.0 * 0.5 / 1e-2)


def test_reference_nan_stays_in_its_group():
    x, v, w, b, _, _ = _data(seed=5)
    x[0, 0, 1, 1] = np.nan
    y = evonorm_s0(x, v, w, b, groups=3)
    assert np.isnan(y[0, :2]).all() and np.isfinite(y[0, 2:]).all() and np.isfinite(y[1]).all()


def test_reference_errors_name_the_argument():
    x, v, w, b, rv, _ = _data()
    with pytest.raises(ValueError, match="groups"):
        evonorm_s0(x, v, w, b, groups=4)
    with pytest.raises(ValueError, match="weight"):
        evonorm_s0(x, v, w[:5], b, groups=3)
    with pytest.raises(ValueError, match="running_var"):
        evonorm_b0(x, v, w, b, rv[:, None])
    with pytest.raises(TypeError, match="training"):
        evonorm_b0(x, v, w, b, rv, training=1)


# ----------------------------------------------------------------------------------------- accelerated


def _t(a, requires_grad=False):
    return torch.tensor(a, dtype=torch.float32, requires_grad=requires_grad)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "unmerged":  # a W slice of a wider tensor: stride_h != W * stride_w
        wide = torch.zeros(x.shape[:3] + (x.shape[3] + 3,))
        wide[..., : x.shape[3]] = x
        return wide[..., : x.shape[3]]
    return x


@pytest.mark.parametrize("layout", ["channels_last", "unmerged"])
def test_s0_layouts_are_read_in_place(layout):
    x, v, w, b, _, g = _data(shape=(2, 6, 5, 4), seed=6)
    xt = _layout(_t(x), layout).requires_grad_(True)
    ps = [_t(p, True) for p in (v, w, b)]
    y = acc_s0(xt, *ps, groups=3)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, [xt, *ps], _t(g))
    np.testing.assert_allclose(y.detach().numpy(), evonorm_s0(x, v, w, b, groups=3), rtol=1e-5, atol=1e-5)
    want = evonorm_s0_grad(g, x, v, w, b, groups=3)
    for k, got in zip(NAMES, grads):
        np.testing.assert_allclose(got.numpy(), want[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "unmerged"])
@pytest.mark.parametrize("training", [True, False])
def test_b0_layouts_are_read_in_place(layout, training):
    x, v, w, b, rv, g = _data(shape=(3, 5, 4, 5), seed=7)
    xt = _layout(_t(x), layout).requires_grad_(True)
    ps = [_t(p, True) for p in (v, w, b)]
    y, new = acc_b0(xt, *ps, _t(rv), training=training)
    grads = torch.autograd.grad(y, [xt, *ps], _t(g))
    y_ref, new_ref = evonorm_b0(x, v, w, b, rv, training=training)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.numpy(), new_ref, rtol=1e-5, atol=1e-6)
    want = evonorm_b0_grad(g, x, v, w, b, rv, training=training)
    for k, got in zip(NAMES, grads):
        np.testing.assert_allclose(got.numpy(), want[k], rtol=1e-4, atol=1e-4)


def test_b0_module_updates_its_buffer_like_the_reference():
    x, v, w, b, _, _ = _data(shape=(2, 4, 3, 3), seed=8)
    m = EvoNorm2dB0(4, momentum=0.2)
    assert torch.equal(m.running_var, torch.ones(4))
    with torch.no_grad():
        m.v.copy_(_t(v)), m.weight.copy_(_t(w)), m.bias.copy_(_t(b))
    rv = np.ones(4)
    for step in range(2):
        xs = x + step
        y = m(_t(xs))
        y_ref, rv = evonorm_b0(xs, v, w, b, rv, training=True, momentum=0.2)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.running_var.numpy(), rv, rtol=1e-6)
    m.eval()
    y = m(_t(x))
    np.testing.assert_allclose(y.detach().numpy(), evonorm_b0(x, v, w, b, rv, training=False)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.running_var.numpy(), rv, rtol=1e-6)  # eval does not update


def test_b0_module_eval_before_training_uses_the_initial_buffer():
    x = _data(shape=(2, 4, 3, 3), seed=9)[0]
    m = EvoNorm2dB0(4).eval()
    y = m(_t(x))
    want = evonorm_b0(x, np.ones(4), np.ones(4), np.zeros(4), np.ones(4), training=False)[0]
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_s0_module_and_its_parameters():
    m = EvoNorm2dS0(6, groups=3)
    assert [n for n, _ in m.named_parameters()] == ["v", "weight", "bias"]
    x = _data(shape=(2, 6, 3, 3), seed=10)[0]
    y = m(_t(x))
    np.testing.assert_allclose(y.detach().numpy(), evonorm_s0(x, np.ones(6), np.ones(6), np.zeros(6), groups=3),
                               rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="groups"):
        EvoNorm2dS0(6, groups=4)


def test_inputs_are_not_modified():
    x, v, w, b, rv, g = _data(seed=11)
    tensors = [_t(a, True) for a in (x, v, w, b)]
    rvt, gt = _t(rv), _t(g)
    copies = [t.detach().clone() for t in (*tensors, rvt, gt)]
    torch.autograd.grad(acc_s0(*tensors, groups=2), tensors, gt)
    torch.autograd.grad(acc_b0(*tensors, rvt)[0], tensors, gt)
    for t, c in zip((*tensors, rvt, gt), copies):
        assert torch.equal(t.detach(), c)


def test_torch_compile_fullgraph_forward_and_backward():
    x, v, w, b, rv, g = _data(shape=(2, 4, 3, 5), seed=12)
    s0 = EvoNorm2dS0(4, groups=2)
    b0 = EvoNorm2dB0(4)
    net = torch.nn.Sequential(s0, b0)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    xt = _t(x, True)
    y = compiled(xt)
    (y * _t(g)).sum().backward()
    x2 = _t(x, True)
    ref_net = torch.nn.Sequential(EvoNorm2dS0(4, groups=2), EvoNorm2dB0(4))
    y2 = ref_net(x2)
    (y2 * _t(g)).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(xt.grad, x2.grad)
    torch.testing.assert_close(b0.running_var, ref_net[1].running_var)


def test_no_backward_work_when_nothing_needs_it(monkeypatch):
    calls = []
    for name in ("_s0_backward", "_b0_backward"):
        real = getattr(acc_mod, name)
        monkeypatch.setattr(acc_mod, name, lambda *a, _real=real, _name=name: calls.append((_name, a[-1])) or _real(*a))
    x, v, w, b, rv, g = _data(seed=13)
    with torch.no_grad():
        y = acc_s0(_t(x, True), _t(v, True), _t(w, True), _t(b, True), groups=2)
    assert y.grad_fn is None
    assert acc_b0(_t(x), _t(v), _t(w), _t(b), _t(rv))[0].grad_fn is None
    # Only the parameters need gradients: the backward skips dx (need_x=False).
    ps = [_t(p, True) for p in (v, w, b)]
    torch.autograd.grad(acc_s0(_t(x), *ps, groups=2), ps, _t(g))
    torch.autograd.grad(acc_b0(_t(x), *ps, _t(rv))[0], ps, _t(g))
    assert calls == [("_s0_backward", False), ("_b0_backward", False)]


def test_accelerated_errors_match_the_reference():
    x, v, w, b, rv, _ = _data()
    with pytest.raises(ValueError, match="groups"):
        acc_s0(_t(x), _t(v), _t(w), _t(b), groups=4)
    with pytest.raises(ValueError, match="bias"):
        acc_s0(_t(x), _t(v), _t(w), _t(b[:2]), groups=2)
    with pytest.raises(ValueError, match="running_var"):
        acc_b0(_t(x), _t(v), _t(w), _t(b), None, training=False)
    # a non-finite running variance cannot raise on the device: it comes back NaN
    y, new = acc_b0(_t(x), _t(v), _t(w), _t(b), _t(np.full(6, np.inf)), training=False)
    assert torch.isnan(y).all() and torch.isnan(new).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16bit_channels_last_against_the_reference(dtype):
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 64, 28, 28))
    c = 64
    v, w, b = rng.normal(size=c), rng.normal(size=c), rng.normal(size=c)
    xt = torch.tensor(x, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    ps = [torch.tensor(p, device="cuda", dtype=dtype) for p in (v, w, b)]
    xr = xt.double().cpu().numpy()
    pr = [p.double().cpu().numpy() for p in ps]
    y = acc_s0(xt, *ps, groups=32)
    np.testing.assert_allclose(y.double().cpu().numpy(), evonorm_s0(xr, *pr, groups=32), rtol=2e-2, atol=2e-2)
    y, _ = acc_b0(xt, *ps, torch.ones(c, device="cuda"))
    np.testing.assert_allclose(y.double().cpu().numpy(), evonorm_b0(xr, *pr, np.ones(c))[0], rtol=2e-2, atol=2e-2)


def test_b0_without_running_var_in_training():
    x, v, w, b, _, g = _data(shape=(2, 3, 4, 4), seed=15)
    xt = _t(x, True)
    y, new = acc_b0(xt, _t(v), _t(w), _t(b), None, training=True)
    assert new is None
    np.testing.assert_allclose(y.detach().numpy(), evonorm_b0(x, v, w, b, None)[0], rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y, [xt], _t(g))
    np.testing.assert_allclose(dx.numpy(), evonorm_b0_grad(g, x, v, w, b, None)["x"], rtol=1e-4, atol=1e-4)
