"""UNPG (P50): the reference against independent forms (a plain-Python loop over the authors' extended
logits, torch's cross-entropy, the eager transcription of the authors' code), the filter rule at
exact boundary values, and the accelerated path's behaviour beyond numerical agreement."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinops.accelerated.metric.unpg_margin_softmax_loss import UNPGMarginSoftmaxLoss
from twinops.accelerated.metric.unpg_margin_softmax_loss import unpg_margin_softmax_loss as acc
from twinops.conformance.baselines.metric.unpg_margin_softmax_loss import unpg_margin_softmax_loss as eager
from twinops.reference.metric.unpg_margin_softmax_loss import unpg_margin_softmax_loss as ref
from twinops.reference.metric.unpg_margin_softmax_loss import unpg_margin_softmax_loss_grad as ref_grad

# The modules themselves (the package namespaces export functions of the same name).
acc_mod = importlib.import_module("twinops.accelerated.metric.unpg_margin_softmax_loss")
ref_mod = importlib.import_module("twinops.reference.metric.unpg_margin_softmax_loss")


def _data(b=7, d=5, c=4, ids=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)), rng.integers(0, ids, b), rng.normal(size=(c, d))


def _loop_loss(x, y, w, margin_type, s, m, wisk):
    """The authors' computation written out with Python lists and the math module: per row, the C
    class logits (margin on the target) followed by the same kept negative-pair logits."""
    unit = lambda v: [a / math.sqrt(sum(t * t for t in v)) for a in v]  # noqa: E731
    xs, ws = [unit(r) for r in x], [unit(r) for r in w]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    sn = [dot(xs[p], xs[q]) for p in range(len(xs)) for q in range(p + 1, len(xs)) if y[p] != y[q]]
    kept = []
    if sn:
        ordered = sorted(sn)
        q1, q3 = ordered[int(0.25 * len(sn))], ordered[int(0.75 * len(sn))]
        kept = [v for v in ordered if q1 - wisk * (q3 - q1) <= v <= q3 + wisk * (q3 - q1)]
    losses = []
    for i, xi in enumerate(xs):
        row = []
        for j, wj in enumerate(ws):
            c = dot(xi, wj)
            if j == y[i]:
                c = math.cos(math.acos(c) + m) if margin_type == "arcface" else c - m
            row.append(s * c)
        row += [s * v for v in kept]
        top = max(row)
        losses.append(top + math.log(sum(math.exp(v - top) for v in row)) - s * (
            math.cos(math.acos(dot(xi, ws[y[i]])) + m) if margin_type == "arcface" else dot(xi, ws[y[i]]) - m))
    return np.array(losses)


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
def test_reference_matches_plain_python_loop(margin_type):
    x, y, w = _data()
    got = ref(x, y, w, margin_type=margin_type, scale=16.0, margin=0.4, whisker=1.0, reduction="none")
    want = _loop_loss(x, y, w, margin_type, 16.0, 0.4, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
def test_reference_matches_eager_transcription_of_the_authors_code(margin_type):
    """Forward and both gradients against the eager baseline (sort + boolean mask + concatenated
    columns + cross_entropy, autograd for the gradient), in float64."""
    x, y, w = _data(b=9, d=6, c=5, ids=4, seed=1)
    kw = dict(margin_type=margin_type, scale=64.0, margin=0.5, whisker=1.5, reduction="sum")
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    out = eager(xt, torch.tensor(y), wt, **kw)
    np.testing.assert_allclose(ref(x, y, w, **kw), out.item(), rtol=1e-12)
    gx, gw = torch.autograd.grad(out, [xt, wt], torch.tensor(0.7, dtype=torch.float64))
    g = ref_grad(np.array(0.7), x, y, w, **kw)
    np.testing.assert_allclose(g["embeddings"], gx.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["weight"], gw.numpy(), rtol=1e-9, atol=1e-12)


def test_no_negative_pair_is_plain_arcface_cross_entropy():
    """One identity in the batch: E = 0 and the loss is ArcFace, checked against F.cross_entropy."""
    x, _, w = _data(b=5)
    y = np.full(5, 2)
    cos = F.normalize(torch.tensor(x)) @ F.normalize(torch.tensor(w)).T
    target = torch.cos(torch.acos(cos[:, 2]) + 0.5)
    logits = 64.0 * torch.where(F.one_hot(torch.tensor(y), 4).bool(), target[:, None], cos)
    want = F.cross_entropy(logits, torch.tensor(y), reduction="none").numpy()
    np.testing.assert_allclose(ref(x, y, w, reduction="none"), want, rtol=1e-12)
    np.testing.assert_allclose(ref(x[:1], y[:1], w, reduction="none"), want[:1], rtol=1e-12)


def test_box_and_whisker_rule_at_exact_boundaries():
    """L = 9: Q1 = sorted[2] = 1, Q3 = sorted[6] = 3, IQR = 2; w = 1 keeps [-1, 5] inclusive."""
    n = np.array([5.0, -1.0, 1.0, 3.0, 2.0, 5.0 + 1e-12, -1.0 - 1e-12, 3.0, 3.0])
    keep = ref_mod._box_and_whisker(n, 1.0)
    assert keep.tolist() == [True, True, True, True, True, False, False, True, True]
    # w = 0 keeps exactly [Q1, Q3]; a list of one value keeps it.
    assert ref_mod._box_and_whisker(n, 0.0).tolist() == [False, False, True, True, True, False, False, True, True]
    assert ref_mod._box_and_whisker(np.array([0.3]), 1.5).tolist() == [True]


def test_arcface_clamp_value_and_gradient():
    """The target cosine is clamped to 1 - 2^-20 before arccos; the margin factor is 0 at and beyond the
    clamp, sin(theta + m) / sin(theta) inside."""
    hi = 1.0 - ref_mod.ARCFACE_CLAMP
    c = np.array([1.0, hi, -1.0, 0.3, np.nan])
    t, dt = ref_mod._target(c, "arcface", 0.5)
    np.testing.assert_allclose(t[:3], [math.cos(math.acos(hi) + 0.5)] * 2 + [math.cos(math.acos(-hi) + 0.5)])
    assert dt[0] == dt[1] == dt[2] == 0.0 and np.isnan(dt[4]) and np.isnan(t[4])
    th = math.acos(0.3)
    np.testing.assert_allclose(dt[3], math.sin(th + 0.5) / math.sin(th))
    assert np.float32(hi) == hi  # the bound is exact in float32, so kernels clamp to the same value


def test_reference_errors_name_the_argument():
    x, y, w = _data()
    with pytest.raises(ValueError, match="labels"):
        ref(x, np.full(7, 4), w)
    with pytest.raises(ValueError, match="margin_type"):
        ref(x, y, w, margin_type="sphereface")
    with pytest.raises(ValueError, match="weight"):
        ref(x, y, w[:, :3])


# ---------------------------------------------------------------------------- accelerated


def _tensors(b=9, d=6, c=5, ids=4, seed=1, grad=True):
    x, y, w = _data(b, d, c, ids, seed)
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=grad)
    wt = torch.tensor(w, dtype=torch.float32, requires_grad=grad)
    return xt, torch.tensor(y), wt


def test_whisker_bounds_are_the_order_statistics_of_the_pair_cosines():
    """The radix select against torch.sort of the same fp32 cosines, with ties (duplicate rows) and
    positive and negative values across several 16-row tiles."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 4, generator=g)
    x[5] = x[0]
    x[20] = -x[3]
    y = torch.randint(0, 6, (37,), generator=g)
    xn = torch.linalg.vector_norm(x, dim=1)
    xargs = (x, x.stride(0), x.stride(1), xn, y, y.stride(0))
    tiles = dict(BLOCK_P=16, BLOCK_D=16, PRECISION="ieee")
    lo, hi = acc_mod._whisker_bounds(xargs, 37, 4, 1e-12, 1.5, tiles).tolist()
    xh = x / xn[:, None]
    neg = (y[:, None] != y[None, :]).triu(1)
    s = torch.sort((xh @ xh.T)[neg]).values
    q1, q3 = s[len(s) // 4].item(), s[(3 * len(s)) // 4].item()
    assert lo == pytest.approx(q1 - 1.5 * (q3 - q1), abs=1e-6)
    assert hi == pytest.approx(q3 + 1.5 * (q3 - q1), abs=1e-6)


def test_module_matches_functional_and_trains_its_centres():
    torch.manual_seed(0)
    module = UNPGMarginSoftmaxLoss(6, 5, margin_type="cosface", margin=0.35, scale=30.0)
    x, y, _ = _tensors()
    x0 = x.detach().clone()
    out = module(x, y)
    want = acc(x, y, module.weight, margin_type="cosface", margin=0.35, scale=30.0)
    torch.testing.assert_close(out, want)
    out.backward()
    assert module.weight.grad is not None and x.grad is not None
    assert torch.equal(x.detach(), x0)
    r = ref(x0.double().numpy(), y.numpy(), module.weight.detach().double().numpy(), margin_type="cosface",
            margin=0.35, scale=30.0)
    assert out.item() == pytest.approx(r, rel=1e-5)


def test_compiles_as_one_graph_forward_and_backward():
    torch._dynamo.reset()
    x, y, w = _tensors()
    fn = lambda a, b, c: acc(a, b, c, reduction="none", whisker=1.0).sum()  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y, w)
    gx, gw = torch.autograd.grad(out, [x, w])
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    want = fn(x2, y, w2)
    wx, ww = torch.autograd.grad(want, [x2, w2])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)


