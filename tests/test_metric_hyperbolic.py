"""Hyp-OC (P48) Poincaré-ball operations: the reference against independent forms (hyptorch's
Möbius-sum logits, the artanh distance, brute-force loops, closed-form limits), and the accelerated
functions' behaviour (modules, input hygiene, torch.compile, work skipped, NaN rows, errors)."""

import importlib
import math

import numpy as np
import pytest
import torch

import twinops.accelerated.metric.hyperbolic as acc
acc_mlr = importlib.import_module("twinops.accelerated.metric.hyperbolic_mlr_ce")  # the package exports a function of the same name
import twinops.reference.metric.hyperbolic as ref
from twinops.conformance.specs.metric.hyperbolic import ball_points


def _mobius_add(u, v, c):
    uv = np.sum(u * v, -1, keepdims=True)
    u2 = np.sum(u * u, -1, keepdims=True)
    v2 = np.sum(v * v, -1, keepdims=True)
    return ((1 + 2 * c * uv + c * v2) * u + (1 - c * u2) * v) / (1 + 2 * c * uv + c * c * u2 * v2)


def _points(n, d, c, r=0.9, seed=0):
    return ball_points(np.random.default_rng(seed), n, d, c, r)


# ------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("c", [0.1, 1.0, 2.5])
def test_mlr_closed_form_equals_mobius_sum_logits(c):
    """Independent anchor: hyptorch's definition, z_k = (-p_k) (+) x, then the signed distance to the
    hyperplane, then a plain log-softmax loop."""
    rng = np.random.default_rng(1)
    n, k, d = 7, 4, 5
    x, p = _points(n, d, c, 0.95, 2), _points(k, d, c, 0.7, 3)
    a = rng.normal(size=(k, d))
    t = rng.integers(0, k, n)
    t[3] = -100
    logits = np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            z = _mobius_add(-p[j], x[i], c)
            lam = 2 / (1 - c * p[j] @ p[j])
            na = np.linalg.norm(a[j])
            logits[i, j] = lam * na / math.sqrt(c) * math.asinh(2 * math.sqrt(c) * (z @ a[j]) / ((1 - c * z @ z) * na))
    rows = [math.log(np.exp(logits[i]).sum()) - logits[i, t[i]] for i in range(n) if t[i] != -100]
    np.testing.assert_allclose(ref.hyperbolic_mlr_ce(x, t, p, a, c=c, reduction="mean"), np.mean(rows), rtol=1e-12)
    none = ref.hyperbolic_mlr_ce(x, t, p, a, c=c, reduction="none")
    assert none[3] == 0.0
    np.testing.assert_allclose(np.delete(none, 3), rows, rtol=1e-12)


def test_mlr_zero_normal_has_logit_zero_and_ignored_rows_are_inert():
    c = 0.5
    x, p = _points(4, 3, c), _points(2, 3, c, 0.5, 1)
    a = np.array([[1.0, -0.5, 0.2], [0.0, 0.0, 0.0]])
    t = np.array([0, 1, 1, 0])
    # class 1 has logit 0, so the loss is -log softmax([xi_0, 0])
    z = _mobius_add(-p[0], x, c)
    xi0 = (2 / (1 - c * p[0] @ p[0]) * np.linalg.norm(a[0]) / math.sqrt(c)
           * np.arcsinh(2 * math.sqrt(c) * (z @ a[0]) / ((1 - c * np.sum(z * z, 1)) * np.linalg.norm(a[0]))))
    want = np.where(t == 1, np.log1p(np.exp(xi0)), np.log1p(np.exp(-xi0)))
    np.testing.assert_allclose(ref.hyperbolic_mlr_ce(x, t, p, a, c=c, reduction="none"), want, rtol=1e-10)
    g = ref.hyperbolic_mlr_ce_grad(np.ones(4), x, t, p, a, c=c, reduction="none")
    assert np.all(g["a"][1] == 0.0) and np.all(g["p"][1] == 0.0)
    bad = x.copy()
    bad[2] = np.nan
    out = ref.hyperbolic_mlr_ce(bad, np.array([0, 1, -100, 0]), p, a, c=c, reduction="none")
    assert out[2] == 0.0 and np.isfinite(out).all()


