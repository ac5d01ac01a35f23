"""PST (P10): the reference against hand-computed and loop forms, the tie rule, the straight-through
gradient's identities, the cubic schedule against the authors' scalar code, and the accelerated
layer's behaviour beyond conformance (module, compile, no needless kernels, errors)."""

import importlib
import math

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.pst")
from twinops.accelerated.layers.pst import PSTSparseLinear
from twinops.accelerated.layers.pst import cubic_sparsity_schedule as acc_schedule
from twinops.accelerated.layers.pst import pst_sparse_linear as acc
from twinops.reference.layers.pst import cubic_sparsity_schedule as ref_schedule
from twinops.reference.layers.pst import pst_mask, pst_masked_weight
from twinops.reference.layers.pst import pst_sparse_linear as ref
from twinops.reference.layers.pst import pst_sparse_linear_grad as ref_grad

NAMES = ("x", "weight", "bias", "U", "V", "A", "B", "R", "C")
TRAINED = ("x", "U", "V", "A", "B", "R", "C")


def _data(n=5, d_in=7, d_out=6, rw=2, rm=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, d_in)), "weight": rng.normal(size=(d_out, d_in)), "bias": rng.normal(size=d_out),
            "U": rng.normal(size=(d_out, rw)), "V": rng.normal(size=(rw, d_in)) * 0.3,
            "A": rng.normal(size=(d_out, rm)), "B": rng.normal(size=(rm, d_in)) * 0.3,
            "R": rng.normal(size=d_out) * 0.2, "C": rng.normal(size=d_in) * 0.2}


def _tensors(arrays, requires_grad=()):
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}
    for k in requires_grad:
        out[k].requires_grad_(True)
    return out


# ---------------------------------------------------------------------------- reference


def test_reference_hand_example():
    """S = |W| = [[1, 3], [0.5, 2]]; half of it pruned: the 0.5 and the 1."""
    w = np.array([[1.0, -3.0], [0.5, 2.0]])
    z2 = np.zeros((1, 2))
    args = dict(weight=w, bias=np.array([0.5, -1.0]), U=np.ones((2, 1)), V=z2, A=np.ones((2, 1)), B=z2,
                R=np.zeros(2), C=np.zeros(2))
    y = ref(np.array([[1.0, 2.0]]), sparsity=0.5, **args)
    np.testing.assert_array_equal(y, [[-6.0 + 0.5, 4.0 - 1.0]])
    np.testing.assert_array_equal(pst_masked_weight(sparsity=0.5, **{k: v for k, v in args.items() if k != "bias"}),
                                  [[0.0, -3.0], [0.0, 2.0]])


def _loop_forward(a, sparsity, beta, alpha1, alpha2):
    """Element by element, ranking by (score, flat index)."""
    w, u, v, aa, bb, r, c = (a[k] for k in ("weight", "U", "V", "A", "B", "R", "C"))
    d_out, d_in = w.shape
    wp = np.zeros_like(w)
    entries = []
    for i in range(d_out):
        for j in range(d_in):
            wp[i, j] = w[i, j] + beta * sum(u[i, k] * v[k, j] for k in range(u.shape[1]))
            s = abs(wp[i, j]) + alpha1 * sum(aa[i, k] * bb[k, j] for k in range(aa.shape[1])) + alpha2 * (r[i] + c[j])
            entries.append((s, i * d_in + j))
    pruned = {flat for _, flat in sorted(entries)[: int(sparsity * w.size)]}
    y = np.zeros((a["x"].shape[0], d_out))
    for n in range(a["x"].shape[0]):
        for i in range(d_out):
            y[n, i] = a["bias"][i] + sum(a["x"][n, j] * wp[i, j] for j in range(d_in) if i * d_in + j not in pruned)
    return y


@pytest.mark.parametrize("sparsity, beta, alpha1, alpha2", [(0.5, 1.0, 1.0, 1.0), (0.8, -0.5, 2.0, 0.3),
                                                            (0.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)])
def test_reference_matches_loops(sparsity, beta, alpha1, alpha2):
    a = _data()
    got = ref(**a, sparsity=sparsity, beta=beta, alpha1=alpha1, alpha2=alpha2)
    np.testing.assert_allclose(got, _loop_forward(a, sparsity, beta, alpha1, alpha2), rtol=1e-12, atol=1e-12)