class _Counting:
    """Stands in for a Triton kernel: counts launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_backward_kernels_only_for_inputs_that_need_them(monkeypatch):
    counters = {name: _Counting(getattr(acc_mod, name)) for name in
                ("_class_backward_rows_kernel", "_class_backward_cols_kernel", "_pair_backward_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(acc_mod, name, counter)
    x, y, w = _tensors()
    w = w.detach()  # frozen class centres: no column pass
    acc(x, y, w).backward()
    assert counters["_class_backward_cols_kernel"].launches == 0
    assert counters["_class_backward_rows_kernel"].launches == 1 and counters["_pair_backward_kernel"].launches == 1
    x, y, w = _tensors()
    x = x.detach()  # frozen embeddings: only the column pass
    acc(x, y, w).backward()
    assert counters["_class_backward_cols_kernel"].launches == 1
    assert counters["_class_backward_rows_kernel"].launches == 1
    with torch.no_grad():
        out = acc(*_tensors())
    assert out.grad_fn is None


def test_label_out_of_range_gives_nan_row():
    x, y, w = _tensors(grad=False)
    y = y.clone()
    y[2] = 5
    out = acc(x, y, w, reduction="none")
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


def test_accelerated_errors_name_the_argument():
    x, y, w = _tensors(grad=False)
    with pytest.raises(TypeError, match="weight"):
        acc(x, y, w.half())
    with pytest.raises(ValueError, match="labels"):
        acc(x, y[:3], w)
    with pytest.raises(TypeError, match="labels"):
        acc(x, y.float(), w)
    with pytest.raises(ValueError, match="margin_type"):
        acc(x, y, w, margin_type="arc")
    with pytest.raises(ValueError, match="scale"):
        acc(x, y, w, scale=-1.0)
    with pytest.raises(ValueError, match="embeddings"):
        acc(x[:0], y[:0], w)
