"""Proto-Triplet and ICNN losses (P25): the references against plain loops written from the paper's
code description, and the accelerated functions' behaviour (modules, the target omitted, the GPU's
one-row-per-program launch, no backward kernels without gradients, errors)."""

import math

import numpy as np
import pytest
import torch

import twinops.accelerated.metric.proto_triplet as acc
from twinops.reference.metric.proto_triplet import icnn_loss, icnn_loss_grad, proto_triplet_loss


def _dist(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)) + 1e-6)


def test_proto_triplet_matches_a_loop():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    y = np.array([0, 1, 2, 3, 0, 2])
    want = []
    for i in range(6):
        d_pos = _dist(q[i], p[y[i]])
        d_neg = min(_dist(q[i], p[c]) for c in range(4) if c != y[i])
        want.append(max(0.0, d_pos - d_neg + 0.7))
    np.testing.assert_allclose(proto_triplet_loss(q, y, p, margin=0.7, reduction="none"), want, rtol=1e-13)
    assert proto_triplet_loss(q, y, p, margin=0.7) == pytest.approx(np.mean(want), rel=1e-13)
    assert proto_triplet_loss(q, np.zeros(6, np.int64), p[:1]) == 0.0  # one class: no negative


def _icnn_loop(o, yo, t, yt, k=4, ipc=None):
    """The modified ICNN score written as plain loops."""
    m, n = len(t), len(o)
    clamped = k + 2 >= m
    k = m - 2 if clamped else k
    ipc = k + 1 if ipc is None else ipc
    eps = 1e-7
    rows = []
    for i in range(n):
        order = sorted(range(m), key=lambda j: (_dist(o[i], t[j]), j))[1:ipc + 1]
        rows.append([(_dist(o[i], t[j]), yt[j] == yo[i]) for j in order])
    mus, cnts, dsums, dcnts, big = [], [], [], [], 0.0
    for row in rows:
        others = [d for d, same in row if not same]
        c = min(others) if others else math.inf
        u = [d / (c + eps) for d, _ in row[:k]]
        r = max(1.0, max(u))
        cnt = sum(1 for _, same in row[:k] if same)
        mus.append(sum(x / r for x, (_, same) in zip(u, row[:k]) if same) / (cnt + eps))
        cnts.append(cnt)
        dd = [d for d, same in row[:k] if not same]
        dsums.append(dd)
        dcnts.append(len(dd))
        big = max([big] + dd)
    lam_sc = 1 - sum(mus) / (sum(1 for c in cnts if c > 0) + eps)
    lam = sum(sum(x / (big + eps) for x in dd) / (len(dd) + eps) for dd in dsums) / (
        sum(1 for c in dcnts if c > 0) + eps)
    lam_dc = abs(lam + (-1.0 if sum(dcnts) == 0 else 0.0))
    gamma = 1.0 if clamped else sum(c / k for c in cnts) / n
    return -math.log(((lam_sc + lam_dc) / 2 + gamma) / 2)


@pytest.mark.parametrize("case", ["self", "cross", "clamped", "one class", "ipc"])
def test_icnn_matches_a_loop(case):
    rng = np.random.default_rng(1)
    o, yo = rng.normal(size=(7, 3)), np.array([0, 0, 1, 1, 2, 2, 0])
    t, yt = rng.normal(size=(6, 3)), np.array([0, 1, 2, 0, 1, 2])
    kw = {}
    if case == "self":
        t, yt = o, yo
    elif case == "clamped":
        kw = {"k": 5}
    elif case == "one class":
        t, yt, yo = o, np.zeros(7, np.int64), np.zeros(7, np.int64)
    elif case == "ipc":
        kw = {"k": 2, "ipc": 5}
    want = _icnn_loop(o, yo, t, yt, **kw)
    got = icnn_loss(o, yo, None if case in ("self", "one class") else t, None if case in ("self", "one class") else yt,
                    **kw)
    assert got == pytest.approx(want, rel=1e-12)


def test_icnn_target_omitted_is_the_origin_twice():
    rng = np.random.default_rng(2)
    o, y = rng.normal(size=(6, 4)), np.array([0, 1, 0, 1, 2, 2])
    assert icnn_loss(o, y) == icnn_loss(o, y, o.copy(), y.copy())
    g_self = icnn_loss_grad(np.array(1.0), o, y)
    g_two = icnn_loss_grad(np.array(1.0), o, y, o.copy(), y.copy())
    np.testing.assert_allclose(g_self["origin"], g_two["origin"] + g_two["target"], atol=1e-14)
    x = torch.tensor(o, dtype=torch.float32, requires_grad=True)
    acc.icnn_loss(x, torch.tensor(y)).backward()
    np.testing.assert_allclose(x.grad.numpy(), g_self["origin"], rtol=1e-4, atol=1e-6)
    assert isinstance(acc.ICNNLoss(k=2)(x.detach(), torch.tensor(y)), torch.Tensor)


def _episode(seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(21, 19, generator=g), torch.randint(0, 5, (21,), generator=g),
            torch.randn(18, 19, generator=g), torch.randint(0, 5, (18,), generator=g))