def test_ties_prune_the_lowest_flat_index_and_match_the_threshold_rule():
    score = np.full((3, 4), 2.0)
    score[1, 2] = 1.0
    mask = pst_mask(score, sparsity=0.5)  # k = 6: the 1.0, then flat indices 0..4
    want = np.ones(12)
    want[[0, 1, 2, 3, 4, 6]] = 0.0
    np.testing.assert_array_equal(mask.reshape(-1), want)
    # The kernels' in-tile rule: pruned iff S < t or (S == t and flat index <= p), (t, p) the k-th in order.
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(5, 6)).astype(float)
    for sparsity in (0.1, 0.37, 0.5, 0.99):
        k = int(sparsity * s.size)
        order = np.argsort(s.reshape(-1), kind="stable")
        t, p = s.reshape(-1)[order[k - 1]], order[k - 1]
        flat = np.arange(s.size).reshape(s.shape)
        rule = (s < t) | ((s == t) & (flat <= p))
        np.testing.assert_array_equal(pst_mask(s, sparsity=sparsity) == 0, rule)


def test_nan_scores_sort_last():
    score = np.array([[np.nan, 1.0, 0.5, 2.0]])
    np.testing.assert_array_equal(pst_mask(score, sparsity=0.75), [[1.0, 0.0, 0.0, 0.0]])


def test_gradient_identities():
    a = _data(seed=2)
    g = np.random.default_rng(3).normal(size=(5, 6))
    grads = ref_grad(g, **a, sparsity=0.4, alpha2=0.7)
    # dR and dC are the row and column sums of the same alpha2 * dS.
    assert math.isclose(grads["R"].sum(), grads["C"].sum(), rel_tol=1e-12)
    # dU = beta (M + |W'|) * G V^T, written out.
    wp = a["weight"] + a["U"] @ a["V"]
    mask = pst_masked_weight(*(a[k] for k in ("weight", "U", "V", "A", "B", "R", "C")), sparsity=0.4,
                             alpha2=0.7) != 0
    big_g = g.T @ a["x"]
    np.testing.assert_allclose(grads["U"], ((mask + np.abs(wp)) * big_g) @ a["V"].T, rtol=1e-12)


def test_sparsity_zero_still_trains_the_scores_and_sparsity_one_is_the_bias():
    a = _data(seed=4)
    g = np.random.default_rng(5).normal(size=(5, 6))
    dense = ref_grad(g, **a, sparsity=0.0)
    assert all(np.abs(dense[k]).max() > 0 for k in ("A", "B", "R", "C"))
    np.testing.assert_array_equal(ref(**a, sparsity=1.0), np.broadcast_to(a["bias"], (5, 6)))
    assert not ref_grad(g, **a, sparsity=1.0)["x"].any()


def _authors_schedule(step, total_step, initial_warmup, final_warmup, initial_sparsity, final_sparsity):
    """The authors' scalar schedule_sparsity_ratio."""
    if step <= initial_warmup * total_step:
        return initial_sparsity
    if step > total_step - final_warmup * total_step:
        return final_sparsity
    start = initial_warmup * total_step
    coeff = 1 - (step - start) / (total_step - (final_warmup + initial_warmup) * total_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * coeff**3


def test_schedule_matches_the_authors_code_and_is_monotone():
    steps = np.arange(-3, 1004)
    got = ref_schedule(steps, 1000)
    want = [_authors_schedule(int(s), 1000, 0.1, 0.3, 0.0, 0.9) for s in steps]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert np.all(np.diff(got) >= 0) and got[0] == 0.0 and got[-1] == 0.9
    assert ref_schedule(np.array(100), 1000) == 0.0 and ref_schedule(np.array(701), 1000) == 0.9
    held = ref_schedule(np.arange(100, 700), 1000, frequency=50)
    assert len(np.unique(held)) <= 13


def test_accelerated_schedule_int_and_tensor_paths():
    for step in (0, 5, 10, 11, 37, 69, 70, 71, 100):
        want = float(ref_schedule(np.array(step), 100))
        assert acc_schedule(step, 100) == pytest.approx(want, abs=1e-15)
    t = acc_schedule(torch.arange(0, 101), 100)
    assert t.dtype == torch.float32 and t.shape == (101,)
    np.testing.assert_allclose(t.numpy(), ref_schedule(np.arange(0, 101), 100), rtol=1e-6)
    with pytest.raises(TypeError, match="step"):
        acc_schedule(torch.ones(3), 100)


# ---------------------------------------------------------------------------- accelerated


def test_module_initialisation_and_forward():
    torch.manual_seed(0)
    layer = PSTSparseLinear(7, 6, rank_weight=2, rank_mask=3, sparsity=0.5)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    for name in ("V", "B", "R", "C"):
        assert torch.count_nonzero(getattr(layer, name)) == 0
    x = torch.randn(2, 3, 7)
    want = ref(x.numpy(), *(getattr(layer, k).detach().numpy() for k in NAMES[1:]), sparsity=0.5)
    for mode in (layer.train, layer.eval):
        mode()
        np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert layer.weight.grad is None and all(getattr(layer, k).grad is not None for k in ("U", "V", "A", "B", "R", "C"))
    factors = ("weight", "U", "V", "A", "B", "R", "C")
    exported = pst_masked_weight(*(getattr(layer, k).detach().numpy() for k in factors), sparsity=0.5)
    np.testing.assert_allclose(layer.masked_weight().numpy(), exported, rtol=1e-6, atol=1e-6)
    assert "rank_weight=2" in repr(layer)


def test_from_linear_keeps_the_weights():
    lin = torch.nn.Linear(5, 4)
    layer = PSTSparseLinear.from_linear(lin, rank_weight=2, rank_mask=2)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), lin(x))  # V = 0 and sparsity 0: the layer starts as the dense one


