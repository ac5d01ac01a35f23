"""anyloss (P6): the reference against independent forms (a hand-computed example, the confusion
matrix by plain loops, soft Dice, mean absolute error, the authors' S/TN form, single-class batches),
and the accelerated path's behaviour beyond numerical agreement (which tests/test_conformance.py
checks)."""

import importlib
import math

import numpy as np
import pytest
import torch

from twinops.accelerated.classification.anyloss import AnyLoss
from twinops.accelerated.classification.anyloss import anyloss as acc_anyloss
from twinops.reference.classification.anyloss import METRICS, anyloss, anyloss_grad

acc_module = importlib.import_module("twinops.accelerated.classification.anyloss")


def _batch(shape=(23,), seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, shape)
    y = (rng.random(shape) < 0.4).astype(np.int64)
    return p, y


def loop_loss(p, y, metric, beta=1.0, amplifier=73.0, s=1e-5):
    """One column's loss by plain loops over the samples."""
    tp = fn = fp = tn = 0.0
    for pi, yi in zip(p, y):
        a = 1.0 / (1.0 + math.exp(-amplifier * (pi - 0.5)))
        if yi == 1:
            tp, fn = tp + a, fn + 1 - a
        else:
            fp, tn = fp + a, tn + 1 - a
    pos, neg = tp + fn, fp + tn
    m = {
        "f_beta": (1 + beta**2) * tp / (beta**2 * pos + tp + fp + s),
        "g_mean": tp * tn / (pos * neg + s),
        "balanced_accuracy": (neg * tp + pos * tn) / (2 * pos * neg + s),
        "accuracy": (tp + tn) / len(p),
    }[metric]
    return 1 - m


def fd_vjp(f, x, g, h=1e-7):
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[idx] = np.sum(g * (f(xp) - f(xm))) / (2 * h)
    return out


# --- reference ----------------------------------------------------------------------------------


def test_hand_computed_example():
    # L = 2: a = sigmoid(0) = 1/2 for the positive, sigmoid(1) for the negative.
    p, y = np.array([0.5, 1.0]), np.array([1, 0])
    e = 1 / (1 + math.exp(-1))
    tp, fp, tn = 0.5, e, 1 - e
    kw = dict(amplifier=2.0, smoothing=0.0)
    assert anyloss(p, y, metric="f_beta", **kw) == pytest.approx(1 - 2 * tp / (1 + tp + fp), rel=1e-14)
    assert anyloss(p, y, metric="g_mean", **kw) == pytest.approx(1 - tp * tn, rel=1e-14)
    assert anyloss(p, y, metric="balanced_accuracy", **kw) == pytest.approx(1 - (tp + tn) / 2, rel=1e-14)
    assert anyloss(p, y, metric="accuracy", **kw) == pytest.approx(1 - (tp + tn) / 2, rel=1e-14)
    # d loss / d p for accuracy: -(2y - 1)/N * L a (1 - a)
    g = anyloss_grad(np.float64(1.0), p, y, metric="accuracy", **kw)
    np.testing.assert_allclose(g, [-0.5 * 2 * 0.25, 0.5 * 2 * e * (1 - e)], rtol=1e-14)


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_the_loop(metric):
    p, y = _batch((37,), seed=1)
    for amplifier in (73.0, 5.0):
        want = loop_loss(p, y, metric, beta=0.7, amplifier=amplifier)
        assert anyloss(p, y, metric=metric, beta=0.7, amplifier=amplifier) == pytest.approx(want, rel=1e-12)


def test_f1_is_soft_dice_and_accuracy_is_mean_absolute_error():
    p, y = _batch((50,), seed=2)
    a = 1 / (1 + np.exp(-10.0 * (p - 0.5)))
    dice = 2 * np.sum(y * a) / (np.sum(y) + np.sum(a) + 1e-5)
    assert anyloss(p, y, amplifier=10.0) == pytest.approx(1 - dice, rel=1e-13)
    assert anyloss(p, y, metric="accuracy", amplifier=10.0) == pytest.approx(np.mean(np.abs(y - a)), rel=1e-13)


