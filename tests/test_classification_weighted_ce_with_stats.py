"""Weighted CE with per-sample statistics (P55): the reference against hand-computed values and
torch, the kernels' behaviour."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinops.conformance.baselines.classification.weighted_ce_with_stats import weighted_ce_with_stats as eager
from twinops.accelerated.classification.weighted_ce_with_stats import WeightedCEWithStats, weighted_ce_with_stats

ref_mod = importlib.import_module("twinops.reference.classification.weighted_ce_with_stats")

ref, ref_grad = ref_mod.weighted_ce_with_stats, ref_mod.weighted_ce_with_stats_grad


def test_reference_hand_computed():
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0]])  # p = [1/4, 3/4] and [1/2, 1/2]
    loss, h, pmax, py, margin = ref(logits, np.array([0, 1]), np.array([2.0, 1.0]), reduction="none")
    np.testing.assert_allclose(loss, [2 * math.log(4.0), math.log(2.0)])
    np.testing.assert_allclose(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)])
    np.testing.assert_allclose(pmax, [0.75, 0.5])
    np.testing.assert_allclose(py, [0.25, 0.5])
    np.testing.assert_allclose(margin, [-0.5, 0.0], atol=1e-15)
    mean = ref(logits, np.array([0, 1]), np.array([2.0, 1.0]))[0]
    normalized = ref(logits, np.array([0, 1]), np.array([2.0, 1.0]), reduction="normalized")[0]
    assert mean == pytest.approx((2 * math.log(4.0) + math.log(2.0)) / 2)
    assert normalized == pytest.approx((2 * math.log(4.0) + math.log(2.0)) / 3)


def test_reference_against_torch_float64():
    rng = np.random.default_rng(0)
    z, y, w = rng.normal(size=(6, 9)) * 3, np.array([0, 3, -100, 8, 1, 2]), rng.uniform(0, 2, 6)
    zt = torch.tensor(z, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    active = torch.tensor(y != -100)
    ce = F.cross_entropy(zt, torch.tensor(y), ignore_index=-100, reduction="none")
    want = (wt * ce).sum() / (wt * active).sum()
    g = 1.7
    gz, gw = torch.autograd.grad(want, (zt, wt), torch.tensor(g, dtype=torch.float64))
    assert ref(z, y, w, reduction="normalized")[0] == pytest.approx(want.item(), rel=1e-12)
    got = ref_grad(np.float64(g), z, y, w, reduction="normalized")
    np.testing.assert_allclose(got["logits"], gz.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["sample_weight"], gw.numpy(), rtol=1e-10, atol=1e-14)
    p = torch.softmax(torch.tensor(z), -1)
    ent = -(p * p.log()).sum(-1).numpy()
    np.testing.assert_allclose(ref(z, y, w)[1], np.where(y != -100, ent, 0.0), rtol=1e-12)


def test_empty_averages_are_zero():
    z = np.random.default_rng(1).normal(size=(3, 4))
    assert ref(z, np.array([0, 1, 2]), np.zeros(3), reduction="normalized")[0] == 0.0
    assert ref(z, np.full(3, -100), np.ones(3))[0] == 0.0
    g = ref_grad(np.float64(1.0), z, np.array([0, 1, 2]), np.zeros(3), reduction="normalized")
    assert not g["logits"].any() and not g["sample_weight"].any()
    x = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    w = torch.zeros(3, requires_grad=True)
    loss = weighted_ce_with_stats(x, torch.tensor([0, 1, 2]), w, reduction="normalized")[0]
    assert loss.item() == 0.0
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert not gx.any() and not gw.any()


@pytest.mark.parametrize("reduction", ["mean", "normalized", "sum", "none"])
def test_kernel_matches_torch(reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=g) * 4  # 70 classes: three 32-wide chunks
    t = torch.tensor([0, 69, -100, 33, 31])
    w = torch.rand(5, generator=g) + 0.1
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = weighted_ce_with_stats(xg, t, wg, reduction=reduction)
    xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
    want = eager(xd, t, wd, reduction=reduction)  # independent of our kernels
    for a, b in zip(out, want):
        np.testing.assert_allclose(a.detach().double().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    up = torch.rand_like(out[0]) + 0.5
    got = torch.autograd.grad(out[0], (xg, wg), up)
    ref_g = torch.autograd.grad(want[0], (xd, wd), up.double())
    for a, b in zip(got, ref_g):
        np.testing.assert_allclose(a.double().numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    assert all(s.grad_fn is None for s in out[1:])


def test_module_views_and_inputs_untouched():
    x = torch.randn(4, 33)
    xt = x.t().contiguous().t()
    t = torch.tensor([0, 32, 5, -100])
    w = torch.tensor([1.0, 0.5, 2.0, float("nan")])  # NaN weight on the ignored row: no effect
    before = (x.clone(), w.clone())
    got = WeightedCEWithStats(reduction="normalized")(xt, t, w)
    want = weighted_ce_with_stats(x, t, w, reduction="normalized")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(got[0])
    assert torch.equal(x, before[0]) and torch.equal(w.isnan(), before[1].isnan())


def test_compile_and_no_weight_gradient_unless_asked():
    x = torch.randn(3, 20, requires_grad=True)
    t = torch.tensor([1, 2, 19])
    w = torch.rand(3)
    fn = torch.compile(lambda x, t, w: weighted_ce_with_stats(x, t, w)[0], fullgraph=True, backend="aot_eager")
    (gx,) = torch.autograd.grad(fn(x, t, w), (x,))
    x2 = x.detach().clone().requires_grad_(True)
    (gx2,) = torch.autograd.grad(weighted_ce_with_stats(x2, t, w)[0], (x2,))
    torch.testing.assert_close(gx, gx2)
    assert weighted_ce_with_stats(x.detach(), t, w)[0].grad_fn is None


def test_clear_errors_and_invalid_label():
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sample_weight"):
        weighted_ce_with_stats(x, t, torch.ones(3))
    with pytest.raises(TypeError, match="sample_weight"):
        weighted_ce_with_stats(x, t, torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction"):
        weighted_ce_with_stats(x, t, torch.ones(2), reduction="avg")
    out = weighted_ce_with_stats(x, torch.tensor([0, 3]), torch.ones(2), reduction="none")
    assert all(torch.isnan(o[1]) and torch.isfinite(o[0]) for o in out)


@pytest.mark.gpu
def test_gpu_bf16_vocabulary_rows_offsets_past_2_31_and_inductor_compile():
    """Rows of a 128256-class bf16 buffer whose last row starts past 2**31 elements, against the
    same rows made contiguous and against float64 torch; inductor-compiled forward and backward."""
    n, c = 4, 128256
    k = 2**31 // (n * c) + 1
    buf = torch.zeros((k * n, c), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, c, device="cuda") * 3)
    assert x.stride(0) * (n - 1) > 2**31
    t = torch.tensor([0, c - 1, -100, 12345], device="cuda")
    w = torch.rand(n, device="cuda").bfloat16()
    got = weighted_ce_with_stats(x, t, w, reduction="none")
    for a, b in zip(got, weighted_ce_with_stats(x.contiguous(), t, w, reduction="none")):
        torch.testing.assert_close(a, b)
    want = eager(x.double(), t, w.double(), reduction="none")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1.6e-2, atol=1e-3)
    xc = x.contiguous().requires_grad_(True)
    compiled = torch.compile(lambda x, t, w: weighted_ce_with_stats(x, t, w, reduction="normalized")[0], fullgraph=True)
    (g,) = torch.autograd.grad(compiled(xc, t, w), xc)
    (g_eager,) = torch.autograd.grad(weighted_ce_with_stats(xc, t, w, reduction="normalized")[0], xc)
    torch.testing.assert_close(g, g_eager)