def test_inputs_and_incoming_gradient_are_not_written():
    t = _tensors(_data(), TRAINED)
    before = {k: v.detach().clone() for k, v in t.items()}
    y = acc(**t, sparsity=0.6)
    g = torch.randn_like(y)
    g0 = g.clone()
    y.backward(g)
    for k in t:
        assert torch.equal(t[k].detach(), before[k]), k
    assert torch.equal(g, g0)


def test_no_backward_kernel_without_grad(monkeypatch):
    calls = []
    kernel = acc_mod._param_grad_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(acc_mod, "_param_grad_kernel", Counting())
    t = _tensors(_data(), TRAINED)
    with torch.no_grad():
        assert acc(**t, sparsity=0.5).grad_fn is None
    x_only = _tensors(_data(), ("x",))
    acc(**x_only, sparsity=0.5).sum().backward()
    assert not calls and x_only["x"].grad is not None
    acc(**t, sparsity=0.5).sum().backward()
    assert len(calls) == 1


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda kw: acc(**kw, sparsity=0.7), fullgraph=True, backend="aot_eager")
    a = _data(n=4, d_in=5, d_out=3, rw=1, rm=2, seed=6)
    t1, t2 = _tensors(a, TRAINED), _tensors(a, TRAINED)
    out = fn(t1)
    out.sum().backward()
    want = acc(**t2, sparsity=0.7)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for k in TRAINED:
        torch.testing.assert_close(t1[k].grad, t2[k].grad)


def test_schedule_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda s: acc_schedule(s, 100), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(torch.arange(0, 101)), acc_schedule(torch.arange(0, 101), 100))


def test_ties_match_the_reference_exactly():
    """A constant block of scores: the kernels' in-tile threshold rule prunes the reference's entries."""
    a = _data(n=3, d_in=20, d_out=18, seed=7)
    a["weight"][:10, :] = 0.5
    for k in ("V", "B", "R", "C"):
        a[k] = np.zeros_like(a[k])
    t = _tensors(a)
    for sparsity in (0.1, 0.2, 0.3):
        got = acc(torch.eye(20), *(t[k] for k in NAMES[1:]), sparsity=sparsity).T - t["bias"][None, :].T
        want = pst_masked_weight(*(a[k] for k in ("weight", "U", "V", "A", "B", "R", "C")), sparsity=sparsity)
        np.testing.assert_array_equal(got.numpy() != 0, want != 0)


@pytest.mark.parametrize("change, error, match", [
    (dict(weight=torch.zeros(6, 7, requires_grad=True)), ValueError, "frozen"),
    (dict(bias=torch.zeros(6, requires_grad=True)), ValueError, "frozen"),
    (dict(U=torch.zeros(6, 2, dtype=torch.float16)), TypeError, "U"),
    (dict(x=torch.zeros(5, 8)), ValueError, "x"),
    (dict(U=torch.zeros(6, 7), V=torch.zeros(7, 7)), ValueError, "rank of U/V"),
    (dict(R=[0.0] * 6), TypeError, "R"),
])
def test_bad_tensors_name_the_argument(change, error, match):
    args = _tensors(_data()) | change
    with pytest.raises(error, match=match):
        acc(**args, sparsity=0.5)


