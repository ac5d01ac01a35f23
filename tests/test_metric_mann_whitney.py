"""Mann–Whitney loss and AUC (P46): the reference against independent forms (pair loops, the
average-rank formula of the AUC, the bound log 2 (1 - AUC) <= loss), and the accelerated path's
behaviour (module, untouched inputs, torch.compile, no gradient work nobody asked for, errors)."""

import math

import numpy as np
import pytest
import torch

from twinops.reference.metric.mann_whitney import mann_whitney_auc, mann_whitney_loss, mann_whitney_loss_grad


def _loop_loss(pos, neg, pm, nm, tau, normalization):
    """Per-query loss and gradient by plain loops over the valid pairs."""
    q = len(pos)
    loss, gpos, gneg = np.zeros(q), np.zeros(pos.shape), np.zeros(neg.shape)
    for k in range(q):
        ip = [i for i in range(pos.shape[1]) if pm[k, i]]
        jn = [j for j in range(neg.shape[1]) if nm[k, j]]
        if not ip or not jn:
            continue
        c = 1 / (len(ip) * len(jn)) if normalization == "pairs" else 1 / len(ip)
        for i in ip:
            for j in jn:
                z = (pos[k, i] - neg[k, j]) / tau
                loss[k] += c * math.log1p(math.exp(-z))
                s = 1 / (1 + math.exp(z))  # sigma(-z)
                gpos[k, i] -= c * s / tau
                gneg[k, j] += c * s / tau
    return loss, gpos, gneg


def _rank_auc(p, n):
    """AUC by the average-rank (Mann–Whitney) formula: (R+ - P(P+1)/2) / (P N)."""
    x = np.concatenate([p, n])
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # average rank of a tie run
        i = j + 1
    r_pos = ranks[: len(p)].sum()
    return (r_pos - len(p) * (len(p) + 1) / 2) / (len(p) * len(n))


def test_hand_computed_example():
    pos, neg = np.array([[1.0, 0.0]]), np.array([[0.0]])
    # pairs: z = 1 (loss log(1 + e^-1)) and z = 0 (loss log 2), tau = 1
    want = (math.log1p(math.exp(-1)) + math.log(2)) / 2
    assert mann_whitney_loss(pos, neg, tau=1.0) == pytest.approx(want, rel=1e-14)
    assert mann_whitney_loss(pos, neg, tau=1.0, normalization="positives") == pytest.approx(want, rel=1e-14)
    assert mann_whitney_auc(pos, neg) == 0.75  # one win, one tie
    g = mann_whitney_loss_grad(np.float64(1.0), pos, neg, tau=1.0)
    sig = 1 / (1 + math.e)
    np.testing.assert_allclose(g["pos"], [[-sig / 2, -0.25]], rtol=1e-14)
    np.testing.assert_allclose(g["neg"], [[sig / 2 + 0.25]], rtol=1e-14)


@pytest.mark.parametrize("normalization", ["pairs", "positives"])
def test_reference_matches_pair_loops(normalization):
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(size=(4, 6)), rng.normal(size=(4, 7))
    pm, nm = rng.random((4, 6)) < 0.7, rng.random((4, 7)) < 0.7
    pm[1], nm[3] = False, False  # queries without positives / negatives
    tau = 0.3
    loss, gpos, gneg = _loop_loss(pos, neg, pm, nm, tau, normalization)
    kw = dict(tau=tau, normalization=normalization)
    np.testing.assert_allclose(mann_whitney_loss(pos, neg, pm, nm, reduction="none", **kw), loss, rtol=1e-12)
    np.testing.assert_allclose(mann_whitney_loss(pos, neg, pm, nm, reduction="sum", **kw), loss.sum(), rtol=1e-12)
    has = pm.any(1) & nm.any(1)
    np.testing.assert_allclose(mann_whitney_loss(pos, neg, pm, nm, **kw), loss.sum() / has.sum(), rtol=1e-12)
    g = mann_whitney_loss_grad(np.ones(4), pos, neg, pm, nm, reduction="none", **kw)
    np.testing.assert_allclose(g["pos"], gpos, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g["neg"], gneg, rtol=1e-12, atol=1e-15)


def test_auc_matches_average_ranks_and_bounds_the_loss():
    rng = np.random.default_rng(2)
    pos = rng.integers(-3, 4, (5, 9)) / 2.0  # many ties
    neg = rng.integers(-4, 3, (5, 11)) / 2.0
    auc = mann_whitney_auc(pos, neg, reduction="none")
    np.testing.assert_allclose(auc, [_rank_auc(p, n) for p, n in zip(pos, neg)], rtol=1e-14)
    # softplus(-z) >= log 2 * (1[z < 0] + 1/2 1[z = 0]) for every pair: the paper's AoC bound.
    for tau in (0.01, 1.0, 10.0):
        loss = mann_whitney_loss(pos, neg, tau=tau, reduction="none")
        assert np.all(loss >= math.log(2) * (1 - auc) - 1e-12)


