"""kd_landmark_loss (P14): the reference against a hand-computed example and the authors' own
decomposition (three reduce_means, the threshold taken at the reflected tolerant teacher), and the
accelerated path's behaviour beyond numerical agreement (which tests/test_conformance.py checks)."""

import importlib

import numpy as np
import pytest
import torch

acc_module = importlib.import_module("twinops.accelerated.classification.kd_landmark_loss")
from twinops.accelerated.classification.kd_landmark_loss import KDLandmarkLoss
from twinops.accelerated.classification.kd_landmark_loss import kd_landmark_loss as acc_kd
from twinops.reference.classification.kd_landmark_loss import kd_landmark_loss, kd_landmark_loss_grad

# Three coordinates (g = 0 each): p beyond both teachers; p inside the tough teacher's push band
# with o = g; p within b of the ground truth.
P = np.array([[0.5, 0.5, 0.05]])
G = np.zeros((1, 3))
U = np.array([[0.25, 1.0, 1.0]])
O = np.array([[-0.125, 0.0, 0.5]])


def test_hand_computed_example():
    """Coordinate 0: T_u = 0.25, T_o = 0.125 (reflected), both pull: 1.9·0.25 + 1.8·0.375; e = 0.5 > d
    = 0.125: m = 0.25 + 0.375 - 0.015625. Coordinate 1: b_u = 0.15 < p < T_u = 1: push, -0.45·0.5;
    o = g: m = e^2 = 0.25. Coordinate 2: p < b for both teachers, e = 0.05 <= 0.5: m = 0.15."""
    want = np.array([[2 * 0.609375 + 0.475 + 0.675, 2 * 0.25 - 0.225, 2 * 0.15]])
    np.testing.assert_allclose(kd_landmark_loss(P, G, U, O, reduction="none"), want, rtol=1e-14)
    np.testing.assert_allclose(kd_landmark_loss(P, G, U, O), want.mean(), rtol=1e-14)
    np.testing.assert_allclose(kd_landmark_loss(P, G, U, O, reduction="sum"), want.sum(), rtol=1e-14)
    slope = np.array([[2 * 1.0 + 1.9 + 1.8, 2 * 1.0 + 0.45, 2 * 3.0]])
    np.testing.assert_allclose(kd_landmark_loss_grad(np.ones((1, 3)), P, G, U, O, reduction="none"), slope,
                               rtol=1e-14)
    np.testing.assert_allclose(kd_landmark_loss_grad(2.0, P, G, U, O), 2.0 * slope / 3, rtol=1e-14)


def authors_kd_loss(p, g, u, o, a_u=1.9, a_u_neg=-0.45, a_o=1.8, a_o_neg=-0.4, w_main=2.0, w_u=1.0, w_o=1.0):
    """aliprf/KD-Loss ``kd_loss`` line by line in NumPy (the teachers reassigned before b is formed,
    the main threshold measured at the reflected tolerant teacher)."""
    x_tough = g + np.sign(p - g) * np.abs(u - g)
    b_tough = g + np.sign(p - g) * np.abs(x_tough - g) * 0.15
    x_tol = g + np.sign(p - g) * np.abs(o - g)
    b_tol = g + np.sign(p - g) * np.abs(x_tol - g) * 0.15
    tou_map = (np.where(np.sign(p - x_tough) * np.sign(x_tough - g) > 0, a_u, 0.0)
               + np.where(np.sign(x_tough - p) * np.sign(p - b_tough) >= 0, a_u_neg, 0.0))
    tol_map = (np.where(np.sign(p - x_tol) * np.sign(x_tol - g) > 0, a_o, 0.0)
               + np.where(np.sign(x_tol - p) * np.sign(p - b_tol) >= 0, a_o_neg, 0.0))
    low = np.where(np.abs(g - p) <= np.abs(g - x_tol), 1.0, 0.0)
    high = np.where(np.abs(g - p) > np.abs(g - x_tol), 1.0, 0.0)
    main = w_main * (np.mean(high * (np.square(g - p) + 3 * np.abs(g - x_tol) - np.square(g - x_tol)))
                     + np.mean(low * 3 * np.abs(g - p)))
    return main + w_u * np.mean(tou_map * np.abs(x_tough - p)) + w_o * np.mean(tol_map * np.abs(x_tol - p))