def test_module_rejects_ranks_larger_than_the_layer():
    with pytest.raises(ValueError, match="rank_mask"):
        PSTSparseLinear(4, 3, rank_weight=2, rank_mask=4)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(**_tensors(_data()), sparsity=0.5)


@pytest.mark.gpu
def test_gpu_bert_ffn_shape_matches_the_baseline_masks():
    """At the benchmark shape the compiled kernels prune the baseline's weights (up to a few boundary
    near-ties that the two fp32 score orders may break differently) and y is x (M * W')^T + b."""
    from twinops.conformance.baselines.layers.pst import pst_sparse_linear as base

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(8192, 768, device=dev)
    w = torch.randn(3072, 768, device=dev) * 0.02
    b = torch.randn(3072, device=dev) * 0.02
    params = dict(U=torch.randn(3072, 8, device=dev), V=torch.randn(8, 768, device=dev) * 1e-3,
                  A=torch.randn(3072, 8, device=dev), B=torch.randn(8, 768, device=dev) * 1e-3,
                  R=torch.randn(3072, device=dev) * 1e-3, C=torch.randn(768, device=dev) * 1e-3)
    eye = torch.eye(768, device=dev)
    ours = acc(eye, w, None, **params, sparsity=0.9).t()
    theirs = base(eye, w, None, **params, sparsity=0.9).t()
    assert int(((ours != 0) != (theirs != 0)).sum()) <= 4
    assert int((ours == 0).sum()) == int(0.9 * ours.numel())
    torch.testing.assert_close(acc(x, w, b, **params, sparsity=0.9), x @ ours.t() + b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        pb = {k: v.bfloat16() for k, v in params.items()}
        yb = acc(xb, wb, bb, **pb, sparsity=0.9)
        ob = acc(torch.eye(768, device=dev, dtype=torch.bfloat16), wb, None, **pb, sparsity=0.9).t()
    torch.testing.assert_close(yb.float(), xb.float() @ ob.float().t() + bb.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    """A token batch strided through a 2**31-element buffer: row offsets need 64-bit arithmetic."""
    n, d_in, d_out = 64, 32, 16
    k = 2**31 // (n * d_in) + 1
    buf = torch.zeros((k * n, d_in), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16))
    assert x.stride(0) * (n - 1) > 2**31
    t = {key: v.to("cuda", torch.bfloat16) for key, v in _tensors(_data(d_in=d_in, d_out=d_out)).items() if key != "x"}
    torch.testing.assert_close(acc(x, **t, sparsity=0.5).float(), acc(x.contiguous(), **t, sparsity=0.5).float())


def test_tensor_sparsity_matches_the_float_and_poisons_out_of_range():
    t = _tensors(_data(seed=8))
    for rho in (0.0, 0.3, 0.5, 1.0):
        want = acc(**t, sparsity=rho)
        torch.testing.assert_close(acc(**t, sparsity=torch.tensor(rho, dtype=torch.float64)), want, rtol=0, atol=0)
    for bad in (1.5, -0.1, float("nan")):
        assert torch.isnan(acc(**t, sparsity=torch.tensor(bad, dtype=torch.float64))).all()
    with pytest.raises(ValueError, match="sparsity"):
        acc(**t, sparsity=torch.tensor([0.5]))


def test_module_sparsity_changes_without_recompiling(monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(1)
    layer = PSTSparseLinear(6, 5, rank_weight=2, rank_mask=2)
    with torch.no_grad():
        layer.V.normal_()
        layer.B.normal_()
    x = torch.randn(3, 6)
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager")
    outs = []
    for step in (0, 40, 60, 100):
        layer.set_sparsity(acc_schedule(step, 100))
        outs.append(fn(x))
        if step == 0:
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        want = ref(x.numpy(), *(getattr(layer, k).detach().numpy() for k in NAMES[1:]),
                   sparsity=acc_schedule(step, 100))
        np.testing.assert_allclose(outs[-1].detach().numpy(), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0], outs[-1])