def test_ties_and_pooled_form():
    assert mann_whitney_loss(np.full((2, 3), 0.5), np.full((2, 4), 0.5)) == pytest.approx(math.log(2), rel=1e-14)
    assert mann_whitney_auc(np.full((2, 3), 0.5), np.full((2, 4), 0.5)) == 0.5
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    pooled = mann_whitney_loss(pos.reshape(1, -1), neg.reshape(1, -1), tau=0.5)
    brute = np.mean([math.log1p(math.exp(-(p - n) / 0.5)) for p in pos.ravel() for n in neg.ravel()])
    assert pooled == pytest.approx(brute, rel=1e-12)


def test_empty_queries_and_masked_nan():
    pos, neg = np.array([[0.1, np.nan], [0.3, 0.2]]), np.array([[0.0], [np.nan]])
    pm = np.array([[True, False], [True, True]])
    nm = np.array([[True], [False]])  # query 1 has no valid negative: no pairs
    assert np.isfinite(mann_whitney_loss(pos, neg, pm, nm))
    np.testing.assert_array_equal(mann_whitney_loss(pos, neg, pm, nm, reduction="none")[1], 0.0)
    auc = mann_whitney_auc(pos, neg, pm, nm, reduction="none")
    assert auc[0] == 1.0 and np.isnan(auc[1]) and mann_whitney_auc(pos, neg, pm, nm) == 1.0
    g = mann_whitney_loss_grad(np.float64(1.0), pos, neg, pm, nm)
    assert g["pos"][0, 1] == 0.0 and np.all(g["pos"][1] == 0.0) and g["neg"][1, 0] == 0.0
    assert np.isnan(mann_whitney_loss(pos, neg, np.zeros_like(pm), nm))
    assert mann_whitney_loss(pos, neg, np.zeros_like(pm), nm, reduction="sum") == 0.0


def test_reference_errors_name_the_argument():
    with pytest.raises(ValueError, match="tau"):
        mann_whitney_loss(np.zeros((1, 2)), np.zeros((1, 2)), tau=0.0)
    with pytest.raises(ValueError, match="empty"):
        mann_whitney_loss(np.zeros((1, 0)), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="neg_mask"):
        mann_whitney_auc(np.zeros((1, 2)), np.zeros((1, 2)), neg_mask=np.ones((1, 2), int))
    with pytest.raises(ValueError, match="grad"):
        mann_whitney_loss_grad(np.ones(3), np.zeros((1, 2)), np.zeros((1, 2)))


# ------------------------------------------------------------------------------------ accelerated

acc = pytest.importorskip("twinops.accelerated.metric.mann_whitney")


