"""DRM's entropy-weighted head ensemble (P32): the reference against hand computations, a loop form
and the limits of its semantics; the accelerated path's behaviour beyond numerical agreement."""

import math

import numpy as np
import pytest
import torch

from twinops.accelerated.classification.drm_ensemble import DRMEnsemble
from twinops.accelerated.classification.drm_ensemble import drm_ensemble as acc_drm
from twinops.conformance.baselines.classification.drm_ensemble import drm_ensemble as eager_drm
from twinops.reference.classification.drm_ensemble import drm_ensemble, head_entropy


def _loop(logits, gamma, include):
    """Per-sample loop form of the definition, with plain softmax / entropy."""
    heads, batch, c = logits.shape
    out = np.zeros((batch, c))
    for b in range(batch):
        p = [np.exp(z - z.max()) / np.exp(z - z.max()).sum() for z in logits[:, b]]
        ent = [max(-sum(q * math.log(q) for q in ph if q > 0), 1e-12) for ph in p]
        if gamma < 0:
            out[b] = p[int(np.argmin(ent))]
            continue
        raw = [e ** -gamma for e in ent]
        w = [r / sum(raw) for r in raw]
        for h in range(heads if include else heads - 1):
            out[b] += w[h] * p[h]
    return out


def test_hand_computed_two_heads():
    """Two heads, two classes: a domain head (1, 0) and the shared head (0, 0)."""
    logits = np.array([[[1.0, 0.0]], [[0.0, 0.0]]])
    p0 = np.array([math.e, 1.0]) / (math.e + 1)
    h0 = -(p0 * np.log(p0)).sum()
    h1 = math.log(2)
    w0 = (1 / h0) / (1 / h0 + 1 / h1)
    np.testing.assert_allclose(drm_ensemble(logits, gamma=1.0), [w0 * p0], rtol=1e-14)
    np.testing.assert_allclose(drm_ensemble(logits, gamma=1.0, include_shared_head_in_sum=True),
                               [w0 * p0 + (1 - w0) * 0.5], rtol=1e-14)
    np.testing.assert_allclose(drm_ensemble(logits, gamma=-1.0), [p0], rtol=1e-14)  # h0 < log 2


@pytest.mark.parametrize("gamma", [-1.0, 0.0, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("include", [False, True])
def test_reference_equals_loop_form(gamma, include):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 9)) * rng.uniform(0.5, 3.0, size=(4, 1, 1))
    np.testing.assert_allclose(drm_ensemble(logits, gamma=gamma, include_shared_head_in_sum=include),
                               _loop(logits, gamma, include), rtol=1e-12, atol=1e-15)


def test_limits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 7))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # gamma = 0: uniform weights 1/(D+1); the code's sum leaves the shared head out.
    np.testing.assert_allclose(drm_ensemble(logits, gamma=0.0), (p[0] + p[1]) / 3, rtol=1e-12)
    # With the shared head summed the rows are distributions.
    full = drm_ensemble(logits, gamma=2.0, include_shared_head_in_sum=True)
    np.testing.assert_allclose(full.sum(-1), 1.0, rtol=1e-12)
    assert (drm_ensemble(logits, gamma=2.0).sum(-1) < 1).all()
    # Large gamma tends to the selection of the lowest-entropy head (no overflow on the way).
    sharp = logits * np.array([1.0, 2.0, 3.0])[:, None, None]
    np.testing.assert_allclose(drm_ensemble(sharp, gamma=2000.0, include_shared_head_in_sum=True),
                               drm_ensemble(sharp, gamma=-1.0), atol=1e-9)


def test_ties_go_to_the_lowest_head():
    logits = np.zeros((3, 1, 4))
    logits[0, 0, 2] = logits[2, 0, 1] = 1e4  # two one-hot heads on different classes: entropies clamp and tie
    np.testing.assert_array_equal(drm_ensemble(logits, gamma=-1.0), [[0, 0, 1, 0]])


def test_entropy_is_accurate_for_nearly_one_hot_heads():
    logits = np.array([[[0.0, -50.0]], [[0.0, -30.0]]])
    for k, gap in enumerate((50.0, 30.0)):
        t = math.exp(-gap)
        exact = math.log1p(t) + gap * t / (1 + t)
        assert head_entropy(logits)[k, 0] == pytest.approx(exact, rel=1e-13)