def test_reference_matches_the_authors_code():
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 1, (6, 10))
    u, o = g + rng.normal(0, 0.02, g.shape), g + rng.normal(0, 0.05, g.shape)
    p = g + rng.normal(0, 0.05, g.shape)
    p[0, :3] = g[0, :3]  # p = g: the code's reflected threshold and |g - o| give the same m = 0
    o[1, :2] = g[1, :2]
    assert kd_landmark_loss(p, g, u, o) == pytest.approx(authors_kd_loss(p, g, u, o), rel=1e-13)
    hyper = dict(alpha_tough=1.0, alpha_tough_neg=-0.2, alpha_tolerant=0.5, alpha_tolerant_neg=-0.1,
                 main_weight=1.0, tough_weight=0.5, tolerant_weight=2.0)
    want = authors_kd_loss(p, g, u, o, 1.0, -0.2, 0.5, -0.1, 1.0, 0.5, 2.0)
    assert kd_landmark_loss(p, g, u, o, **hyper) == pytest.approx(want, rel=1e-13)


def test_reference_gradient_against_finite_differences():
    rng = np.random.default_rng(1)
    g = rng.integers(-100, 100, (3, 5)) / 128
    u, o = g + rng.integers(-20, 20, g.shape) / 128, g + rng.integers(-20, 20, g.shape) / 128
    p = g + rng.integers(-60, 60, g.shape) / 128 + 1 / 1024  # off the grid: no region edge within h
    w = rng.normal(size=g.shape)
    analytic = kd_landmark_loss_grad(w, p, g, u, o, reduction="none")
    h = 1e-7
    numeric = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
        pp, pm = p.copy(), p.copy()
        pp[idx] += h
        pm[idx] -= h
        numeric[idx] = np.sum(w * (kd_landmark_loss(pp, g, u, o, reduction="none")
                                   - kd_landmark_loss(pm, g, u, o, reduction="none"))) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-6)


def test_ties_follow_the_code():
    """p = g: loss and gradient 0 whatever the teachers; p = T: the push map is active (>= 0) but
    multiplies 0, and its gradient term is sign(0) = 0; p = b (reflection 0.5): the push term counts."""
    g = np.zeros((1, 1))
    assert kd_landmark_loss(g, g, g + 0.3, g - 0.2) == 0.0
    assert kd_landmark_loss_grad(1.0, g, g, g + 0.3, g - 0.2)[0, 0] == 0.0
    at_t = kd_landmark_loss(g + 0.25, g, g + 0.25, g + 1.0, main_weight=0.0, tolerant_weight=0.0)
    assert at_t == 0.0
    assert kd_landmark_loss_grad(1.0, g + 0.25, g, g + 0.25, g + 1.0, main_weight=0.0, tolerant_weight=0.0) == 0.0
    at_b = kd_landmark_loss(g + 0.25, g, g + 0.5, g, main_weight=0.0, tolerant_weight=0.0, reflection=0.5)
    assert at_b == pytest.approx(-0.45 * 0.25)


def test_reference_errors_name_the_argument():
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="tolerant"):
        kd_landmark_loss(x, x, x, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="reflection"):
        kd_landmark_loss(x, x, x, x, reflection=2.0)
    with pytest.raises(ValueError, match="pred"):
        kd_landmark_loss(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="grad"):
        kd_landmark_loss_grad(np.ones(3), x, x, x, x, reduction="none")


# --- accelerated --------------------------------------------------------------------------------