@pytest.mark.parametrize("c", [0.1, 1.0, 7.0])
def test_distance_equals_artanh_form_and_is_a_metric(c):
    x, y, w = _points(6, 4, c, 0.99, 4), _points(6, 4, c, 0.99, 5), _points(6, 4, c, 0.99, 6)
    artanh = 2 / math.sqrt(c) * np.arctanh(math.sqrt(c) * np.linalg.norm(_mobius_add(-x, y, c), axis=1))
    d = ref.poincare_distance(x, y, c=c)
    np.testing.assert_allclose(d, artanh, rtol=1e-9)
    np.testing.assert_allclose(ref.poincare_distance(y, x, c=c), d, rtol=1e-12)
    assert np.all(ref.poincare_distance(x, w, c=c) <= d + ref.poincare_distance(y, w, c=c) + 1e-12)
    # from the origin: (2/sqrt(c)) artanh(sqrt(c) ||y||)
    np.testing.assert_allclose(ref.poincare_distance(np.zeros_like(y), y, c=c),
                               2 / math.sqrt(c) * np.arctanh(math.sqrt(c) * np.linalg.norm(y, axis=1)), rtol=1e-12)
    assert np.all(ref.poincare_distance(x, x, c=c) == 0.0)
    g = ref.poincare_distance_grad(np.ones(6), x, x.copy(), c=c)
    assert np.all(g["x"] == 0.0) and np.all(g["y"] == 0.0)


def test_expmap0_limits_and_projection():
    rng = np.random.default_rng(7)
    c, eps = 0.1, 1e-3
    x = rng.normal(size=(5, 8)) * np.array([[1e-6], [0.1], [0.5], [3.0], [100.0]])
    y = ref.poincare_expmap0(x, c=c, clip_r=None, eps=eps)
    # tanh(sqrt(c)||x||)/sqrt(c) along x; the inverse map (logmap0) recovers x where nothing was projected
    norm_x, norm_y = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(norm_y[:4], np.tanh(math.sqrt(c) * norm_x[:4]) / math.sqrt(c), rtol=1e-12)
    np.testing.assert_allclose(y / norm_y[:, None], x / norm_x[:, None], rtol=1e-12)
    back = np.arctanh(math.sqrt(c) * norm_y[:4]) / (math.sqrt(c) * norm_y[:4])
    np.testing.assert_allclose(back[:, None] * y[:4], x[:4], rtol=1e-9)
    assert math.isclose(norm_y[4], (1 - eps) / math.sqrt(c), rel_tol=1e-12)  # projected
    np.testing.assert_allclose(y[0], x[0], rtol=1e-10)  # the map is the identity to first order
    # clipping: norms above clip_r are cut to clip_r / (1 + 1e-5 / ||x||) before the map
    clipped = ref.poincare_expmap0(x, c=c, clip_r=2.0)
    r = 2.0 * norm_x[3] / (norm_x[3] + 1e-5)
    np.testing.assert_allclose(np.linalg.norm(clipped[3]), np.tanh(math.sqrt(c) * r) / math.sqrt(c), rtol=1e-12)
    assert np.all(np.linalg.norm(ref.poincare_expmap0(x * 1e3, c=50.0, clip_r=None), axis=1)
                  <= (1 - eps) / math.sqrt(50.0) * (1 + 1e-12))
    assert np.all(ref.poincare_expmap0(np.zeros((2, 3))) == 0.0)


