"""snnk_linear (P44): the reference against a loop, torch autograd and the random-feature kernel
identities, its defined edge cases, and the accelerated path's behaviour beyond conformance."""

import importlib
import math

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.snnk_linear")  # the package exports a function of the same name
from twinops.accelerated.layers.snnk_linear import SNNKLinear
from twinops.accelerated.layers.snnk_linear import snnk_linear as acc
from twinops.reference.layers.snnk_linear import snnk_linear as ref
from twinops.reference.layers.snnk_linear import snnk_linear_grad as ref_grad


def _data(n=4, d=3, m=5, o=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * 0.5, rng.normal(size=(m, d)), rng.normal(size=(o, m)), rng.normal(size=o),
            rng.uniform(0.3, 1.0, size=m), rng.uniform(0.5, 2.0, size=m))


def test_reference_matches_a_loop():
    x, g, w, b, a, amp = _data()
    m = g.shape[0]
    want_relu = np.zeros((4, 2))
    want_exp = np.zeros((4, 2))
    for n in range(4):
        for j in range(2):
            for i in range(m):
                s = sum(g[i, k] * x[n, k] for k in range(3))
                sq = sum(x[n, k] ** 2 for k in range(3))
                want_relu[n, j] += w[j, i] * max(s, -0.2) / math.sqrt(m)
                want_exp[n, j] += w[j, i] * amp[i] / math.sqrt(m) * math.exp(a[i] * s - a[i] ** 2 * sq / 2)
            want_relu[n, j] += b[j]
            want_exp[n, j] += b[j]
    np.testing.assert_allclose(ref(x, g, w, b, floor=-0.2), want_relu, rtol=1e-13)
    np.testing.assert_allclose(ref(x, g, w, b, a, amp, feature="exp"), want_exp, rtol=1e-13)


@pytest.mark.parametrize("feature", ["relu", "exp"])
def test_reference_gradient_matches_torch_autograd(feature):
    x, g, w, b, a, amp = _data(n=6, d=4, m=7, o=3, seed=1)
    xt, wt, bt = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    gt, at, ampt = (torch.tensor(v) for v in (g, a, amp))
    s = xt @ gt.T
    if feature == "relu":
        phi = torch.clamp(s, min=0.1) / math.sqrt(7)
        coef = {}
    else:
        phi = ampt / math.sqrt(7) * torch.exp(at * s - at**2 * (xt**2).sum(1, keepdim=True) / 2)
        coef = dict(rate=a, amplitude=amp)
    y = phi @ wt.T + bt
    up = torch.linspace(-1.0, 2.0, 18, dtype=torch.float64).reshape(6, 3)
    dx, dw, db = torch.autograd.grad(y, (xt, wt, bt), up)
    got = ref_grad(up.numpy(), x, g, w, b, **coef, feature=feature, floor=0.1 if feature == "relu" else 0.0)
    np.testing.assert_allclose(got["x"], dx.numpy(), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(got["weight"], dw.numpy(), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(got["bias"], db.numpy(), rtol=1e-12)


def test_reference_positive_random_features_estimate_the_exponential_kernel():
    """With A = a = 1 and Psi = phi(w): E[phi(x) . phi(w)] = exp(x . w) (Performer's FAVOR+)."""
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(3, 4)) * 0.3, rng.normal(size=(2, 4)) * 0.3
    g = rng.normal(size=(200_000, 4))
    m = g.shape[0]
    phi_w = np.exp(w @ g.T - (w * w).sum(1, keepdims=True) / 2) / math.sqrt(m)
    np.testing.assert_allclose(ref(x, g, phi_w, feature="exp"), np.exp(x @ w.T), rtol=2e-2)


def test_reference_relu_features_estimate_the_arc_cosine_kernel():
    """E[relu(g.x) relu(g.w)] = |x||w| (sin t + (pi - t) cos t) / (2 pi), t the angle (Cho & Saul)."""
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(2, 5)), rng.normal(size=(3, 5))
    g = rng.normal(size=(200_000, 5))
    phi_w = np.maximum(w @ g.T, 0.0) / math.sqrt(g.shape[0])
    nx, nw = np.linalg.norm(x, axis=1)[:, None], np.linalg.norm(w, axis=1)[None, :]
    t = np.arccos(np.clip(x @ w.T / (nx * nw), -1, 1))
    np.testing.assert_allclose(ref(x, g, phi_w), nx * nw * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi),
                               rtol=2e-2)