def _inputs(n=19, k=36, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(n, k, generator=gen)
    noisy = lambda s: g + s * torch.randn(n, k, generator=gen)
    return noisy(0.05), g, noisy(0.01), noisy(0.03)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_accelerated_matches_the_eager_authors_form(reduction):
    from twinops.conformance.baselines.classification.kd_landmark_loss import kd_landmark_loss as eager

    p, g, u, o = _inputs()
    pa, pe = p.clone().requires_grad_(True), p.double().requires_grad_(True)
    got = acc_kd(pa, g, u, o, reduction=reduction)
    want = eager(pe, g.double(), u.double(), o.double(), reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.rand_like(want) + 0.5
    (ga,) = torch.autograd.grad(got, pa, w.float())
    (ge,) = torch.autograd.grad(want, pe, w)
    torch.testing.assert_close(ga.double(), ge, rtol=1e-5, atol=1e-7)


def test_module_matches_function():
    p, g, u, o = _inputs()
    torch.testing.assert_close(KDLandmarkLoss(reflection=0.3, reduction="sum")(p, g, u, o),
                               acc_kd(p, g, u, o, reflection=0.3, reduction="sum"))


def test_mixed_dtypes_and_views():
    """fp16 teachers with an fp32 student: fp32 result, the same as with the teachers upcast;
    transposed views read in place."""
    p, g, u, o = _inputs()
    half = acc_kd(p, g, u.half(), o.half(), reduction="none")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, acc_kd(p, g, u.half().float(), o.half().float(), reduction="none"))
    pt = p.t().contiguous().t()
    torch.testing.assert_close(acc_kd(pt, g, u, o, reduction="none"), acc_kd(p, g, u, o, reduction="none"))


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_kd_backward_kernel", _NoLaunch())
    p, g, u, o = _inputs()
    assert acc_kd(p, g, u, o).grad_fn is None
    with torch.no_grad():
        assert acc_kd(p.requires_grad_(True), g, u, o).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda *x: acc_kd(*x, reflection=0.2), fullgraph=True, backend="aot_eager")
    p, g, u, o = _inputs()
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    out = fn(p1, g, u, o)
    out.backward()
    want = acc_kd(p2, g, u, o, reflection=0.2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(pred=torch.zeros(4, 6, dtype=torch.float64)), "float32"),
    (dict(target=torch.zeros(4, 5)), "target"),
    (dict(tough=torch.zeros(4, 6, requires_grad=True)), "tough"),
    (dict(tolerant=torch.zeros(4, 6, 1)), "tolerant"),
    (dict(pred=torch.zeros(0, 6), target=torch.zeros(0, 6), tough=torch.zeros(0, 6), tolerant=torch.zeros(0, 6)),
     "pred"),
    (dict(reflection=-0.1), "reflection"),
    (dict(alpha_tough=float("nan")), "alpha_tough"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(pred=torch.zeros(4, 6), target=torch.zeros(4, 6), tough=torch.zeros(4, 6),
                tolerant=torch.zeros(4, 6)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc_kd(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_benchmark_shape_matches_the_reference(dtype):
    """N = 256 x 2L = 196 on 2^-10 grid values (exact in every dtype, so regions decide alike)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(100, 900, (256, 196), generator=gen) / 1024
    p = g + torch.randint(-60, 60, g.shape, generator=gen) / 1024 + 1 / 4096
    u, o = g + torch.randint(-10, 10, g.shape, generator=gen) / 1024, g + torch.randint(-30, 30, g.shape, generator=gen) / 1024
    x = [t.to("cuda", dtype) for t in (p, g, u, o)]
    x[0].requires_grad_(True)
    out = acc_kd(*x, reduction="none")
    (gp,) = torch.autograd.grad(out, x[0], torch.ones_like(out))
    x64 = [t.detach().double().cpu().numpy() for t in x]
    want = kd_landmark_loss(*x64, reduction="none")
    want_g = kd_landmark_loss_grad(np.ones_like(want), *x64, reduction="none")
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(out.double().cpu().numpy(), want, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(gp.double().cpu().numpy(), want_g, rtol=rtol, atol=rtol)
    mean = acc_kd(*[t.detach() for t in x])
    assert mean.item() == pytest.approx(want.mean(), rel=max(rtol, 1e-5))


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    n, k, stride = 4096, 196, 2**20 + 64
    try:
        buf = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for an 8 GiB buffer")
    buf[:, :k] = torch.rand(n, k, device="cuda").to(torch.bfloat16)
    view = buf[:, :k]
    g = view.contiguous() + 0.01
    results = []
    for p in (view, view.contiguous()):
        p = p.detach().requires_grad_(True)
        loss = acc_kd(p, g, g + 0.02, g - 0.03, reduction="none")
        (gp,) = torch.autograd.grad(loss, p, torch.ones_like(loss))
        results.append((loss, gp))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