def test_unsmoothed_g_mean_and_balanced_accuracy_are_rates():
    p, y = _batch((40,), seed=3)
    a = 1 / (1 + np.exp(-20.0 * (p - 0.5)))
    tpr, tnr = np.sum(y * a) / np.sum(y), np.sum((1 - y) * (1 - a)) / np.sum(1 - y)
    kw = dict(amplifier=20.0, smoothing=0.0)
    assert anyloss(p, y, metric="g_mean", **kw) == pytest.approx(1 - tpr * tnr, rel=1e-13)
    assert anyloss(p, y, metric="balanced_accuracy", **kw) == pytest.approx(1 - (tpr + tnr) / 2, rel=1e-13)


@pytest.mark.parametrize("metric", METRICS)
def test_authors_form_with_the_batch_n(metric):
    """The authors' code: S = sum a, FP = S - TP, TN = N - Y1 - S + TP, with N the batch's own size."""
    p, y = _batch((30,), seed=4)
    a = 1 / (1 + np.exp(-73.0 * (p - 0.5)))
    n, y1, s, tp = len(p), y.sum(), a.sum(), np.sum(y * a)
    fp, tn, y0 = s - tp, n - y1 - s + tp, n - y1
    m = {"f_beta": 2 * tp / (y1 + tp + fp + 1e-5), "g_mean": tp * tn / (y1 * y0 + 1e-5),
         "balanced_accuracy": (y0 * tp + y1 * tn) / (2 * y1 * y0 + 1e-5), "accuracy": (tp + tn) / n}[metric]
    assert anyloss(p, y, metric=metric) == pytest.approx(1 - m, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("label", [0, 1])
def test_single_class_batches(metric, label):
    """Y1 = 0 or Y0 = 0: finite loss and gradient; G and BAcc are 0 / s, so the loss is 1 and flat."""
    p = np.random.default_rng(5).uniform(0.3, 0.7, 12)
    y = np.full(12, label)
    loss = anyloss(p, y, metric=metric)
    g = anyloss_grad(np.float64(1.0), p, y, metric=metric)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    if metric in ("g_mean", "balanced_accuracy") or (metric == "f_beta" and label == 0):
        assert loss == 1.0
        np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_allclose(g, fd_vjp(lambda q: anyloss(q, y, metric=metric), p, 1.0), rtol=1e-5, atol=1e-7)
    assert loss == pytest.approx(loop_loss(p, y, metric), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_multilabel_columns_are_independent_tasks(reduction):
    p, y = _batch((15, 4), seed=6)
    y[:, 2] = 0
    per_column = np.array([anyloss(p[:, k], y[:, k], metric="g_mean") for k in range(4)])
    want = {"none": per_column, "mean": per_column.mean(), "sum": per_column.sum()}[reduction]
    np.testing.assert_allclose(anyloss(p, y, metric="g_mean", reduction=reduction), want, rtol=1e-14)
    g = np.array([0.3, -1.0, 2.0, 0.5]) if reduction == "none" else np.float64(1.7)
    got = anyloss_grad(g, p, y, metric="g_mean", reduction=reduction)
    fd = fd_vjp(lambda q: anyloss(q, y, metric="g_mean", reduction=reduction), p, g)
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-6)


def test_one_d_reductions_all_give_the_loss():
    p, y = _batch()
    values = [anyloss(p, y, reduction=r) for r in ("none", "mean", "sum")]
    assert np.shape(values[0]) == () and values[0] == values[1] == values[2]


def test_nan_poisons_its_column_and_infinities_have_zero_gradient():
    p, y = _batch((10, 2), seed=7)
    p[3, 1] = np.nan
    p[0, 0], p[1, 0] = np.inf, -np.inf
    for metric in METRICS:
        loss = anyloss(p, y, metric=metric, reduction="none")
        assert np.isfinite(loss[0]) and np.isnan(loss[1])
        g = anyloss_grad(np.ones(2), p, y, metric=metric, reduction="none")
        assert np.all(np.isnan(g[:, 1])) and np.all(np.isfinite(g[:, 0]))
        assert g[0, 0] == 0.0 and g[1, 0] == 0.0


@pytest.mark.parametrize("bad, error, match", [
    (dict(probs=np.zeros(0), target=np.zeros(0, int)), ValueError, "probs"),
    (dict(probs=np.array([1, 0])), TypeError, "probs"),
    (dict(target=np.array([0, 2])), ValueError, "target"),
    (dict(target=np.array([0.0, np.nan])), ValueError, "target"),
    (dict(target=np.array([0, 1, 1])), ValueError, "target"),
    (dict(metric="f1"), ValueError, "metric"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(amplifier=0.0), ValueError, "amplifier"),
    (dict(smoothing=-1.0), ValueError, "smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_reference_errors_name_the_argument(bad, error, match):
    args = dict(probs=np.array([0.2, 0.8]), target=np.array([0, 1])) | bad
    with pytest.raises(error, match=match):
        anyloss(**args)


# --- accelerated --------------------------------------------------------------------------------


def _tensors(shape=(23,), seed=0):
    p, y = _batch(shape, seed)
    return torch.tensor(p, dtype=torch.float32), torch.tensor(y)


def test_module_matches_function():
    p, y = _tensors()
    module = AnyLoss(metric="balanced_accuracy", amplifier=20.0)
    torch.testing.assert_close(module(p, y), acc_anyloss(p, y, metric="balanced_accuracy", amplifier=20.0))
    assert "balanced_accuracy" in repr(module)


def test_many_blocks_and_target_dtypes_agree_with_the_reference():
    """300 rows: 19 row blocks, combined 16 at a time; int, bool, float and uint8 targets alike."""
    p, y = _tensors((300,), seed=8)
    want = anyloss(p.double().numpy(), y.numpy(), metric="g_mean", amplifier=10.0)
    for target in (y, y.bool(), y.float(), y.to(torch.uint8)):
        got = acc_anyloss(p, target, metric="g_mean", amplifier=10.0)
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(want, rel=1e-5)


def test_forward_is_deterministic():
    p, y = _tensors((40, 3), seed=9)
    p.requires_grad_(True)
    first = acc_anyloss(p, y, reduction="none")
    second = acc_anyloss(p, y, reduction="none")
    assert torch.equal(first, second)
    (g1,) = torch.autograd.grad(first.sum(), p)
    (g2,) = torch.autograd.grad(second.sum(), p)
    assert torch.equal(g1, g2)


def test_single_class_batches_accelerated():
    p = torch.linspace(0.3, 0.7, 20)
    for label in (0, 1):
        y = torch.full((20,), label)
        for metric in ("g_mean", "balanced_accuracy"):
            pg = p.clone().requires_grad_(True)
            loss = acc_anyloss(pg, y, metric=metric)
            loss.backward()
            assert float(loss.detach()) == 1.0 and torch.equal(pg.grad, torch.zeros(20))


def test_half_precision_with_the_default_amplifier():
    """exp(36.5) overflows fp16; the kernels evaluate the sigmoid in fp32."""
    p, y = _tensors((40,), seed=10)
    ph = p.half().requires_grad_(True)
    loss = acc_anyloss(ph, y)
    loss.backward()
    assert loss.dtype == torch.float16 and ph.grad.dtype == torch.float16
    want = anyloss(ph.detach().double().numpy(), y.numpy())
    assert float(loss.detach()) == pytest.approx(want, rel=2e-3)
    assert torch.isfinite(ph.grad).all()


def test_invalid_target_gives_nan_for_its_column():
    p, y = _tensors((8, 2))
    y = y.clone()
    y[3, 1] = 2
    loss = acc_anyloss(p, y, reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_inputs_and_incoming_gradient_are_not_written():
    p, y = _tensors((20, 3))
    p.requires_grad_(True)
    p0, y0 = p.detach().clone(), y.clone()
    out = acc_anyloss(p, y, reduction="none")
    g = torch.rand_like(out) + 0.5
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(p.detach(), p0) and torch.equal(y, y0) and torch.equal(g, g0)


def test_transposed_and_strided_views_equal_contiguous():
    p, y = _tensors((17, 3))
    pt = p.t().contiguous().t()
    ys = torch.zeros(34, 3, dtype=y.dtype)
    ys[::2] = y
    torch.testing.assert_close(acc_anyloss(pt, ys[::2], reduction="none"), acc_anyloss(p, y, reduction="none"))


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_backward_kernel", _NoLaunch())
    p, y = _tensors()
    assert acc_anyloss(p, y).grad_fn is None
    with torch.no_grad():
        assert acc_anyloss(p.clone().requires_grad_(True), y).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda p, y: acc_anyloss(p, y, metric="g_mean", reduction="sum"), fullgraph=True,
                       backend="aot_eager")
    p, y = _tensors((20, 2))
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    out = fn(p1, y)
    out.backward()
    want = acc_anyloss(p2, y, metric="g_mean", reduction="sum")
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("bad, error, match", [
    (dict(probs=torch.zeros(4, dtype=torch.float64)), TypeError, "float32"),
    (dict(probs=torch.zeros(4, 1, 1), target=torch.zeros(4, 1, 1)), ValueError, "probs"),
    (dict(probs=torch.zeros(0), target=torch.zeros(0)), ValueError, "probs"),
    (dict(target=torch.zeros(5)), ValueError, "target"),
    (dict(target=torch.zeros(4, dtype=torch.complex64)), TypeError, "target"),
    (dict(target=[0, 1, 0, 1]), TypeError, "target"),
    (dict(metric="dice"), ValueError, "metric"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(amplifier=float("nan")), ValueError, "amplifier"),
    (dict(smoothing=-1e-5), ValueError, "smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_bad_arguments_are_named(bad, error, match):
    args = dict(probs=torch.full((4,), 0.5), target=torch.zeros(4, dtype=torch.long)) | bad
    with pytest.raises(error, match=match):
        acc_anyloss(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
GPU_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(16 * 512 * 512,), (100_003, 1), (70_001, 5), (4097, 33)])
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_tiles_match_the_reference(dtype, shape, metric):
    """The compiled tiles (4096 elements, 32 columns at most) on a segmentation-sized mask and on
    multilabel shapes, against the float64 reference on the rounded inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.rand(shape, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    y = (torch.rand(shape, device="cuda", generator=gen) < 0.3).to(torch.uint8)
    reduction = "none" if len(shape) == 2 else "mean"
    loss = acc_anyloss(p, y, metric=metric, reduction=reduction)
    g = torch.rand_like(loss) + 0.5
    (gp,) = torch.autograd.grad(loss, p, g)
    p64, y64 = p.detach().double().cpu().numpy(), y.cpu().numpy()
    want = anyloss(p64, y64, metric=metric, reduction=reduction)
    want_g = anyloss_grad(g.double().cpu().numpy(), p64, y64, metric=metric, reduction=reduction)
    rtol = GPU_RTOL[dtype]
    np.testing.assert_allclose(loss.double().cpu().numpy(), want, rtol=rtol, atol=1e-6 * math.sqrt(shape[0]))
    np.testing.assert_allclose(gp.double().cpu().numpy(), want_g, rtol=rtol,
                               atol=rtol * np.abs(want_g).max() + 1e-30)


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """A 1-D view with a stride of 1024 elements over 4.2M rows: offsets reach ~4.3e9 elements."""
    n, stride = 16 * 512 * 512, 1024
    try:
        buf = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for an 8 GiB buffer")
    buf[:, 0] = torch.rand(n, device="cuda").to(torch.bfloat16)
    view = buf[:, 0]
    y = (torch.rand(n, device="cuda") < 0.5).to(torch.uint8)
    results = []
    for p in (view, view.contiguous()):
        p = p.detach().requires_grad_(True)
        loss = acc_anyloss(p, y, metric="balanced_accuracy")
        (gp,) = torch.autograd.grad(loss, p)
        results.append((loss, gp))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@on_gpu
def test_gpu_extra_memory_is_small():
    """Forward + backward allocate the gradient and O(N / 4096) partial sums, nothing of size N in fp32."""
    n = 16 * 512 * 512
    p = torch.rand(n, device="cuda").to(torch.bfloat16).requires_grad_(True)
    y = (torch.rand(n, device="cuda") < 0.5).to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    acc_anyloss(p, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * 2 + 2**20, f"extra peak {extra / 2**20:.1f} MiB"


@on_gpu
def test_gpu_deterministic_and_torch_compile_fullgraph():
    torch._dynamo.reset()
    n = 16 * 512 * 512
    p = torch.rand(n, device="cuda")
    y = (torch.rand(n, device="cuda") < 0.5).float()
    assert torch.equal(acc_anyloss(p, y), acc_anyloss(p, y))
    fn = torch.compile(lambda p, y: acc_anyloss(p, y, metric="f_beta"), fullgraph=True)
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    out = fn(p1, y)
    out.backward()
    want = acc_anyloss(p2, y, metric="f_beta")
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(p1.grad, p2.grad)