@pytest.mark.parametrize("fn", ["proto", "icnn"])
def test_one_row_per_program_as_on_the_gpu(fn, monkeypatch):
    """The GPU launches one row per program; the interpreter a block. Both must agree."""
    x, y, t, yt = _episode()

    def run():
        a, b = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        if fn == "proto":
            out = acc.proto_triplet_loss(a, y % 5, b[:5], reduction="sum")
        else:
            out = acc.icnn_loss(a, y, b, yt, k=3, ipc=5)
        out.backward()
        return out.detach(), a.grad, b.grad

    block = run()
    monkeypatch.setattr(acc, "_rows_per_program", lambda: 1)
    one = run()
    for u, v in zip(block, one):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)


def test_no_backward_kernels_without_gradients(monkeypatch):
    calls = []
    for name in ("_proto_backward_queries_kernel", "_proto_backward_prototypes_kernel"):
        real = getattr(acc, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                calls.append(name)
                return real[grid]

        monkeypatch.setattr(acc, name, Spy())
    q, y, p, _ = _episode()
    p = p[:5]
    out = acc.ProtoTripletLoss(margin=1.0)(q, y, p)
    assert out.grad_fn is None and not calls
    pg = p.clone().requires_grad_(True)
    acc.proto_triplet_loss(q, y, pg, margin=1.0).backward()
    assert calls == ["_proto_backward_prototypes_kernel"]


def test_accelerated_bad_labels_give_nan_and_errors_name_the_argument():
    q, y, p, _ = _episode()
    bad = y.clone()
    bad[3] = 7
    out = acc.proto_triplet_loss(q, bad, p[:5], reduction="none")
    assert torch.isnan(out[3]) and not torch.isnan(out[:3]).any()
    with pytest.raises(ValueError, match="ipc"):
        acc.icnn_loss(q, y, k=2, ipc=1)
    with pytest.raises(ValueError, match="target"):
        acc.icnn_loss(q, y, q)
    with pytest.raises(ValueError, match="prototypes"):
        acc.proto_triplet_loss(q, y, p[:, :3])


gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@gpu
def test_gpu_icnn_at_the_benchmark_shape_allocates_no_pair_matrix():
    """20-way 5-shot 30-query episode, support + query scored against itself (700 points, D = 640,
    ipc = 35: a 64-slot neighbour set), compiled kernels (one row per program, 64-wide tiles): the
    extra memory is the gradient and the neighbour lists, no n x M matrix."""
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.arange(20, device="cuda").repeat_interleave(35)
    x = torch.randn(20, 640, device="cuda", generator=g)[y] + torch.randn(700, 640, device="cuda", generator=g)
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = acc.icnn_loss(x, y, ipc=35)
    (grad,) = torch.autograd.grad(loss, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < x.numel() * 4 + 700 * 36 * 16 + (1 << 20), extra  # gradient + neighbour lists
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def _separated_episode(monkeypatch):
    """A 5-way 20-point episode, D = 640, whose every ICNN decision is separated by 1e-5 (relative) in
    float64 (checked), so fp32 and float64 select the same neighbours."""
    import twinops.conformance.specs.metric.proto_triplet as spec_module

    g = torch.Generator().manual_seed(28)
    y = torch.arange(5).repeat_interleave(20)
    x = torch.randn(5, 640, generator=g)[y] + torch.randn(100, 640, generator=g)
    monkeypatch.setattr(spec_module, "GAP", 1e-5)
    xs, ys = x.double().numpy(), y.numpy()
    assert spec_module._icnn_decisions_clean(xs, ys, xs, ys, 4, 20)
    return x, y, xs, ys


@gpu
def test_gpu_icnn_matches_the_reference(monkeypatch):
    x, y, xs, ys = _separated_episode(monkeypatch)
    xc = x.cuda().requires_grad_(True)
    loss = acc.icnn_loss(xc, y.cuda(), ipc=20)
    (grad,) = torch.autograd.grad(loss, xc)
    assert float(loss) == pytest.approx(icnn_loss(xs, ys, ipc=20), rel=1e-5)
    want = icnn_loss_grad(np.array(1.0), xs, ys, ipc=20)["origin"]
    np.testing.assert_allclose(grad.cpu().numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@gpu
def test_gpu_proto_triplet_matches_the_reference():
    """5-way 15-query episode, D = 640 (seed checked: no hinge or negative near-tie)."""
    from twinops.reference.metric.proto_triplet import proto_triplet_loss_grad

    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 640, generator=g)
    y = torch.arange(5).repeat_interleave(15)
    q = p[y] + torch.randn(75, 640, generator=g)
    qc, pc = q.cuda().requires_grad_(True), p.cuda().requires_grad_(True)
    loss = acc.proto_triplet_loss(qc, y.cuda(), pc)
    gq, gp = torch.autograd.grad(loss, (qc, pc))
    qs, ps, ys = q.double().numpy(), p.double().numpy(), y.numpy()
    assert float(loss) == pytest.approx(proto_triplet_loss(qs, ys, ps), rel=1e-5)
    want = proto_triplet_loss_grad(np.array(1.0), qs, ys, ps)
    np.testing.assert_allclose(gq.cpu().numpy(), want["queries"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gp.cpu().numpy(), want["prototypes"], rtol=1e-4, atol=1e-6)