def test_reference_relu_subgradient_at_the_floor_is_zero_and_nan_rows():
    x, g, w, b, _, _ = _data()
    x[1] = 0.0
    x[2, 0] = np.nan
    up = np.ones((4, 2))
    grads = ref_grad(up, x, g, w, b)
    assert not grads["x"][1].any() and not grads["x"][2].any()  # s = 0 = floor; NaN fails s > c
    assert np.isnan(ref(x, g, w, b)[2]).all() and np.isfinite(ref(x, g, w, b)[[0, 1, 3]]).all()
    assert np.isnan(ref_grad(up, x, g, w, b, feature="exp")["x"][2]).all()


def test_reference_accepts_leading_dimensions_and_empty_rows():
    x, g, w, b, _, _ = _data(n=6)
    np.testing.assert_allclose(ref(x.reshape(2, 3, 3), g, w, b).reshape(6, 2), ref(x, g, w, b), rtol=1e-15)
    grads = ref_grad(np.zeros((0, 2)), x[:0], g, w, b)
    assert grads["x"].shape == (0, 3) and not grads["weight"].any() and not grads["bias"].any()


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(n=19, d=18, m=20, o=17, seed=0, requires_grad=False):
    x, g, w, b, a, amp = (torch.tensor(v, dtype=torch.float32) for v in _data(n, d, m, o, seed))
    if requires_grad:
        x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    return x, g, w, b, a, amp


@pytest.mark.parametrize("feature", ["relu", "exp"])
def test_module_is_the_function_with_phi_of_w_init(feature):
    torch.manual_seed(0)
    layer = SNNKLinear(6, 4, 32, feature=feature)
    assert layer.projection.shape == (32, 6) and not layer.projection.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = torch.randn(2, 3, 6) * 0.3
    want = acc(x, layer.projection, layer.weight, layer.bias, layer.rate, layer.amplitude, feature=feature)
    torch.testing.assert_close(layer(x), want)
    assert layer(x).shape == (2, 3, 4)
    # same seed, same frozen projection; eval mode changes nothing
    assert torch.equal(SNNKLinear(6, 4, 32, feature=feature).projection, layer.projection)
    torch.testing.assert_close(layer.eval()(x), want)