def test_nan_and_inf_rows():
    logits = np.random.default_rng(3).normal(size=(3, 4, 5))
    logits[1, 0, 2] = np.nan
    logits[2, 1, 0] = np.inf
    logits[0, 2, :] = -np.inf
    logits[0, 3, 1] = -np.inf
    for gamma in (-1.0, 1.0):
        out = drm_ensemble(logits, gamma=gamma)
        assert np.isnan(out[:3]).all() and np.isfinite(out[3]).all()


def test_matches_the_authors_style_baseline():
    x = torch.randn(4, 8, 11, dtype=torch.float64) * 2
    for gamma in (-1.0, 0.0, 0.5, 5.0):
        for include in (False, True):
            np.testing.assert_allclose(eager_drm(x, gamma=gamma, include_shared_head_in_sum=include).numpy(),
                                       drm_ensemble(x.numpy(), gamma=gamma, include_shared_head_in_sum=include),
                                       rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------- accelerated


def _x(h=4, b=5, c=23, seed=0):
    return torch.randn(h, b, c, generator=torch.Generator().manual_seed(seed)) * 2


def test_module_and_functional_agree_and_do_not_modify_input():
    x = _x()
    x0 = x.clone()
    got = DRMEnsemble(gamma=0.5)(x)
    torch.testing.assert_close(got, acc_drm(x, gamma=0.5))
    assert torch.equal(x, x0)
    np.testing.assert_allclose(got.double().numpy(), drm_ensemble(x.double().numpy(), gamma=0.5), rtol=2e-5, atol=1e-7)


def test_batch_major_view_equals_contiguous():
    xb = _x().permute(1, 0, 2).contiguous()  # (B, H, C) storage, viewed as (H, B, C) without a copy
    x = xb.permute(1, 0, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(acc_drm(x, gamma=1.0), acc_drm(x.contiguous(), gamma=1.0))


def test_forward_only_result_carries_no_graph():
    x = _x().requires_grad_(True)
    out = acc_drm(x, gamma=1.0)
    assert not out.requires_grad and out.grad_fn is None


def test_compiles_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: acc_drm(x, gamma=-1.0, include_shared_head_in_sum=True), fullgraph=True,
                       backend="aot_eager")
    x = _x()
    torch.testing.assert_close(fn(x), acc_drm(x, gamma=-1.0, include_shared_head_in_sum=True))


def test_clear_errors():
    with pytest.raises(ValueError, match="2 heads"):
        acc_drm(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="logits"):
        acc_drm(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="logits"):
        acc_drm(torch.zeros(2, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="gamma"):
        acc_drm(torch.zeros(2, 2, 3), gamma=float("inf"))
    with pytest.raises(TypeError, match="include_shared_head_in_sum"):
        acc_drm(torch.zeros(2, 2, 3), include_shared_head_in_sum="yes")


def test_empty_batch():
    assert acc_drm(torch.zeros(3, 0, 5)).shape == (0, 5)


# ------------------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_benchmark_shape_against_float64(dtype):
    """DomainNet shape (4 heads, 4096 samples, 345 classes) against the reference on the same rounded values."""
    torch.manual_seed(0)
    x = (torch.randn(4, 4096, 345, device="cuda") * 3).to(dtype)
    ref64 = drm_ensemble(x.double().cpu().numpy(), gamma=1.0)
    got = acc_drm(x, gamma=1.0)
    assert got.dtype == dtype
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
    np.testing.assert_allclose(got.double().cpu().numpy(), ref64, **tol)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31_and_inductor_compile():
    b, c = 3, 345
    gap = 2**30 + 7  # head h starts h * gap elements in: the last head lies past 2**31
    buf = torch.zeros(2 * gap + b * c, device="cuda", dtype=torch.float16)
    x = buf.as_strided((3, b, c), (gap, c, 1))
    x.copy_(torch.randn(3, b, c, device="cuda"))
    assert x.stride(0) * 2 > 2**31
    torch.testing.assert_close(acc_drm(x, gamma=-1.0), acc_drm(x.contiguous(), gamma=-1.0))
    fn = torch.compile(lambda t: acc_drm(t, gamma=0.5), fullgraph=True)
    xc = x.contiguous()
    torch.testing.assert_close(fn(xc), acc_drm(xc, gamma=0.5))
