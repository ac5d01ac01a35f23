"""supcon_loss (P58): the reference against independent forms (a per-anchor loop, a hand-computed
example, SimCLR's NT-Xent as a cross-entropy, identities), and the accelerated path's behaviour
beyond numerical agreement (which tests/test_conformance.py checks)."""

import importlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_module = importlib.import_module("twinops.accelerated.metric.supcon_loss")  # the package exports a function of the same name
from twinops.accelerated.metric.supcon_loss import SupConLoss
from twinops.accelerated.metric.supcon_loss import supcon_loss as acc_supcon
from twinops.reference.metric.supcon_loss import supcon_loss, supcon_loss_grad

REDUCTIONS = ["none", "mean", "sum"]


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_supcon(z, y, tau, tau_b):
    """The paper's formula anchor by anchor, in plain Python."""
    n = len(y)
    out = []
    for i in range(n):
        logits = {a: float(np.dot(z[i], z[a])) / tau for a in range(n) if a != i}
        positives = [p for p in logits if y[p] == y[i]]
        if not positives:
            out.append(0.0)
            continue
        log_denominator = math.log(sum(math.exp(v) for v in logits.values()))
        out.append(-(tau / tau_b) * sum(logits[p] - log_denominator for p in positives) / len(positives))
    return np.array(out)


def fd_vjp(f, x, g, h=1e-6):
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[idx] = np.sum(g * (f(xp) - f(xm))) / (2 * h)
    return out