def _inputs(q=3, p=17, n=20, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(q, p, generator=g).requires_grad_(grad)
    neg = torch.randn(q, n, generator=g).requires_grad_(grad)
    return pos, neg


class _Spy:
    """Records the constexpr flags of every launch of a Triton kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({k: v for k, v in kwargs.items() if k.isupper()})
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_matches_reference_with_masks_and_module():
    pos, neg = _inputs()
    pm = torch.rand(3, 17, generator=torch.Generator().manual_seed(5)) < 0.6
    nm = torch.rand(3, 20, generator=torch.Generator().manual_seed(6)) < 0.6
    module = acc.MannWhitneyLoss(tau=0.2, normalization="positives", reduction="none")
    out = module(pos, neg, pm, nm)
    want = mann_whitney_loss(pos.detach().double().numpy(), neg.detach().double().numpy(), pm.numpy(), nm.numpy(),
                             tau=0.2, normalization="positives", reduction="none")
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    g = torch.tensor([0.5, -1.0, 2.0])
    gp, gn = torch.autograd.grad(out, [pos, neg], g)
    ref = mann_whitney_loss_grad(g.double().numpy(), pos.detach().double().numpy(), neg.detach().double().numpy(),
                                 pm.numpy(), nm.numpy(), tau=0.2, normalization="positives", reduction="none")
    np.testing.assert_allclose(gp.numpy(), ref["pos"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gn.numpy(), ref["neg"], rtol=1e-5, atol=1e-6)
    assert "tau=0.2" in repr(module)


def test_inputs_and_upstream_gradient_untouched():
    pos, neg = _inputs()
    before = pos.detach().clone(), neg.detach().clone()
    out = acc.mann_whitney_loss(pos, neg, reduction="none", tau=0.1)
    g = torch.rand(3) + 0.5
    g0 = g.clone()
    torch.autograd.grad(out, [pos, neg], g)
    assert torch.equal(pos.detach(), before[0]) and torch.equal(neg.detach(), before[1]) and torch.equal(g, g0)


def test_shared_negatives_through_a_zero_stride():
    pos, _ = _inputs(q=4, p=5)
    shared = torch.randn(19).requires_grad_(True)
    out = acc.mann_whitney_loss(pos, shared.expand(4, 19), tau=0.5)
    copy = shared.detach().clone().requires_grad_(True)
    want = acc.mann_whitney_loss(pos, copy.expand(4, 19).contiguous(), tau=0.5)
    torch.testing.assert_close(out, want)
    (g1,) = torch.autograd.grad(out, shared)
    (g2,) = torch.autograd.grad(want, copy)
    torch.testing.assert_close(g1, g2)


def test_atomic_and_deterministic_column_sums_agree(monkeypatch):
    pos, neg = _inputs(q=2, p=40, n=18)
    out = acc.mann_whitney_loss(pos, neg, tau=0.3)
    g_det = torch.autograd.grad(out, neg)[0]
    monkeypatch.setattr(acc, "MAX_DETERMINISTIC_TILES_P", 0)
    out2 = acc.mann_whitney_loss(pos, neg, tau=0.3)
    g_atomic = torch.autograd.grad(out2, neg)[0]
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(g_det, g_atomic, rtol=1e-6, atol=1e-7)


def test_no_gradient_work_nobody_asked_for(monkeypatch):
    spy = _Spy(acc._mw_loss_kernel)
    monkeypatch.setattr(acc, "_mw_loss_kernel", spy)
    pos, neg = _inputs()
    with torch.no_grad():
        acc.mann_whitney_loss(pos, neg)
    acc.mann_whitney_loss(pos.detach(), neg.detach())
    acc.mann_whitney_loss(pos, neg.detach())
    flags = [(c["GRAD_POS"], c["GRAD_NEG"]) for c in spy.calls]
    assert flags == [(False, False), (False, False), (True, False)]


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    fn = lambda pos, neg: acc.mann_whitney_loss(pos, neg, tau=0.1, normalization="positives")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = _inputs(q=2, p=5, n=9)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    got, want = compiled(a, b), fn(a2, b2)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    auc = torch.compile(acc.mann_whitney_auc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(auc(a.detach(), b.detach()), acc.mann_whitney_auc(a.detach(), b.detach()))


def test_auc_is_float32_exact_and_detached():
    pos = torch.tensor([[0.5, 0.25, 0.25, -1.0]], dtype=torch.float16, requires_grad=True)
    neg = torch.tensor([[0.25, 0.0, 0.5]], dtype=torch.float16)
    out = acc.mann_whitney_auc(pos, neg)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert out.item() == np.float32(mann_whitney_auc(pos.detach().double().numpy(), neg.double().numpy()))  # 11/24


def test_accelerated_errors_name_the_argument():
    pos, neg = _inputs(grad=False)
    with pytest.raises(TypeError, match="neg"):
        acc.mann_whitney_loss(pos, neg.double())
    with pytest.raises(TypeError, match="pos_mask"):
        acc.mann_whitney_loss(pos, neg, pos_mask=torch.ones(3, 17))
    with pytest.raises(ValueError, match="neg_mask"):
        acc.mann_whitney_auc(pos, neg, neg_mask=torch.ones(3, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau"):
        acc.MannWhitneyLoss(tau=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        acc.mann_whitney_loss(pos, neg, normalization="eq3")


# ------------------------------------------------------------------------------------ GPU lane

gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@gpu
def test_gpu_no_pair_tensor_at_the_benchmark_shape():
    """256 x 64 x 4096: the (Q, P, N) fp32 pair tensor would take 256 MiB; ours needs a few MiB."""
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.rand(256, 64, device="cuda", generator=g).requires_grad_(True)
    neg = torch.rand(256, 4096, device="cuda", generator=g).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = acc.mann_whitney_loss(pos, neg)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 32 * 2**20
    want = mann_whitney_loss(pos.detach().double().cpu().numpy(), neg.detach().double().cpu().numpy())
    assert loss.item() == pytest.approx(want, rel=1e-5)


@gpu
def test_gpu_offsets_past_2_pow_31():
    """(2, 1.1e9) bf16 negatives: the second query's loss and gradient must come from its own row
    (a wrapped 32-bit offset would read the first)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB")
    n = 1_100_000_000
    neg = torch.zeros(2, n, device="cuda", dtype=torch.bfloat16)
    neg[1] = -4.0
    neg[1, -3:] = torch.tensor([1.0, -1.0, 0.5], dtype=torch.bfloat16)
    pos = torch.zeros(2, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    neg.requires_grad_(True)
    out = acc.mann_whitney_loss(pos, neg, tau=1.0, reduction="none")
    assert out[0].item() == pytest.approx(math.log(2), rel=1e-2)
    assert out[1].item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=2e-2)
    (gn,) = torch.autograd.grad(out[1], neg, torch.tensor(float(n), device="cuda", dtype=torch.bfloat16))
    z = np.array([-1.0, 1.0, -0.5])  # the last three margins of query 1 (pos 0 minus neg)
    assert not gn[0].any()
    np.testing.assert_allclose(gn[1, -3:].float().cpu().numpy(), 1 / (1 + np.exp(z)), rtol=2e-2)