def test_hyp_pc_loss_is_the_paired_distance_sum_over_b():
    c = 0.1
    z = _points(8, 5, c, 0.95, 8)
    want = sum(ref.poincare_distance(z[i:i + 1], z[i + 4:i + 5], c=c)[0] for i in range(4)) / 8
    np.testing.assert_allclose(ref.hyp_pc_loss(z, c=c), want, rtol=1e-12)
    assert ref.hyp_pc_loss(np.zeros((0, 5)), c=c) == 0.0
    with pytest.raises(ValueError, match="z"):
        ref.hyp_pc_loss(z[:3], c=c)


@pytest.mark.parametrize("bad_c", [0.0, -1.0, float("nan"), float("inf")])
def test_reference_rejects_bad_curvature(bad_c):
    x = np.zeros((2, 3))
    for call in (lambda: ref.poincare_expmap0(x, c=bad_c), lambda: ref.poincare_distance(x, x, c=bad_c),
                 lambda: ref.hyp_pc_loss(x, c=bad_c),
                 lambda: ref.hyperbolic_mlr_ce(x, np.array([0, 1]), x, x + 1, c=bad_c)):
        with pytest.raises(ValueError, match="c"):
            call()


def test_reference_rejects_points_outside_the_ball():
    x = np.zeros((2, 3))
    out = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])  # c ||x||^2 = 1.6
    with pytest.raises(ValueError, match=r"x\[1\] lies outside"):
        ref.poincare_distance(out, x)
    with pytest.raises(ValueError, match=r"p\[1\] lies outside"):
        ref.hyperbolic_mlr_ce(x, np.array([0, 1]), out, x + 1)
    with pytest.raises(ValueError, match=r"x\[1\] lies outside"):
        ref.hyperbolic_mlr_ce(out, np.array([0, 1]), x, x + 1)
    # an ignored row may lie anywhere
    assert np.isfinite(ref.hyperbolic_mlr_ce(out, np.array([0, -100]), x, x + 1))


# ------------------------------------------------------------------------------------ accelerated


def _t(a, dtype=torch.float32, grad=False):
    return torch.tensor(np.asarray(a), dtype=dtype).requires_grad_(grad)


def _mlr_inputs(n=6, k=5, d=7, c=0.3, seed=0):
    rng = np.random.default_rng(seed)
    x, p = _points(n, d, c, 0.9, seed), _points(k, d, c, 0.6, seed + 1)
    a = rng.normal(size=(k, d))
    t = torch.tensor(rng.integers(0, k, n))
    return x, t, p, a


def test_modules_match_the_functions():
    torch.manual_seed(0)
    feats = torch.randn(6, 7) * 2
    z = acc.ToPoincare(c=0.3)(feats)
    torch.testing.assert_close(z, acc.poincare_expmap0(feats, c=0.3))
    torch.testing.assert_close(acc.HypPCLoss(c=0.3)(z), acc.hyp_pc_loss(z, c=0.3))
    head = acc.HyperbolicMLRLoss(7, 4, c=0.3)
    t = torch.tensor([0, 3, 1, 2, -100, 0])
    loss = head(z, t)
    p, a = head.class_parameters()
    torch.testing.assert_close(loss, acc.hyperbolic_mlr_ce(z, t, p, a, c=0.3))
    want = ref.hyperbolic_mlr_ce(z.detach().double().numpy(), t.numpy(), p.detach().double().numpy(),
                                 a.detach().double().numpy(), c=0.3)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    loss.backward()
    assert head.p_free.grad is not None and head.a_free.grad is not None
    assert torch.isfinite(head.p_free.grad).all() and torch.isfinite(head.a_free.grad).all()