# --- reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_the_per_anchor_loop(reduction):
    z = unit_rows(9, 4) * 1.5
    y = np.array([0, 1, 0, 2, 1, 0, 3, -1, -1])  # anchors 3 and 6 have no positive
    rows = loop_supcon(z, y, 0.2, 0.3)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    got = supcon_loss(z, y, temperature=0.2, base_temperature=0.3, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_hand_computed_example():
    """z0 = (1, 0), z1 = (0, 1), z2 = (-1, 0), tau = tau_b = 1: logits l01 = l12 = 0, l02 = -1.
    Anchor 0 (positive 1): log(e^0 + e^-1) - 0; anchor 1 (positive 0): log(e^0 + e^0) - 0;
    anchor 2 has no positive: 0."""
    z = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = np.array([5, 5, 6])
    want = np.array([math.log(1 + math.exp(-1)), math.log(2), 0.0])
    np.testing.assert_allclose(supcon_loss(z, y, temperature=1.0, base_temperature=1.0, reduction="none"), want)
    np.testing.assert_allclose(supcon_loss(z, y, temperature=1.0, base_temperature=1.0), want.mean())


def test_two_views_with_index_labels_is_nt_xent():
    """SimCLR's NT-Xent: each row's only positive is its other view, a cross-entropy over j != i."""
    b, tau = 5, 0.5
    z = unit_rows(2 * b, 6, seed=1)
    y = np.concatenate([np.arange(b), np.arange(b)])
    logits = torch.tensor(z @ z.T / tau).fill_diagonal_(float("-inf"))
    partner = torch.tensor(np.concatenate([np.arange(b, 2 * b), np.arange(b)]))
    want = F.cross_entropy(logits, partner, reduction="none").numpy()
    np.testing.assert_allclose(supcon_loss(z, y, temperature=tau, base_temperature=tau, reduction="none"), want,
                               rtol=1e-12)


def test_temperature_rescaling_identity():
    """Scaling the features by c and the temperature by c^2 leaves the logits, so the loss, unchanged
    (base_temperature scaled too, to keep tau / tau_b)."""
    z, y = unit_rows(7, 3), np.array([0, 0, 1, 1, 2, 2, 2])
    a = supcon_loss(z, y, temperature=0.1, base_temperature=0.07, reduction="none")
    b = supcon_loss(3.0 * z, y, temperature=0.9, base_temperature=0.63, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_rows_permute_with_the_anchors():
    z, y = unit_rows(8, 5), np.array([0, 1, 0, 2, 1, 0, 3, 2])
    perm = np.random.default_rng(3).permutation(8)
    g = np.linspace(0.5, 2.0, 8)
    np.testing.assert_allclose(supcon_loss(z[perm], y[perm], reduction="none"),
                               supcon_loss(z, y, reduction="none")[perm], rtol=1e-12)
    np.testing.assert_allclose(supcon_loss_grad(g[perm], z[perm], y[perm], reduction="none"),
                               supcon_loss_grad(g, z, y, reduction="none")[perm], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradient_against_finite_differences(reduction):
    z = unit_rows(7, 3, seed=2) * 1.3
    y = np.array([0, 1, 0, 2, 1, 0, 1])  # anchor 3 has no positive but is every other anchor's negative
    g = np.linspace(-1.0, 2.0, 7) if reduction == "none" else np.float64(1.7)
    kw = dict(temperature=0.3, base_temperature=0.2, reduction=reduction)
    analytic = supcon_loss_grad(g, z, y, **kw)
    numeric = fd_vjp(lambda x: supcon_loss(x, y, **kw), z, g)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)
    assert np.abs(analytic[3]).max() > 0  # the column term reaches an anchor without positives


def test_anchors_without_positives_count_in_the_mean():
    z, y = unit_rows(4, 3), np.array([0, 0, 1, 2])
    rows = supcon_loss(z, y, reduction="none")
    assert rows[2] == 0.0 and rows[3] == 0.0
    assert supcon_loss(z, y) == pytest.approx(rows.sum() / 4, rel=1e-14)
    assert supcon_loss(z[:1], y[:1]) == 0.0
    assert np.all(supcon_loss_grad(1.0, z[:1], y[:1]) == 0.0)
    np.testing.assert_array_equal(supcon_loss_grad(1.0, z, np.arange(4)), 0.0)  # no positives anywhere


def test_reference_errors_name_the_argument():
    z, y = unit_rows(3, 2), np.array([0, 1, 0])
    with pytest.raises(ValueError, match="features"):
        supcon_loss(z.reshape(3, 1, 2), y)
    with pytest.raises(ValueError, match="features"):
        supcon_loss(np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, y[:2])
    with pytest.raises(TypeError, match="labels"):
        supcon_loss(z, y.astype(float))
    with pytest.raises(ValueError, match="base_temperature"):
        supcon_loss(z, y, base_temperature=-1.0)
    with pytest.raises(ValueError, match="grad"):
        supcon_loss_grad(np.ones(2), z, y, reduction="none")


# --- accelerated --------------------------------------------------------------------------------


def _batch(n=13, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return z, torch.randint(0, 4, (n,), generator=g)


def test_accelerated_two_views_is_nt_xent():
    """Independent anchor for the kernels: torch's cross-entropy over j != i, forward and backward."""
    b, tau = 9, 0.2
    z, _ = _batch(2 * b, 5)
    y = torch.arange(2 * b) % b
    partner = (torch.arange(2 * b) + b) % (2 * b)
    za, zd = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    got = acc_supcon(za, y, temperature=tau, base_temperature=tau)
    want = F.cross_entropy((zd @ zd.T / tau).fill_diagonal_(float("-inf")), partner)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(za.grad.double(), zd.grad, rtol=1e-4, atol=1e-6)


def test_module_matches_function():
    z, y = _batch()
    torch.testing.assert_close(SupConLoss(temperature=0.2, reduction="sum")(z, y),
                               acc_supcon(z, y, temperature=0.2, reduction="sum"))


def test_inputs_and_incoming_gradient_are_not_written():
    z, y = _batch()
    z = z.requires_grad_(True)
    z0, y0 = z.detach().clone(), y.clone()
    out = acc_supcon(z, y, reduction="none")
    g = torch.rand_like(out) + 0.5
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(z.detach(), z0) and torch.equal(y, y0) and torch.equal(g, g0)


def test_transposed_and_strided_views_equal_contiguous():
    z, y = _batch(17, 9)
    zt = z.t().contiguous().t()
    ys = torch.zeros(34, dtype=y.dtype)
    ys[::2] = y
    torch.testing.assert_close(acc_supcon(zt, ys[::2], reduction="none"), acc_supcon(z, y, reduction="none"))


def test_resident_and_streamed_paths_agree(monkeypatch):
    """fp32 D = 40 is streamed under the interpreter (fp32 workspace, D walked in 16-wide steps); with
    a wider resident limit the same call is resident. Both give the same loss and gradient."""
    z, y = _batch(20, 40)
    results = []
    for resident_d in (16, 128):
        launch = dataclasses.replace(acc_module.INTERPRETER_LAUNCH, resident_d=resident_d)
        monkeypatch.setattr(acc_module, "INTERPRETER_LAUNCH", launch)
        assert acc_module._backward_launch(z)["RESIDENT"] == (resident_d == 128)
        zg = z.clone().requires_grad_(True)
        loss = acc_supcon(zg, y, reduction="sum")
        loss.backward()
        results.append((loss, zg.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_supcon_backward_kernel", _NoLaunch())
    z, y = _batch()
    out = acc_supcon(z, y)  # features do not require grad
    assert out.grad_fn is None
    zg = z.clone().requires_grad_(True)
    with torch.no_grad():
        assert acc_supcon(zg, y).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, y: acc_supcon(z, y, temperature=0.1), fullgraph=True, backend="aot_eager")
    z, y = _batch()
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = fn(z1, y)
    out.backward()
    want = acc_supcon(z2, y, temperature=0.1)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(features=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(features=torch.zeros(4, 2, 3)), "features"),
    (dict(features=torch.zeros(0, 3), labels=torch.zeros(0, dtype=torch.long)), "features"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(4)), "labels"),
    (dict(temperature=0.0), "temperature"),
    (dict(base_temperature=float("inf")), "base_temperature"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(features=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.long)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc_supcon(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
# (loss rtol, gradient tolerance relative to the largest gradient entry) per dtype on the GPU.
GPU_TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.6e-2, 2e-2)}


def _gpu_check(z, y, dtype, loss_rtol, grad_tol, **kw):
    """Loss rows and the gradient of the compiled kernels against the float64 reference on the
    rounded inputs."""
    n = z.shape[0]
    g = np.random.default_rng(1).uniform(0.5, 2.0, n)
    zt = z.detach().to(dtype).requires_grad_(True)
    out = acc_supcon(zt, y, reduction="none", **kw)
    (gz,) = torch.autograd.grad(out, zt, torch.tensor(g, device=zt.device, dtype=dtype))
    z64, y64 = zt.detach().double().cpu().numpy(), y.cpu().numpy()
    g64 = torch.tensor(g).to(dtype).double().numpy()
    want = supcon_loss(z64, y64, reduction="none", **kw)
    want_g = supcon_loss_grad(g64, z64, y64, reduction="none", **kw)
    assert out.dtype == dtype and gz.dtype == dtype
    np.testing.assert_allclose(out.double().cpu().numpy(), want, rtol=loss_rtol, atol=loss_rtol * np.abs(want).max())
    np.testing.assert_allclose(gz.double().cpu().numpy(), want_g, rtol=0, atol=grad_tol * np.abs(want_g).max())


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, d", [(1000, 64), (777, 256), (513, 300), (257, 1024)])
def test_gpu_tiles_match_the_reference(dtype, n, d):
    """Resident (D <= 256, fp32 <= 128) and streamed (fp32 workspace) paths at 64/128-wide tiles."""
    z = torch.tensor(unit_rows(n, d, seed=n), device="cuda")
    y = torch.randint(0, 40, (n,), device="cuda")
    _gpu_check(z, y, dtype, *GPU_TOLERANCE[dtype], temperature=0.1, base_temperature=0.07)


@on_gpu
def test_gpu_tf32_follows_the_matmul_precision():
    """fp32 at torch.set_float32_matmul_precision("high") multiplies in TF32 (10-bit mantissa)."""
    z = torch.tensor(unit_rows(600, 128, seed=5), device="cuda")
    y = torch.randint(0, 20, (600,), device="cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _gpu_check(z, y, torch.float32, 5e-3, 1e-2, temperature=0.1)
    finally:
        torch.set_float32_matmul_precision(previous)


@on_gpu
def test_gpu_extra_memory_is_linear_in_the_batch():
    """B = 16384, D = 256, bf16: forward + backward allocate the gradient and O(B) statistics, far below
    the 1 GiB one fp32 B x B matrix takes (the benchmark's bound is 5% of the eager baseline's peak)."""
    n, d = 16384, 256
    z = F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, 1000, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    acc_supcon(z, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.05 * n * n * 4, f"extra peak {extra / 2**20:.1f} MiB"
    assert extra < 2 * n * d * 2 + 2**20 * 4, f"extra peak {extra / 2**20:.1f} MiB"


@on_gpu
@pytest.mark.parametrize("d", [64, 300])
def test_gpu_offsets_beyond_2_to_the_31(d):
    """A (4096, D) view whose rows are 2**20 + 64 elements apart: offsets reach ~4.3e9 elements."""
    n, stride = 4096, 2**20 + 64
    try:
        buf = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for an 8 GiB buffer")
    buf[:, :d] = F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(torch.bfloat16)
    view = buf[:, :d]
    y = torch.randint(0, 100, (n,), device="cuda")
    results = []
    for z in (view, view.contiguous()):
        z = z.detach().requires_grad_(True)  # detach keeps the strides
        loss = acc_supcon(z, y, reduction="none")
        (gz,) = torch.autograd.grad(loss, z, torch.ones_like(loss))
        results.append((loss, gz))
    assert results[0][1].shape == (n, d)
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@on_gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, y: acc_supcon(z, y, temperature=0.1), fullgraph=True)
    z = F.normalize(torch.randn(300, 128, device="cuda"), dim=1).to(torch.bfloat16)
    y = torch.randint(0, 10, (300,), device="cuda")
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = fn(z1, y)
    out.backward()
    want = acc_supcon(z2, y, temperature=0.1)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z1.grad, z2.grad)
