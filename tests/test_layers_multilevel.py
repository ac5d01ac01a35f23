"""Multi-level operators (P34): the references against the matrix forms S W S^T, the identities the
paper relies on (coalesce o decoalesce = id, function preservation of a de-coalesced MLP), and the
accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.multilevel")
from twinops.reference.layers.multilevel import coalesce, decoalesce, interpolate_params

RNG = np.random.default_rng(0)


def _onehot(g, t):
    return (np.arange(t)[:, None] == np.asarray(g)[None, :]).astype(float)


def _maps():
    go = RNG.permutation(np.arange(7) % 3)
    gi = RNG.permutation(np.arange(9) % 4)
    return go, gi


def test_reference_matches_the_matrix_forms():
    go, gi = _maps()
    s_out, s_in = _onehot(go, 3), _onehot(gi, 4)
    d_out, d_in = np.diag(1 / s_out.sum(1)), np.diag(1 / s_in.sum(1))
    w = RNG.normal(size=(7, 9))
    np.testing.assert_allclose(coalesce(w, go, gi, out_width=3, in_width=4), d_out @ s_out @ w @ s_in.T, rtol=1e-13)
    ws = RNG.normal(size=(3, 4))
    np.testing.assert_allclose(decoalesce(ws, go, gi), s_out.T @ ws @ d_in @ s_in, rtol=1e-13)
    b = RNG.normal(size=7)
    np.testing.assert_allclose(coalesce(b, go, out_width=3), d_out @ s_out @ b, rtol=1e-13)
    np.testing.assert_array_equal(decoalesce(b[:3], go), b[:3][go])


def test_default_pairing_merges_channel_i_with_i_plus_t():
    w = RNG.normal(size=(4, 6))
    got = coalesce(w)
    assert got.shape == (2, 3)
    assert got[1, 2] == pytest.approx((w[1, 2] + w[1, 5] + w[3, 2] + w[3, 5]) / 2)
    np.testing.assert_array_equal(decoalesce(got)[:, :3], decoalesce(got)[:, 3:])


def test_coalesce_undoes_decoalesce_and_decoalesce_coalesce_is_a_projection():
    go, gi = _maps()
    ws = RNG.normal(size=(3, 4))
    np.testing.assert_allclose(coalesce(decoalesce(ws, go, gi), go, gi, out_width=3, in_width=4), ws, rtol=1e-13)
    np.testing.assert_allclose(coalesce(decoalesce(ws)), ws, rtol=1e-13)
    w = RNG.normal(size=(7, 9))
    p = decoalesce(coalesce(w, go, gi, out_width=3, in_width=4), go, gi)
    np.testing.assert_allclose(decoalesce(coalesce(p, go, gi, out_width=3, in_width=4), go, gi), p, rtol=1e-12)


def test_decoalesced_mlp_computes_the_small_mlp():
    """Hidden units copied, their inputs split evenly: the large MLP's output equals the small one's
    for inputs that are copies along the input groups."""
    g_in, g_hid, g_out = np.arange(6) % 3, RNG.permutation(np.arange(10) % 5), np.arange(4) % 2
    w1, b1, w2, b2 = RNG.normal(size=(5, 3)), RNG.normal(size=5), RNG.normal(size=(2, 5)), RNG.normal(size=2)
    x = RNG.normal(size=3)
    small = w2 @ np.maximum(w1 @ x + b1, 0) + b2
    big_w1, big_b1 = decoalesce(w1, g_hid, g_in), decoalesce(b1, g_hid)
    big_w2, big_b2 = decoalesce(w2, g_out, g_hid), decoalesce(b2, g_out)
    big = big_w2 @ np.maximum(big_w1 @ x[g_in] + big_b1, 0) + big_b2
    np.testing.assert_allclose(big, small[g_out], rtol=1e-12)


def test_interpolate_endpoints_and_midpoint():
    a, b = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    np.testing.assert_array_equal(interpolate_params(a, b, alpha=0.0), a)
    np.testing.assert_array_equal(interpolate_params(a, b, alpha=1.0), b)
    np.testing.assert_allclose(interpolate_params(a, b), (a + b) / 2, rtol=1e-15)


@pytest.mark.parametrize("call, match", [
    (lambda: coalesce(np.ones((4, 6)), np.array([0, 1, 1, 1]), out_width=2, in_width=3), None),
    (lambda: coalesce(np.ones((4, 6)), np.array([0, 0, 0, 0]), out_width=2), "out_groups"),
    (lambda: coalesce(np.ones((4, 6)), np.array([0, 1, 2, 0]), out_width=2), "out_groups"),
    (lambda: decoalesce(np.ones((2, 3)), np.array([0, 0, 0])), "out_groups"),
    (lambda: coalesce(np.ones((5, 6))), "out_width"),
    (lambda: interpolate_params(np.ones(3), np.ones(4)), "decoalesced"),
])
def test_reference_group_map_errors(call, match):
    if match is None:
        assert call().shape == (2, 3)  # unequal groups are fine
        return
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- accelerated


def _t(a, dtype=torch.float32):
    return torch.tensor(a, dtype=dtype)


def test_accelerated_identity_and_matrix_forms():
    go, gi = _maps()
    ws = _t(RNG.normal(size=(3, 4)))
    tgo, tgi = torch.tensor(go), torch.tensor(gi)
    big = acc_mod.decoalesce(ws, tgo, tgi)
    torch.testing.assert_close(acc_mod.coalesce(big, tgo, tgi, out_width=3, in_width=4), ws, rtol=1e-6, atol=1e-6)
    s_out, s_in = _t(_onehot(go, 3)), _t(_onehot(gi, 4))
    w = _t(RNG.normal(size=(7, 9)))
    torch.testing.assert_close(acc_mod.coalesce(w, tgo, tgi, out_width=3, in_width=4),
                               (s_out @ w @ s_in.T) / s_out.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_accelerated_interpolate_alpha_zero_is_bit_exact():
    a, b = _t(RNG.normal(size=(5, 17))), _t(RNG.normal(size=(5, 17)))
    assert torch.equal(acc_mod.interpolate_params(a, b, alpha=0.0), a)
    assert torch.equal(acc_mod.interpolate_params(a, b, alpha=1.0), b)


def test_no_gradient_is_recorded():
    w = _t(RNG.normal(size=(4, 6))).requires_grad_(True)
    assert acc_mod.coalesce(w).grad_fn is None and not acc_mod.coalesce(w).requires_grad
    assert acc_mod.decoalesce(w).grad_fn is None
    assert acc_mod.interpolate_params(w, w * 2).grad_fn is None
    assert acc_mod.HAS_TRITON_BACKWARD is False


def test_inputs_are_not_written_and_strided_views_agree():
    w = _t(RNG.normal(size=(8, 12)))
    wt = w.t().contiguous().t()
    w0 = w.clone()
    torch.testing.assert_close(acc_mod.coalesce(wt), acc_mod.coalesce(w), rtol=0, atol=0)
    torch.testing.assert_close(acc_mod.decoalesce(wt), acc_mod.decoalesce(w), rtol=0, atol=0)
    torch.testing.assert_close(acc_mod.interpolate_params(wt, w, alpha=0.3),
                               acc_mod.interpolate_params(w, w, alpha=0.3), rtol=0, atol=0)
    assert torch.equal(w, w0)


def test_invalid_group_map_gives_nan_not_a_sync():
    w = _t(np.ones((4, 6)))
    assert acc_mod.coalesce(w, torch.tensor([0, 0, 0, 0]), out_width=2).isnan().all()
    assert acc_mod.decoalesce(w, torch.tensor([0, 1, 2, 9])).isnan().all()


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda w, g: acc_mod.interpolate_params(
        w, acc_mod.decoalesce(acc_mod.coalesce(w, g, out_width=3), g), alpha=0.25), fullgraph=True, backend="aot_eager")
    w = _t(RNG.normal(size=(6, 8)))
    g = torch.tensor([0, 1, 2, 2, 1, 0])
    want = acc_mod.interpolate_params(w, acc_mod.decoalesce(acc_mod.coalesce(w, g, out_width=3), g), alpha=0.25)
    torch.testing.assert_close(fn(w, g), want)


@pytest.mark.parametrize("call, match", [
    (lambda: acc_mod.coalesce(torch.ones(2, 4, 6)), "weight"),
    (lambda: acc_mod.coalesce(torch.ones(4, 6, dtype=torch.float64)), "float32"),
    (lambda: acc_mod.coalesce(torch.ones(5, 6)), "out_width"),
    (lambda: acc_mod.coalesce(torch.ones(4, 6), torch.tensor([0.0, 1.0, 0.0, 1.0])), "out_groups"),
    (lambda: acc_mod.coalesce(torch.ones(4), in_groups=torch.tensor([0, 1])), "in_groups"),
    (lambda: acc_mod.decoalesce(torch.ones(4, 6), torch.zeros(4, 2, dtype=torch.long)), "out_groups"),
    (lambda: acc_mod.interpolate_params(torch.ones(3), torch.ones(4)), "decoalesced"),
    (lambda: acc_mod.interpolate_params(torch.ones(3), torch.ones(3), alpha=2.0), "alpha"),
    (lambda: acc_mod.interpolate_params(torch.ones(3), torch.ones(3, dtype=torch.float16)), "decoalesced"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc_mod.coalesce(torch.ones(4, 6))


@pytest.mark.gpu
def test_gpu_bf16_agrees_with_the_eager_baseline_past_2_31():
    """A weight strided through a 2**31-element buffer (row offsets need 64-bit arithmetic), bf16."""
    from twinops.conformance.baselines.layers import multilevel as base

    rows, cols = 64, 256
    k = 2**31 // (cols * (rows - 1)) + 1
    buf = torch.zeros((k * rows, cols), device="cuda", dtype=torch.bfloat16)
    w = buf[::k]
    w.copy_(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16))
    assert w.stride(0) * (rows - 1) > 2**31
    torch.testing.assert_close(acc_mod.coalesce(w).float(), base.coalesce(w.contiguous()).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(acc_mod.decoalesce(w), base.decoalesce(w.contiguous()))
    torch.testing.assert_close(acc_mod.interpolate_params(w, w, alpha=0.25), w)