def test_module_orthogonal_projection_rows_are_orthogonal_within_a_block():
    layer = SNNKLinear(8, 2, 12, projection_kind="orthogonal")
    g = layer.projection.double()
    gram = (g[:8] / g[:8].norm(dim=1, keepdim=True)) @ (g[:8] / g[:8].norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("feature", ["relu", "exp"])
def test_accelerated_matches_reference_with_3d_input_and_no_bias(feature):
    x, g, w, _, a, amp = _tensors()
    coef = dict(rate=a, amplitude=amp) if feature == "exp" else {}
    x3 = x[:18].reshape(3, 6, 18)
    got = acc(x3, g, w, **coef, feature=feature)
    want = ref(x3.double().numpy(), g.double().numpy(), w.double().numpy(),
               **{k: v.double().numpy() for k, v in coef.items()}, feature=feature)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_inputs_and_incoming_gradient_are_not_written():
    x, g, w, b, a, amp = _tensors(requires_grad=True)
    before = [t.detach().clone() for t in (x, g, w, b, a, amp)]
    out = acc(x, g, w, b, a, amp, feature="exp")
    up = torch.rand_like(out)
    up0 = up.clone()
    out.backward(up)
    assert all(torch.equal(t.detach(), t0) for t, t0 in zip((x, g, w, b, a, amp), before))
    assert torch.equal(up, up0)


def test_strided_views_equal_contiguous():
    x, g, w, b, _, _ = _tensors()
    xs, gs, ws = (t.t().contiguous().t() for t in (x, g, w))
    assert not xs.is_contiguous()
    torch.testing.assert_close(acc(xs, gs, ws, b), acc(x, g, w, b))


def test_no_backward_kernel_without_grad_and_only_the_needed_ones(monkeypatch):
    calls = []
    kernels = {name: getattr(acc_mod, name) for name in ("_backward_features_kernel", "_matmul_kernel")}

    class Counting:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            calls.append(self.name)
            return kernels[self.name][grid]

    for name in kernels:
        monkeypatch.setattr(acc_mod, name, Counting(name))
    x, g, w, b, _, _ = _tensors(requires_grad=True)
    with torch.no_grad():
        assert acc(x, g, w, b).grad_fn is None
    assert acc(x.detach(), g, w.detach(), b.detach()).grad_fn is None and not calls
    acc(x.detach(), g, w.detach(), b).sum().backward()  # bias only: no kernel
    assert not calls
    acc(x.detach(), g, w, b).sum().backward()  # weight: features kernel + one matmul
    assert calls == ["_backward_features_kernel", "_matmul_kernel"]


def test_empty_rows():
    x, g, w, b, _, _ = _tensors(requires_grad=True)
    xe = x[:0].detach().requires_grad_(True)
    out = acc(xe, g, w, b)
    assert out.shape == (0, 17)
    out.sum().backward()
    assert xe.grad.shape == (0, 18) and not w.grad.any() and not b.grad.any()


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: acc(*t, feature="exp"), fullgraph=True, backend="aot_eager")
    x, g, w, b, a, amp = _tensors(n=5, d=4, m=6, o=3, requires_grad=True)
    out = fn(x, g, w, b, a, amp)
    out.sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    want = acc(x2, g, w2, b2, a, amp, feature="exp")
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for t, t2 in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(t.grad, t2.grad)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "float32"),
    (dict(projection=torch.zeros(5, 3, dtype=torch.float16)), TypeError, "projection"),
    (dict(projection=torch.zeros(5, 3, requires_grad=True)), ValueError, "frozen"),
    (dict(projection=torch.zeros(0, 3), weight=torch.zeros(2, 0)), ValueError, "projection"),
    (dict(weight=torch.zeros(2, 4)), ValueError, "weight"),
    (dict(bias=torch.zeros(3)), ValueError, "bias"),
    (dict(rate=torch.ones(5)), ValueError, "feature='exp'"),
    (dict(feature="exp", amplitude=torch.ones(4)), ValueError, "amplitude"),
    (dict(feature="tanh"), ValueError, "feature"),
    (dict(floor=float("nan")), ValueError, "floor"),
])
def test_bad_tensors_name_the_argument(change, error, match):
    args = dict(x=torch.zeros(4, 3), projection=torch.zeros(5, 3), weight=torch.zeros(2, 5), bias=torch.zeros(2))
    args |= change
    with pytest.raises(error, match=match):
        acc(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, g, w, b, _, _ = _tensors()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(x, g, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["relu", "exp"])
def test_gpu_bf16_and_tf32_against_fp64_reference(feature):
    """Benchmark-like shape on the GPU: bf16 and TF32 outputs within their dtype's error of the
    float64 reference evaluated on the same rounded inputs."""
    torch.manual_seed(0)
    n, d, m, o = 1024, 256, 256, 192
    x = (torch.randn(n, d, device="cuda") / d**0.5)
    g, w, b = torch.randn(m, d, device="cuda"), torch.randn(o, m, device="cuda") / m**0.5, torch.randn(o, device="cuda")
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 2e-3)):
        xs, gs, ws, bs = (t.to(dtype) for t in (x, g, w, b))
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            got = acc(xs, gs, ws, bs, feature=feature).double().cpu().numpy()
        finally:
            torch.set_float32_matmul_precision(prev)
        want = ref(*(t.double().cpu().numpy() for t in (xs, gs, ws, bs)), feature=feature)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    n, d, m, o = 64, 64, 32, 32
    k = 2**31 // (n * d) + 1
    buf = torch.zeros((k * n, d), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, d, device="cuda", dtype=torch.bfloat16) / 8)
    assert x.stride(0) * (n - 1) > 2**31
    g, w = torch.randn(m, d, device="cuda", dtype=torch.bfloat16), torch.randn(o, m, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(acc(x, g, w).float(), acc(x.contiguous(), g, w).float())
