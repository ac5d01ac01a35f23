"""masked_mean_pool (P31): the reference against a loop and torch, its defined edge cases, and the
accelerated path's behaviour beyond conformance."""

import importlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_mod = importlib.import_module("twinops.accelerated.metric.masked_mean_pool")  # the package exports a function of the same name
from twinops.accelerated.metric.masked_mean_pool import MaskedMeanPool
from twinops.accelerated.metric.masked_mean_pool import masked_mean_pool as acc
from twinops.reference.metric.masked_mean_pool import masked_mean_pool as ref
from twinops.reference.metric.masked_mean_pool import masked_mean_pool_grad as ref_grad


def _data(b=3, t=7, d=5, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d))
    m = (rng.random((b, t)) < 0.6).astype(np.int64)
    m[0, 0] = 1
    return h, m


def test_reference_matches_a_loop():
    h, m = _data()
    want = np.zeros((3, 5))
    for b in range(3):
        kept = [h[b, t] for t in range(7) if m[b, t]]
        want[b] = sum(kept) / len(kept) if kept else 0.0
    np.testing.assert_allclose(ref(h, m), want, rtol=1e-13)
    np.testing.assert_allclose(ref(h, m, normalize=True), want / np.linalg.norm(want, axis=1, keepdims=True),
                               rtol=1e-13)


def test_reference_matches_sentence_transformers_and_torch_normalize():
    h, m = _data(seed=1)
    th, tm = torch.tensor(h, requires_grad=True), torch.tensor(m).unsqueeze(-1).double()
    e = F.normalize((th * tm).sum(1) / torch.clamp(tm.sum(1), min=1e-9), dim=1)
    np.testing.assert_allclose(ref(h, m, normalize=True), e.detach().numpy(), rtol=1e-12)
    g = torch.linspace(-1.0, 2.0, 15, dtype=torch.float64).reshape(3, 5)
    (want,) = torch.autograd.grad(e, th, g)
    np.testing.assert_allclose(ref_grad(g.numpy(), h, m, normalize=True), want.numpy(), rtol=1e-10, atol=1e-14)


def test_reference_all_masked_row_is_zero_with_zero_gradient():
    h, m = _data()
    m[1] = 0
    for normalize in (False, True):
        assert not ref(h, m, normalize=normalize)[1].any()
        assert not ref_grad(np.ones((3, 5)), h, m, normalize=normalize)[1].any()


def test_reference_padding_is_never_read():
    h, m = _data()
    poisoned = np.where(m[:, :, None] == 0, np.nan, h)
    np.testing.assert_array_equal(ref(poisoned, m), ref(h, m))
    np.testing.assert_array_equal(ref_grad(np.ones((3, 5)), poisoned, m), ref_grad(np.ones((3, 5)), h, m))


def test_reference_normalize_clamp_gradient_is_grad_over_eps():
    """A kept row whose mean is exactly 0: F.normalize's clamp makes the norm the constant eps."""
    h = np.zeros((1, 2, 3))
    m = np.ones((1, 2), dtype=np.int64)
    g = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_allclose(ref_grad(g, h, m, normalize=True, eps=1e-6), np.repeat(g[:, None] / 1e-6 / 2, 2, 1))


def test_reference_bool_and_nonbinary_masks_keep_tokens():
    h, m = _data()
    np.testing.assert_array_equal(ref(h, m.astype(bool)), ref(h, m))
    np.testing.assert_array_equal(ref(h, 5 * m), ref(h, m))


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(b=3, t=19, d=18, seed=0):
    h, m = _data(b, t, d, seed)
    return torch.tensor(h, dtype=torch.float32), torch.tensor(m)


@pytest.mark.parametrize("normalize", [False, True])
def test_accelerated_matches_sentence_transformers_formula(normalize):
    h, m = _tensors()
    h.requires_grad_(True)
    got = acc(h, m, normalize=normalize)
    hd = h.detach().double().requires_grad_(True)
    mm = m.unsqueeze(-1).double()
    want = (hd * mm).sum(1) / mm.sum(1).clamp(min=1e-9)
    want = F.normalize(want, dim=1) if normalize else want
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, h, g)[0].double(), torch.autograd.grad(want, hd, g.double())[0],
                               rtol=1e-5, atol=1e-6)


def test_module_matches_function_and_bool_mask_matches_int():
    h, m = _tensors()
    torch.testing.assert_close(MaskedMeanPool(normalize=True)(h, m), acc(h, m, normalize=True))
    torch.testing.assert_close(acc(h, m.bool()), acc(h, m))


def test_inputs_and_incoming_gradient_are_not_written():
    h, m = _tensors()
    h.requires_grad_(True)
    h0, m0 = h.detach().clone(), m.clone()
    out = acc(h, m, normalize=True)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(h.detach(), h0) and torch.equal(m, m0) and torch.equal(g, g0)


def test_strided_views_equal_contiguous():
    h, m = _tensors()
    hs = h.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, D) with the feature axis strided
    assert not hs.is_contiguous()
    torch.testing.assert_close(acc(hs, m[:, :]), acc(h, m))


def test_no_backward_kernel_without_grad(monkeypatch):
    calls = []
    kernel = acc_mod._pool_backward_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(acc_mod, "_pool_backward_kernel", Counting())
    h, m = _tensors(b=2, t=3, d=4)
    h.requires_grad_(True)
    with torch.no_grad():
        assert acc(h, m).grad_fn is None
    assert acc(h.detach(), m).grad_fn is None and not calls
    acc(h, m).sum().backward()
    assert len(calls) == 1


def test_empty_shapes():
    assert acc(torch.zeros(0, 4, 3), torch.zeros(0, 4, dtype=torch.long)).shape == (0, 3)
    out = acc(torch.ones(2, 0, 3), torch.zeros(2, 0, dtype=torch.long), normalize=True)
    assert torch.equal(out, torch.zeros(2, 3))


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda h, m: acc(h, m, normalize=True), fullgraph=True, backend="aot_eager")
    h, m = _tensors(b=2, t=5, d=4)
    h.requires_grad_(True)
    out = fn(h, m)
    out.sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    want = acc(h2, m, normalize=True)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h.grad, h2.grad)


@pytest.mark.parametrize("change, match", [
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.float64)), "float32"),
    (dict(hidden=torch.zeros(2, 4)), "hidden"),
    (dict(mask=torch.ones(2, 4, dtype=torch.long)), "mask"),
    (dict(mask=torch.ones(2, 3)), "mask"),
    (dict(mask=[[1, 1, 1]]), "mask"),
])
def test_bad_tensors_name_the_argument(change, match):
    args = dict(hidden=torch.zeros(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.long)) | change
    with pytest.raises((TypeError, ValueError), match=match):
        acc(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, m = _tensors(b=2, t=3, d=4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(h, m)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    """Sequences strided through a 2**31-element buffer: batch offsets need 64-bit arithmetic."""
    b, t, d = 4, 16, 128
    k = 2**31 // (b * t * d) + 1
    buf = torch.zeros((k * b, t, d), device="cuda", dtype=torch.bfloat16)
    h = buf[::k]
    h.copy_(torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16))
    assert h.stride(0) * (b - 1) > 2**31
    m = torch.ones(b, t, dtype=torch.long, device="cuda")
    m[1, 5:] = 0
    h.requires_grad_(False)
    torch.testing.assert_close(acc(h, m).float(), acc(h.contiguous(), m).float())