def test_inputs_and_incoming_gradient_are_not_written():
    x, t, p, a = _mlr_inputs()
    xs, ps, as_ = _t(x, grad=True), _t(p, grad=True), _t(a, grad=True)
    saved = [v.detach().clone() for v in (xs, ps, as_)] + [t.clone()]
    out = acc.hyperbolic_mlr_ce(xs, t, ps, as_, c=0.3, reduction="none")
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    for before, after in zip(saved, [xs.detach(), ps.detach(), as_.detach(), t]):
        assert torch.equal(before, after)
    assert torch.equal(g, g0)
    y = _t(_points(6, 7, 0.3, seed=9), grad=True)
    y0 = y.detach().clone()
    d = acc.poincare_distance(xs, y, c=0.3)
    gd = torch.rand_like(d)
    gd0 = gd.clone()
    d.backward(gd)
    assert torch.equal(y.detach(), y0) and torch.equal(gd, gd0)
    f = torch.randn(5, 7, requires_grad=True)
    f0 = f.detach().clone()
    e = acc.poincare_expmap0(f)
    ge = torch.randn_like(e)
    ge0 = ge.clone()
    e.backward(ge)
    assert torch.equal(f.detach(), f0) and torch.equal(ge, ge0)


def test_torch_compile_fullgraph_forward_and_backward():
    x, t, p, a = _mlr_inputs()

    def step(feats, t, p, a):
        z = acc.poincare_expmap0(feats, c=0.3)
        return (acc.hyperbolic_mlr_ce(z, t, p, a, c=0.3) + acc.hyp_pc_loss(z[:6], c=0.3)
                + acc.poincare_distance(z[:3], z[3:6], c=0.3).sum())

    feats = torch.randn(6, 7)
    inputs = [feats.clone().requires_grad_(), t, _t(p, grad=True), _t(a, grad=True)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, [inputs[0], inputs[2], inputs[3]])
    eager_inputs = [v.detach().clone().requires_grad_(v.requires_grad) for v in inputs]
    want = step(*eager_inputs)
    want_grads = torch.autograd.grad(want, [eager_inputs[0], eager_inputs[2], eager_inputs[3]])
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_no_backward_kernels_for_inputs_without_grad(monkeypatch):
    calls = []
    for name in ("_mlr_backward_x", "_mlr_backward_classes"):
        original = getattr(acc_mlr, name)
        monkeypatch.setattr(acc_mlr, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    x, t, p, a = _mlr_inputs()
    with torch.no_grad():
        out = acc.hyperbolic_mlr_ce(_t(x, grad=True), t, _t(p, grad=True), _t(a, grad=True))
    assert out.grad_fn is None
    xs = _t(x, grad=True)
    acc.hyperbolic_mlr_ce(xs, t, _t(p), _t(a)).backward()
    assert calls == ["_mlr_backward_x"]
    calls.clear()
    ps = _t(p, grad=True)
    acc.hyperbolic_mlr_ce(_t(x), t, ps, _t(a)).backward()
    assert calls == ["_mlr_backward_classes"] and ps.grad is not None
    with torch.no_grad():
        assert acc.poincare_expmap0(torch.randn(3, 4, requires_grad=True)).grad_fn is None


def test_bad_values_poison_their_rows_only():
    x, t, p, a = _mlr_inputs()
    x[2] *= 2.0 / (math.sqrt(0.3) * np.linalg.norm(x[2]))  # outside the ball
    t[4] = 5  # out of range
    out = acc.hyperbolic_mlr_ce(_t(x), t, _t(p), _t(a), c=0.3, reduction="none")
    assert torch.isnan(out[[2, 4]]).all() and torch.isfinite(out[[0, 1, 3, 5]]).all()
    p_out = p.copy()
    p_out[1] *= 2.0 / (math.sqrt(0.3) * np.linalg.norm(p_out[1]))
    assert torch.isnan(acc.hyperbolic_mlr_ce(_t(x[:2]), t[:2], _t(p_out), _t(a), c=0.3, reduction="none")).all()
    y = _points(6, 7, 0.3, seed=3)
    d = acc.poincare_distance(_t(x), _t(y), c=0.3)
    assert torch.isnan(d[2]) and torch.isfinite(d[[0, 1, 3, 4, 5]]).all()


def test_transposed_views_equal_contiguous():
    x, t, p, a = _mlr_inputs(n=5, k=17, d=18)
    xt = _t(x).t().contiguous().t()
    at = _t(a).t().contiguous().t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(acc.hyperbolic_mlr_ce(xt, t, _t(p), at, c=0.3, reduction="none"),
                               acc.hyperbolic_mlr_ce(_t(x), t, _t(p), _t(a), c=0.3, reduction="none"))
    torch.testing.assert_close(acc.poincare_distance(xt, xt.flip(0), c=0.3),
                               acc.poincare_distance(_t(x), _t(x).flip(0), c=0.3))


def test_clear_errors():
    x, t, p, a = _mlr_inputs()
    with pytest.raises(ValueError, match="c"):
        acc.hyperbolic_mlr_ce(_t(x), t, _t(p), _t(a), c=0.0)
    with pytest.raises(TypeError, match="p"):
        acc.hyperbolic_mlr_ce(_t(x), t, _t(p, torch.float16), _t(a))
    with pytest.raises(ValueError, match="a"):
        acc.hyperbolic_mlr_ce(_t(x), t, _t(p), _t(a[:2]))
    with pytest.raises(ValueError, match="z"):
        acc.hyp_pc_loss(_t(x[:5]))
    with pytest.raises(ValueError, match="clip_r"):
        acc.poincare_expmap0(_t(x), clip_r=-1.0)
    with pytest.raises(ValueError, match="y"):
        acc.poincare_distance(_t(x), _t(x[:3]))


# ------------------------------------------------------------------------------------ GPU only

cuda = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@cuda
def test_mlr_extra_memory_is_linear_in_n():
    """Forward and backward at 16384 x 1000 x 128 allocate less than one (N, K) fp32 matrix
    (the logits eager PyTorch materialises, before its (N, K, D) Möbius sum)."""
    n, k, d, c = 16384, 1000, 128, 0.1
    rng = np.random.default_rng(0)
    x = _t(ball_points(rng, n, d, c, 0.9)).cuda().requires_grad_()
    p = _t(ball_points(rng, k, d, c, 0.5)).cuda().requires_grad_()
    a = (torch.randn(k, d, device="cuda") / 11).requires_grad_()
    t = torch.randint(0, k, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = acc.hyperbolic_mlr_ce(x, t, p, a, c=c)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n * k * 4 / 16
    loss.backward()
    torch.cuda.synchronize()
    grads = 4 * (n * d + 2 * k * d)
    assert torch.cuda.max_memory_allocated() - base < grads + 3 * n * d * 4  # gradients + O(N D) scratch
    assert n * k * 4 > grads + 3 * n * d * 4


@cuda
def test_mlr_tf32_path_stays_close():
    """torch.set_float32_matmul_precision('high') switches the products to TF32 (10-bit mantissa
    inputs): the loss stays within ~1e-3 relative of the exact value at these scales."""
    x, t, p, a = _mlr_inputs(n=300, k=130, d=200, c=0.1)
    want = ref.hyperbolic_mlr_ce(x, t.numpy(), p, a, c=0.1)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = acc.hyperbolic_mlr_ce(_t(x).cuda(), t.cuda(), _t(p).cuda(), _t(a).cuda(), c=0.1)
    finally:
        torch.set_float32_matmul_precision(old)
    np.testing.assert_allclose(got.item(), want, rtol=2e-3)


@cuda
def test_expmap0_rows_past_2_pow_31_elements():
    """64-bit offsets: the last rows of a (2^22 + 3) x 512 input (more than 2^31 elements)."""
    n, d = (1 << 22) + 3, 512
    x = torch.empty(n, d, device="cuda", dtype=torch.bfloat16).normal_()
    y = acc.poincare_expmap0(x, c=0.1)
    tail = x[-3:].double().cpu().numpy()
    np.testing.assert_allclose(y[-3:].double().cpu().numpy(), ref.poincare_expmap0(tail, c=0.1), rtol=2e-2, atol=1e-3)
