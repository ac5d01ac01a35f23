"""low_frequency_crop (P8): the reference against a direct DFT sum, the separable matrix form and its
defined identities; the accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.layers.low_frequency_crop")  # the package exports a function of the same name
from twinops.accelerated.layers.low_frequency_crop import LowFrequencyCrop
from twinops.accelerated.layers.low_frequency_crop import low_frequency_crop as acc
from twinops.reference.layers.low_frequency_crop import low_frequency_crop as ref
from twinops.reference.layers.low_frequency_crop import low_frequency_crop_grad as ref_grad


def _x(shape=(2, 3, 9, 9), seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def test_reference_matches_a_direct_dft_sum():
    """y[m, p] = (1 / HW) sum over signed frequencies -b <= f < b of X(f) e^{2 pi i (f_h m / 2b_h + f_w p / 2b_w)}."""
    x = _x((1, 1, 7, 6))
    bh, bw = 2, 3
    hh, ww = 7, 6
    want = np.zeros((2 * bh, 2 * bw))
    rows, cols = np.arange(hh)[:, None], np.arange(ww)[None, :]
    for fh in range(-bh, bh):
        for fw in range(-bw, bw):
            coeff = np.sum(x[0, 0] * np.exp(-2j * np.pi * (fh * rows / hh + fw * cols / ww)))
            m, p = np.arange(2 * bh)[:, None], np.arange(2 * bw)[None, :]
            want = want + (coeff * np.exp(2j * np.pi * (fh * m / (2 * bh) + fw * p / (2 * bw)))).real
    want /= hh * ww
    np.testing.assert_allclose(ref(x, band=(2 * bh, 2 * bw))[0, 0], want, rtol=1e-12, atol=1e-13)


def test_reference_equals_the_separable_matrices():
    """y = A_Hr x A_Wr^T - u_H (v_H^T x v_W) u_W^T, the factors the kernels use."""
    x = _x((2, 2, 11, 8))
    ah, uh, vh = acc_mod._axis_factors(11, 3)
    aw, uw, vw = acc_mod._axis_factors(8, 2)
    want = ah @ x @ aw.T - np.einsum("m,nc,p->ncmp", uh, np.einsum("h,nchw,w->nc", vh, x, vw), uw)
    np.testing.assert_allclose(ref(x, band=(6, 4)), want, rtol=1e-12, atol=1e-13)
    g = _x((2, 2, 6, 4), seed=1)
    want_dx = ah.T @ g @ aw - np.einsum("h,nc,w->nchw", vh, np.einsum("m,ncmp,p->nc", uh, g, uw), vw)
    np.testing.assert_allclose(ref_grad(g, x, band=(6, 4)), want_dx, rtol=1e-12, atol=1e-13)


def test_reference_identity_mean_and_odd_band():
    x = _x((2, 3, 8, 8))
    np.testing.assert_allclose(ref(x, band=8), x, atol=1e-13)
    y = ref(x, band=5)
    assert y.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(y.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=1e-13)
    np.testing.assert_allclose(ref(np.full((1, 1, 6, 6), 2.5), band=4), np.full((1, 1, 4, 4), 2.5))


def test_reference_gradient_is_the_adjoint():
    x = _x((2, 2, 9, 10))
    g = _x((2, 2, 4, 6), seed=2)
    dx = ref_grad(g, x, band=(5, 7))
    np.testing.assert_allclose(np.sum(ref(x, band=(5, 7)) * g), np.sum(x * dx), rtol=1e-12)


def test_reference_nonfinite_plane_is_nan():
    x = _x()
    x[1, 2, 0, 0] = np.inf
    y = ref(x, band=6)
    assert np.isnan(y[1, 2]).all() and np.isfinite(np.delete(y.reshape(6, 6, 6), 5, axis=0)).all()


@pytest.mark.parametrize("band, match", [(1, "band"), (10, "band"), ((4, 4, 4), "band"), (4.0, "band")])
def test_reference_bad_band(band, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ref(_x(), band=band)


# ---------------------------------------------------------------------------------------------- accelerated


def _t(shape=(2, 3, 17, 17), seed=0, grad=False):
    return torch.tensor(_x(shape, seed), dtype=torch.float32, requires_grad=grad)


def test_accelerated_matches_the_fft_formulation():
    x = _t((2, 2, 20, 33), grad=True)
    got = acc(x, band=(12, 17))
    xd = x.detach().double().requires_grad_(True)
    spec = torch.fft.fft2(xd)
    spec = torch.cat([spec[..., :6, :], spec[..., -6:, :]], dim=-2)
    spec = torch.cat([spec[..., :8], spec[..., -8:]], dim=-1)
    want = torch.fft.ifft2(spec).real * (12 * 16 / (20 * 33))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0].double(), torch.autograd.grad(want, xd, g.double())[0],
                               rtol=1e-5, atol=1e-6)


def test_module_matches_function():
    x = _t()
    module = LowFrequencyCrop(band=10)
    torch.testing.assert_close(module(x), acc(x, band=10))
    assert "band=10" in repr(module)


def test_inputs_and_incoming_gradient_are_not_written():
    x = _t(grad=True)
    x0 = x.detach().clone()
    out = acc(x, band=12)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(x.detach(), x0) and torch.equal(g, g0)


def test_strided_views_equal_contiguous():
    x = _t((2, 3, 17, 18))
    xs = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    assert not xs.is_contiguous()
    torch.testing.assert_close(acc(xs, band=(10, 10)), acc(x, band=(10, 10)), rtol=0, atol=0)


def test_no_backward_kernel_without_grad(monkeypatch):
    calls = []
    launch = acc_mod._launch

    def counting(z, factors, rows, cols):
        calls.append(tuple(z.shape))
        return launch(z, factors, rows, cols)

    monkeypatch.setattr(acc_mod, "_launch", counting)
    x = _t((1, 2, 6, 6), grad=True)
    with torch.no_grad():
        assert acc(x, band=4).grad_fn is None
    assert acc(x.detach(), band=4).grad_fn is None
    assert len(calls) == 2  # two forwards, no backward
    acc(x, band=4).sum().backward()
    assert len(calls) == 4


def test_empty_shapes():
    assert acc(torch.zeros(0, 3, 8, 8), band=4).shape == (0, 3, 4, 4)
    assert acc(torch.zeros(2, 0, 8, 8), band=4).shape == (2, 0, 4, 4)


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: acc(x, band=6), fullgraph=True, backend="aot_eager")
    x = _t((1, 2, 9, 9), grad=True)
    out = fn(x)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    want = acc(x2, band=6)
    want.square().sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(1, 1, 8, 8, dtype=torch.float64)), "float32"),
    (dict(x=torch.zeros(3, 8, 8)), "x"),
    (dict(band=9), "band"),
    (dict(band=1), "band"),
    (dict(x=torch.zeros(1, 1, 8, 6)), "band"),
    (dict(band=(4, 4, 4)), "band"),
    (dict(band=4.0), "band"),
])
def test_bad_arguments_name_the_argument(change, match):
    args = dict(x=torch.zeros(1, 1, 8, 8), band=4) | change
    with pytest.raises((TypeError, ValueError), match=match):
        acc(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(_t((1, 1, 4, 4)), band=2)


@pytest.mark.gpu
def test_gpu_bf16_matches_fp32_and_offsets_past_2_31():
    """Planes strided through a 2**31-element buffer: plane offsets need 64-bit arithmetic."""
    n, c, s = 4, 1, 64
    k = 2**31 // (c * s * s * (n - 1)) + 1
    buf = torch.zeros((k * n, c, s, s), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, c, s, s, device="cuda", dtype=torch.bfloat16))
    assert x.stride(0) * (n - 1) > 2**31
    torch.testing.assert_close(acc(x, band=40).float(), acc(x.contiguous(), band=40).float())
    torch.testing.assert_close(acc(x, band=40).float(), acc(x.float(), band=40), rtol=2e-2, atol=2e-2)
