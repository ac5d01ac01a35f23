"""focal_infonce_loss (P31): the reference against independent forms (torch cross-entropy, a plain
loop over queries, torch autograd), and the accelerated path's behaviour beyond conformance."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_mod = importlib.import_module("twinops.accelerated.metric.focal_infonce_loss")  # the package exports a function of the same name
from twinops.accelerated.metric.focal_infonce_loss import FocalInfoNCELoss
from twinops.accelerated.metric.focal_infonce_loss import focal_infonce_loss as acc
from twinops.reference.metric.focal_infonce_loss import focal_infonce_loss as ref
from twinops.reference.metric.focal_infonce_loss import focal_infonce_loss_grad as ref_grad


def _data(b=5, h=3, d=6, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d))
    p = q + 0.5 * rng.normal(size=(b, d))
    n = rng.normal(size=(h, d))
    return q, p, n


def _loop(q, p, n, tau, gamma):
    """Per-query losses written out term by term with math (no vectorised softmax)."""
    cands = list(p) + list(n)
    out = []
    for i, qi in enumerate(q):
        scores = [float(np.dot(qi, c)) / tau for c in cands]
        top = max(scores)
        lse = top + math.log(sum(math.exp(s - top) for s in scores))
        log_p = scores[i] - lse
        out.append(-((1.0 - math.exp(log_p)) ** gamma) * log_p)
    return np.array(out)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reference_gamma_0_is_cross_entropy_over_concatenated_logits(reduction):
    q, p, n = _data()
    logits = torch.tensor(q) @ torch.cat([torch.tensor(p), torch.tensor(n)]).T / 0.1
    want = F.cross_entropy(logits, torch.arange(5), reduction=reduction).numpy()
    got = ref(q, p, n, temperature=0.1, gamma=0.0, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)  # torch loses -log p below ~1e-16


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.5])
def test_reference_matches_a_loop_over_queries(gamma):
    q, p, n = _data(seed=1)
    np.testing.assert_allclose(ref(q, p, n, temperature=0.5, gamma=gamma, reduction="none"),
                               _loop(q, p, n, 0.5, gamma), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ref(q, p, None, temperature=0.5, gamma=gamma, reduction="none"),
                               _loop(q, p, n[:0], 0.5, gamma), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("detach", [False, True])
def test_reference_gradient_matches_torch_autograd(detach):
    q, p, n = _data(seed=2)
    tq, tp, tn = (torch.tensor(x, requires_grad=True) for x in (q, p, n))
    logits = tq @ torch.cat([tp, tn]).T / 0.2
    log_p = torch.log_softmax(logits, dim=1).diagonal()
    w = (1 - log_p.exp()) ** 1.5
    loss = -(w.detach() if detach else w) * log_p
    g = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    grads = torch.autograd.grad(loss, (tq, tp, tn), g)
    got = ref_grad(g.numpy(), q, p, n, temperature=0.2, gamma=1.5, detach_weight=detach, reduction="none")
    for name, want in zip(("query", "positive", "negatives"), grads):
        np.testing.assert_allclose(got[name], want.numpy(), rtol=1e-10, atol=1e-12)


def test_reference_confident_query_keeps_precision():
    """p ~ 1: u = -log p ~ 1e-30 must come out as computed from the tiny off-diagonal mass, not 0."""
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    loss = ref(q, q, None, temperature=0.01, gamma=0.0, reduction="none")
    np.testing.assert_allclose(loss, np.exp(-100.0) * np.ones(2), rtol=1e-12)
    g = ref_grad(np.ones(2), q, q, None, temperature=0.01, gamma=0.5, reduction="none")
    assert all(np.isfinite(v).all() for v in g.values())


def test_reference_single_candidate_has_zero_loss_and_gradient():
    q = np.array([[0.3, -1.0]])
    assert ref(q, q * 2, None, reduction="sum") == 0.0
    g = ref_grad(np.float64(1.0), q, q * 2, None, reduction="sum")
    assert not any(np.any(v) for v in g.values())


def test_reference_nan_query_poisons_its_row_and_every_candidate_gradient():
    q, p, n = _data()
    q[2, 1] = np.nan
    loss = ref(q, p, n, reduction="none")
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all()
    g = ref_grad(np.ones(5), q, p, n, reduction="none")
    assert np.isnan(g["query"][2]).all() and np.isfinite(np.delete(g["query"], 2, axis=0)).all()
    assert np.isnan(g["positive"]).all() and np.isnan(g["negatives"]).all()


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(b=17, h=5, d=9, seed=0, grad=False):
    q, p, n = _data(b, h, d, seed)
    out = [torch.tensor(x, dtype=torch.float32) for x in (q, p, n)]
    return [t.requires_grad_(True) for t in out] if grad else out


def test_accelerated_gamma_0_is_cross_entropy():
    q, p, n = _tensors(grad=True)
    got = acc(q, p, n, temperature=0.1, gamma=0.0)
    qd, pd, nd = (t.detach().double().requires_grad_(True) for t in (q, p, n))
    want = F.cross_entropy(qd @ torch.cat([pd, nd]).T / 0.1, torch.arange(17))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (q, p, n)), torch.autograd.grad(want, (qd, pd, nd))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_module_matches_function():
    q, p, n = _tensors()
    loss_fn = FocalInfoNCELoss(temperature=0.05, gamma=2.0, reduction="sum")
    torch.testing.assert_close(loss_fn(q, p, n), acc(q, p, n, temperature=0.05, gamma=2.0, reduction="sum"))
    assert "gamma=2.0" in repr(loss_fn)


def test_negatives_none_equals_no_hard_negatives():
    q, p, n = _tensors()
    torch.testing.assert_close(acc(q, p, None, reduction="none"), acc(q, p, n[:0], reduction="none"))


def test_inputs_and_incoming_gradient_are_not_written():
    q, p, n = _tensors(grad=True)
    before = [t.detach().clone() for t in (q, p, n)]
    out = acc(q, p, n, reduction="none")
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert all(torch.equal(t.detach(), b) for t, b in zip((q, p, n), before)) and torch.equal(g, g0)


def test_transposed_views_equal_contiguous():
    q, p, n = _tensors()
    qt, nt = q.t().contiguous().t(), n.t().contiguous().t()
    assert not qt.is_contiguous()
    torch.testing.assert_close(acc(qt, p, nt, reduction="none"), acc(q, p, n, reduction="none"))


class _CountingKernel:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def test_backward_launches_only_what_is_needed(monkeypatch):
    dq = _CountingKernel(acc_mod._focal_infonce_dq_kernel)
    dc = _CountingKernel(acc_mod._focal_infonce_dc_kernel)
    monkeypatch.setattr(acc_mod, "_focal_infonce_dq_kernel", dq)
    monkeypatch.setattr(acc_mod, "_focal_infonce_dc_kernel", dc)
    q, p, n = _tensors(b=3, h=2, d=4)
    q.requires_grad_(True)
    with torch.no_grad():
        assert acc(q, p, n).grad_fn is None
    acc(q, p, n).backward()
    assert (dq.calls, dc.calls) == (1, 0) and p.grad is None and n.grad is None
    n.requires_grad_(True)
    q.requires_grad_(False)
    acc(q, p, n).backward()
    assert (dq.calls, dc.calls) == (1, 1) and n.grad is not None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda q, p, n: acc(q, p, n, gamma=0.5), fullgraph=True, backend="aot_eager")
    q, p, n = _tensors(b=5, h=2, d=4, grad=True)
    out = fn(q, p, n)
    out.backward()
    q2, p2, n2 = (t.detach().clone().requires_grad_(True) for t in (q, p, n))
    want = acc(q2, p2, n2, gamma=0.5)
    want.backward()
    torch.testing.assert_close(out, want)
    for a, b in ((q, q2), (p, p2), (n, n2)):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("change, match", [
    (dict(query=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(query=torch.zeros(4, 3, 2)), "query"),
    (dict(positive=torch.zeros(5, 3)), "positive"),
    (dict(negatives=torch.zeros(2, 4)), "negatives"),
    (dict(negatives=torch.zeros(2, 3, dtype=torch.float16)), "negatives"),
    (dict(query=[[0.0]]), "query"),
])
def test_bad_tensors_name_the_argument(change, match):
    args = dict(query=torch.zeros(4, 3), positive=torch.zeros(4, 3), negatives=torch.zeros(2, 3)) | change
    with pytest.raises((TypeError, ValueError), match=match):
        acc(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, p, n = _tensors(b=2, h=1, d=3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(q, p, n)


def test_no_score_matrix_is_allocated():
    """Every tensor torch creates for forward + backward is O(B + H) rows, never (B, B + H)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Sizes.largest = max(Sizes.largest, t.numel())
            return out

    q, p, n = _tensors(b=40, h=8, d=3, grad=True)
    with Sizes():
        acc(q, p, n).backward()
    assert Sizes.largest <= (40 + 8) * 3 < 40 * 48


