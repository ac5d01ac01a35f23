"""id_cosine_loss (P4): the reference against PyTorch's cosine similarity and closed forms (zero
rows, scale invariance), and the accelerated path's behaviour beyond numerical agreement."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_module = importlib.import_module("twinops.accelerated.classification.id_cosine_loss")
from twinops.accelerated.classification.id_cosine_loss import IDCosineLoss
from twinops.accelerated.classification.id_cosine_loss import id_cosine_loss as acc_id
from twinops.reference.classification.id_cosine_loss import id_cosine_loss, id_cosine_loss_grad

REDUCTIONS = ["none", "mean", "sum"]


def _pair(b=7, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)) * 3, rng.normal(size=(b, d))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_one_minus_torch_cosine_similarity(reduction):
    """Independent anchor: torch's cosine similarity in float64 and its autograd, for both inputs."""
    u, v = _pair()
    ut, vt = (torch.tensor(x, requires_grad=True) for x in (u, v))
    rows = 1 - F.cosine_similarity(ut, vt, dim=1)
    want = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    np.testing.assert_allclose(id_cosine_loss(u, v, reduction=reduction), want.detach().numpy(), rtol=1e-13)
    g = np.linspace(0.5, 2.0, 7) if reduction == "none" else np.float64(1.3)
    gu, gv = torch.autograd.grad(want, (ut, vt), torch.tensor(g))
    got = id_cosine_loss_grad(g, u, v, reduction=reduction)
    np.testing.assert_allclose(got["pred"], gu.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got["source"], gv.numpy(), rtol=1e-12, atol=1e-14)


def test_hand_computed_rows():
    u = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    v = np.array([[0.0, 3.0], [-2.0, -2.0], [5.0, 0.0]])
    np.testing.assert_allclose(id_cosine_loss(u, v, reduction="none"), [1.0, 2.0, 0.0], atol=1e-15)
    # row 0: u = e1, v = 3 e2: d/du = -(v / 3 - 0) = (0, -1); d/dv = -(u / 3) = (-1/3, 0)
    grads = id_cosine_loss_grad(np.ones(3), u, v, reduction="none")
    np.testing.assert_allclose(grads["pred"][0], [0.0, -1.0])
    np.testing.assert_allclose(grads["source"][0], [-1 / 3, 0.0])
    np.testing.assert_allclose(grads["pred"][1:], 0.0, atol=1e-15)  # (anti)parallel rows: stationary


def test_scale_invariance():
    u, v = _pair()
    np.testing.assert_allclose(id_cosine_loss(4.0 * u, v, reduction="none"), id_cosine_loss(u, v, reduction="none"),
                               rtol=1e-13)
    g = np.ones(7)
    np.testing.assert_allclose(id_cosine_loss_grad(g, 4.0 * u, v, reduction="none")["pred"],
                               id_cosine_loss_grad(g, u, v, reduction="none")["pred"] / 4.0, rtol=1e-12)


def test_zero_rows_sit_inside_the_clamp():
    u, v = _pair(3, 4)
    u[0], v[1], u[2], v[2] = 0.0, 0.0, 0.0, 0.0
    np.testing.assert_array_equal(id_cosine_loss(u, v, reduction="none"), 1.0)
    grads = id_cosine_loss_grad(np.ones(3), u, v, reduction="none", eps=1e-6)
    np.testing.assert_allclose(grads["pred"][0], -v[0] / 1e-6)
    np.testing.assert_array_equal(grads["source"][0], 0.0)
    np.testing.assert_allclose(grads["source"][1], -u[1] / 1e-6)
    np.testing.assert_array_equal(grads["pred"][2], 0.0)
    np.testing.assert_array_equal(grads["source"][2], 0.0)


def test_reference_errors_name_the_argument():
    u, v = _pair()
    with pytest.raises(ValueError, match="source"):
        id_cosine_loss(u, v[:3])
    with pytest.raises(ValueError, match="eps"):
        id_cosine_loss(u, v, eps=0.0)
    with pytest.raises(ValueError, match="pred"):
        id_cosine_loss(u[:0], v[:0])
    with pytest.raises(ValueError, match="grad"):
        id_cosine_loss_grad(np.ones(3), u, v, reduction="none")


# --- accelerated --------------------------------------------------------------------------------


