"""random_feature_attention (P47): the reference against a loop, torch autograd and the ridge
regression it exists for, its edge cases, and the accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.random_feature_attention")  # the package exports a function of the same name
from twinops.accelerated.layers.random_feature_attention import RandomFeatureAttention
from twinops.accelerated.layers.random_feature_attention import random_feature_attention as acc
from twinops.reference.layers.random_feature_attention import random_feature_attention as ref
from twinops.reference.layers.random_feature_attention import random_feature_attention_grad as ref_grad


def _data(b=3, n=4, d=3, m=5, out=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, d)) / 2, rng.normal(size=(b, n, d)) / 2, rng.normal(size=(m, d, d)) / 2,
            rng.normal(size=(m, d, out)))


@pytest.mark.parametrize("activation", ["relu", "exp"])
def test_reference_matches_a_loop(activation):
    q, k, w, v = _data()
    sigma = (lambda s: max(s, 0.0)) if activation == "relu" else np.exp
    want = np.zeros((3, 2))
    for b in range(3):
        for m in range(5):
            for i in range(4):
                s = sum(q[b, c] * w[m, c, e] * k[b, i, e] for c in range(3) for e in range(3))
                for o in range(2):
                    want[b, o] += sigma(s) * sum(v[m, e, o] * k[b, i, e] for e in range(3)) / 4
    np.testing.assert_allclose(ref(q, k, w, v, activation=activation), want, rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "exp"])
def test_reference_gradient_matches_torch_autograd(activation):
    q, k, w, v = _data(seed=1)
    vt = torch.tensor(v, requires_grad=True)
    s = torch.einsum("bc,mce,bne->bmn", *(torch.tensor(t) for t in (q, w, k)))
    a = torch.relu(s) if activation == "relu" else torch.exp(s)
    f = torch.einsum("bmn,bne,med->bd", a, torch.tensor(k), vt) / 4
    g = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64).reshape(3, 2)
    (want,) = torch.autograd.grad(f, vt, g)
    np.testing.assert_allclose(ref_grad(g.numpy(), q, k, w, v, activation=activation), want.numpy(), rtol=1e-12)


def test_reference_is_linear_in_values_so_ridge_fits_a_target_of_its_class():
    """f is linear in V: least squares on the features recovers values that generate the targets."""
    rng = np.random.default_rng(2)
    b, n, d, m = 60, 6, 3, 4
    q, k = rng.normal(size=(b, d)), rng.normal(size=(b, n, d))
    w, v_true = rng.normal(size=(m, d, d)), rng.normal(size=(m, d, 1))
    y = ref(q, k, w, v_true)
    basis = np.stack([ref(q, k, w, np.eye(m * d)[j].reshape(m, d, 1))[:, 0] for j in range(m * d)], axis=1)
    v_fit = np.linalg.lstsq(basis, y[:, 0], rcond=None)[0].reshape(m, d, 1)
    np.testing.assert_allclose(ref(q, k, w, v_fit), y, atol=1e-10)


def test_reference_key_permutation_invariance_and_zero_query():
    q, k, w, v = _data(n=6)
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(ref(q, k[:, perm], w, v), ref(q, k, w, v), rtol=1e-13)
    assert not ref(np.zeros_like(q), k, w, v).any()  # relu(0) = 0
    np.testing.assert_allclose(ref(np.zeros_like(q), k, w, v, activation="exp"),
                               np.einsum("bne,med->bd", k, v) / 6, rtol=1e-13)


def test_reference_nan_key_poisons_its_row_only():
    q, k, w, v = _data()
    k[1, 2, 0] = np.nan
    out = ref(q, k, w, v)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(b=17, n=18, d=5, m=19, out=3, seed=0):
    return tuple(torch.tensor(t, dtype=torch.float32) for t in _data(b, n, d, m, out, seed))


def test_module_draws_biased_weights_and_is_the_function():
    layer = RandomFeatureAttention(4, 8, 2, mean=1.0)
    assert layer.weights.shape == (8, 4, 4) and not layer.weights.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["values"] and not layer.values.any()
    assert torch.equal(RandomFeatureAttention(4, 8, 2, mean=1.0).weights, layer.weights)  # seeded
    diag = torch.diagonal(layer.weights, dim1=1, dim2=2).mean()
    assert 0.5 < diag < 1.5
    with torch.no_grad():
        layer.values.normal_()
    q, k = torch.randn(3, 4), torch.randn(3, 5, 4)
    torch.testing.assert_close(layer(q, k), acc(q, k, layer.weights, layer.values))
    torch.testing.assert_close(layer.eval()(q, k), acc(q, k, layer.weights, layer.values))


@pytest.mark.parametrize("activation", ["relu", "exp"])
def test_accelerated_matches_reference_across_tiles(activation):
    q, k, w, v = _tensors()
    v.requires_grad_(True)
    got = acc(q, k, w, v, activation=activation)
    args = [t.detach().double().numpy() for t in (q, k, w, v)]
    np.testing.assert_allclose(got.detach().numpy(), ref(*args, activation=activation), rtol=1e-5, atol=1e-5)
    g = torch.rand_like(got)
    (dv,) = torch.autograd.grad(got, v, g)
    np.testing.assert_allclose(dv.numpy(), ref_grad(g.double().numpy(), *args, activation=activation),
                               rtol=1e-5, atol=1e-5)


def test_inputs_and_incoming_gradient_are_not_written():
    q, k, w, v = _tensors()
    v.requires_grad_(True)
    before = [t.detach().clone() for t in (q, k, w, v)]
    out = acc(q, k, w, v)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert all(torch.equal(t.detach(), t0) for t, t0 in zip((q, k, w, v), before)) and torch.equal(g, g0)


def test_strided_views_equal_contiguous():
    q, k, w, v = _tensors()
    ws, vs = w.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(0, 2).contiguous().transpose(0, 2)
    ks = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (ws.is_contiguous() or vs.is_contiguous() or ks.is_contiguous())
    torch.testing.assert_close(acc(q, ks, ws, vs), acc(q, k, w, v))


def test_no_backward_kernel_without_grad(monkeypatch):
    calls = []
    kernel = acc_mod._matmul_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(acc_mod, "_matmul_kernel", Counting())
    q, k, w, v = _tensors(b=2, n=3, d=4, m=5, out=2)
    v.requires_grad_(True)
    with torch.no_grad():
        assert acc(q, k, w, v).grad_fn is None
    assert acc(q, k, w, v.detach()).grad_fn is None
    assert len(calls) == 4  # two forward matmuls per call
    acc(q, k, w, v).sum().backward()
    assert len(calls) == 7  # two forward, one backward


def test_empty_batch():
    q, k, w, v = _tensors()
    v.requires_grad_(True)
    out = acc(q[:0], k[:0], w, v)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert not v.grad.any()


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: acc(*t, activation="exp"), fullgraph=True, backend="aot_eager")
    q, k, w, v = _tensors(b=3, n=5, d=4, m=6, out=2)
    v.requires_grad_(True)
    out = fn(q, k, w, v)
    out.sum().backward()
    v2 = v.detach().clone().requires_grad_(True)
    want = acc(q, k, w, v2, activation="exp")
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(v.grad, v2.grad)


@pytest.mark.parametrize("change, error, match", [
    (dict(query=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "float32"),
    (dict(keys=torch.zeros(2, 0, 3)), ValueError, "keys"),
    (dict(keys=torch.zeros(2, 4, 3, dtype=torch.float16)), TypeError, "keys"),
    (dict(weights=torch.zeros(0, 3, 3), values=torch.zeros(0, 3, 2)), ValueError, "weights"),
    (dict(values=torch.zeros(5, 2, 2)), ValueError, "values"),
    (dict(keys=torch.zeros(2, 4, 3, requires_grad=True)), ValueError, "no gradient"),
    (dict(weights=torch.zeros(5, 3, 3, requires_grad=True)), ValueError, "weights"),
    (dict(activation="gelu"), ValueError, "activation"),
])
def test_bad_tensors_name_the_argument(change, error, match):
    args = dict(query=torch.zeros(2, 3), keys=torch.zeros(2, 4, 3), weights=torch.zeros(5, 3, 3),
                values=torch.zeros(5, 3, 2)) | change
    with pytest.raises(error, match=match):
        acc(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(*_tensors())


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["relu", "exp"])
def test_gpu_bf16_and_tf32_at_a_benchmark_like_shape(activation):
    torch.manual_seed(0)
    b, n, d, m, out = 128, 100, 64, 130, 3
    q = torch.nn.functional.normalize(torch.randn(b, d, device="cuda"), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(b, n, d, device="cuda"), dim=-1)
    w, v = torch.randn(m, d, d, device="cuda") / d**0.5, torch.randn(m, d, out, device="cuda") / (m * d) ** 0.5
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 2e-3)):
        ts = [t.to(dtype) for t in (q, k, w, v)]
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            got = acc(*ts, activation=activation).double().cpu().numpy()
        finally:
            torch.set_float32_matmul_precision(prev)
        want = ref(*(t.double().cpu().numpy() for t in ts), activation=activation)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    b, n, d, m = 4, 64, 64, 16
    kk = 2**31 // (n * d) + 1
    buf = torch.zeros((kk * b, n, d), device="cuda", dtype=torch.bfloat16)
    k = buf[::kk]
    k.copy_(torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16) / 8)
    assert k.stride(0) * (b - 1) > 2**31
    q = torch.randn(b, d, device="cuda", dtype=torch.bfloat16) / 8
    w, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16) / 8 for s in ((m, d, d), (m, d, 2)))
    torch.testing.assert_close(acc(q, k, w, v).float(), acc(q, k.contiguous(), w, v).float())