# ---------------------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@gpu
def test_gpu_tf32_scores_stay_close():
    """With torch.set_float32_matmul_precision("high") the score tiles use TF32 (10-bit mantissa)."""
    q, p, n = (t.cuda().requires_grad_(True) for t in _tensors(b=200, h=70, d=300, seed=3))
    qd, pd, nd = (t.detach().double() for t in (q, p, n))
    want = ref(qd.cpu().numpy(), pd.cpu().numpy(), nd.cpu().numpy(), temperature=0.5, reduction="none")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = acc(q, p, n, temperature=0.5, reduction="none")
        got.sum().backward()
    finally:
        torch.set_float32_matmul_precision(old)
    np.testing.assert_allclose(got.detach().cpu().double().numpy(), want, rtol=1e-2, atol=1e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, p, n))


@gpu
def test_gpu_offsets_past_2_31():
    """Query rows strided through a 2**31-element buffer: row offsets need 64-bit arithmetic."""
    b, d = 64, 256
    k = 2**31 // (b * d) + 1
    buf = torch.zeros((k * b, d), device="cuda", dtype=torch.bfloat16)
    q = buf[::k]
    q.copy_(torch.randn(b, d, device="cuda", dtype=torch.bfloat16))
    assert q.stride(0) * (b - 1) > 2**31
    p = q.clone() + 0.1 * torch.randn_like(q)
    got = acc(q, p, None, temperature=0.1, reduction="none")
    torch.testing.assert_close(got.float(), acc(q.contiguous(), p, None, temperature=0.1, reduction="none").float())