def _tensors(b=21, d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=gen) * 20, torch.randn(b, d, generator=gen)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_accelerated_matches_torch_cosine_similarity(reduction):
    u, v = _tensors()
    ua, va = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    ud, vd = u.double().requires_grad_(True), v.double().requires_grad_(True)
    got = acc_id(ua, va, reduction=reduction)
    rows = 1 - F.cosine_similarity(ud, vd, dim=1)
    want = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.rand_like(want) + 0.5
    for g, e in zip(torch.autograd.grad(got, (ua, va), w.float()), torch.autograd.grad(want, (ud, vd), w)):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6 * e.abs().max().item())


def test_module_matches_function():
    u, v = _tensors()
    torch.testing.assert_close(IDCosineLoss(reduction="sum")(u, v), acc_id(u, v, reduction="sum"))


def test_frozen_source_gets_no_gradient_and_views_are_read_in_place():
    u, v = _tensors()
    ua = u.clone().requires_grad_(True)
    loss = acc_id(ua, v.t().contiguous().t())  # a column-major source
    (gu,) = torch.autograd.grad(loss, ua)
    ub = u.clone().requires_grad_(True)
    vb = v.clone().requires_grad_(True)
    gu2, _ = torch.autograd.grad(acc_id(ub, vb), (ub, vb))
    torch.testing.assert_close(gu, gu2)


def test_zero_row_gradient_is_minus_v_over_eps():
    u, v = _tensors(3, 5)
    u[1] = 0.0
    ua = u.clone().requires_grad_(True)
    loss = acc_id(ua, v, eps=1e-4, reduction="none")
    assert loss[1].item() == 1.0
    (gu,) = torch.autograd.grad(loss, ua, torch.ones(3))
    torch.testing.assert_close(gu[1], -v[1] / 1e-4)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_id_cosine_backward_kernel", _NoLaunch())
    u, v = _tensors()
    assert acc_id(u, v).grad_fn is None
    with torch.no_grad():
        assert acc_id(u.requires_grad_(True), v).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda u, v: acc_id(u, v, reduction="sum"), fullgraph=True, backend="aot_eager")
    u, v = _tensors()
    a = [x.clone().requires_grad_(True) for x in (u, v)]
    b = [x.clone().requires_grad_(True) for x in (u, v)]
    out = fn(*a)
    out.backward()
    want = acc_id(*b, reduction="sum")
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a[0].grad, b[0].grad)
    torch.testing.assert_close(a[1].grad, b[1].grad)


@pytest.mark.parametrize("bad, match", [
    (dict(pred=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(source=torch.zeros(4, 2)), "source"),
    (dict(pred=torch.zeros(4, 3, 1)), "pred"),
    (dict(pred=torch.zeros(0, 3), source=torch.zeros(0, 3)), "pred"),
    (dict(eps=-1.0), "eps"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(pred=torch.ones(4, 3), source=torch.ones(4, 3)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc_id(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_benchmark_shape_matches_the_reference(dtype):
    """B = 4096 x D = 512 (the benchmark shape) against the float64 reference on the rounded inputs."""
    u, v = (x.to("cuda", dtype) for x in _tensors(4096, 512, seed=3))
    ua, va = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = acc_id(ua, va, reduction="none")
    gu, gv = torch.autograd.grad(out, (ua, va), torch.ones_like(out))
    u64, v64 = u.double().cpu().numpy(), v.double().cpu().numpy()
    want = id_cosine_loss(u64, v64, reduction="none")
    grads = id_cosine_loss_grad(np.ones(4096), u64, v64, reduction="none")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(out.double().cpu().numpy(), want, rtol=tol, atol=tol)
    for got, name in ((gu, "pred"), (gv, "source")):
        ref = grads[name]
        np.testing.assert_allclose(got.double().cpu().numpy(), ref, rtol=0, atol=tol * np.abs(ref).max())


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    n, d, stride = 4096, 512, 2**20 + 64
    try:
        buf = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for an 8 GiB buffer")
    buf[:, :d] = torch.randn(n, d, device="cuda").to(torch.bfloat16)
    view = buf[:, :d]
    v = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    results = []
    for u in (view, view.contiguous()):
        u = u.detach().requires_grad_(True)
        loss = acc_id(u, v, reduction="none")
        (gu,) = torch.autograd.grad(loss, u, torch.ones_like(loss))
        results.append((loss, gu))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@on_gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda u, v: acc_id(u, v), fullgraph=True)
    u, v = (x.to("cuda", torch.bfloat16) for x in _tensors(300, 512))
    a, b = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    out = fn(a, v)
    out.backward()
    want = acc_id(b, v)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, b.grad)
