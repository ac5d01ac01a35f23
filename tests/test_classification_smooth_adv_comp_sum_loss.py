"""smooth_adv_comp_sum_loss (P13): the reference against independent forms (a hand-computed example,
a per-row loop over the margin vector, comp_sum_loss at nu = 0, shift invariance, the paper's upper
bound), and the accelerated path's behaviour beyond numerical agreement (which
tests/test_conformance.py checks)."""

import importlib
import math

import numpy as np
import pytest
import torch

from twinops.reference.classification.comp_sum_loss import comp_sum_loss
from twinops.reference.classification.smooth_adv_comp_sum_loss import (
    smooth_adv_comp_sum_loss,
    smooth_adv_comp_sum_loss_grad,
)

acc = importlib.import_module("twinops.accelerated.classification.smooth_adv_comp_sum_loss")

REDUCTIONS = ["none", "mean", "sum"]


def batch(seed=0, n=5, c=6, step=0.5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 2
    return z, rng.integers(0, c, size=n), z + step * rng.normal(size=(n, c))


def loop_form(z, y, z_adv, tau, nu):
    """Per row, in plain Python: Phi^tau(u) + nu * || Delta(z_adv) - Delta(z) ||_2 with
    Delta(v) = (v_y - v_k) over k != y."""
    out = []
    for zi, yi, ai in zip(z, y, z_adv):
        u = sum(math.exp(zi[k] - zi[yi]) for k in range(len(zi)) if k != yi)
        phi = math.log1p(u) if tau == 1.0 else ((1 + u) ** (1 - tau) - 1) / (1 - tau)
        shift = [(ai[yi] - ai[k]) - (zi[yi] - zi[k]) for k in range(len(zi)) if k != yi]
        out.append(phi + nu * math.sqrt(sum(s * s for s in shift)))
    return np.array(out)


# --- reference ----------------------------------------------------------------------------------


def test_hand_computed_example():
    """z = 0 (p uniform over 3), y = 0, z' = (1, 0, 0): margins move by (1, 1), CE = log 3, r = sqrt 2."""
    z, y, z_adv = np.zeros((1, 3)), np.array([0]), np.array([[1.0, 0.0, 0.0]])
    got = smooth_adv_comp_sum_loss(z, y, z_adv, nu=0.5, reduction="none")
    np.testing.assert_allclose(got, [math.log(3) + 0.5 * math.sqrt(2)], rtol=1e-14)


@pytest.mark.parametrize("tau,nu", [(1.0, 1.0), (0.0, 0.3), (1.5, 2.0), (2.0, 0.0)])
def test_matches_the_loop_form(tau, nu):
    z, y, z_adv = batch(1)
    np.testing.assert_allclose(smooth_adv_comp_sum_loss(z, y, z_adv, tau=tau, nu=nu, reduction="none"),
                               loop_form(z, y, z_adv, tau, nu), rtol=1e-12)


def test_nu_zero_is_comp_sum_and_ignored_rows():
    z, y, z_adv = batch(2)
    y[1] = -100
    z[1, 0] = np.nan
    for reduction in REDUCTIONS:
        np.testing.assert_allclose(smooth_adv_comp_sum_loss(z, y, z_adv, tau=0.5, nu=0.0, reduction=reduction),
                                   comp_sum_loss(z, y, tau=0.5, reduction=reduction), rtol=1e-14)
    grads = smooth_adv_comp_sum_loss_grad(np.ones(5), z, y, z_adv, reduction="none")
    assert np.all(grads["logits"][1] == 0.0) and np.all(grads["adv_logits"][1] == 0.0)


def test_invariant_to_per_row_shifts():
    z, y, z_adv = batch(3)
    shift = np.arange(5.0)[:, None]
    base = smooth_adv_comp_sum_loss(z, y, z_adv, reduction="none")
    np.testing.assert_allclose(smooth_adv_comp_sum_loss(z + shift, y, z_adv, reduction="none"), base, rtol=1e-12)
    np.testing.assert_allclose(smooth_adv_comp_sum_loss(z, y, z_adv - 3 * shift, reduction="none"), base, rtol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 1.5, 2.0])
def test_upper_bounds_the_adversarial_comp_sum_loss(tau):
    """For tau >= 1 the comp-sum loss is 1-Lipschitz in the margins, so with nu = 1 the smooth loss is
    at least the comp-sum loss at the adversarial logits (the paper's bound)."""
    for seed in range(5):
        z, y, z_adv = batch(seed, step=3.0)
        smooth = smooth_adv_comp_sum_loss(z, y, z_adv, tau=tau, nu=1.0, reduction="none")
        assert np.all(smooth >= comp_sum_loss(z_adv, y, tau=tau, reduction="none") - 1e-12)


def fd_vjp(f, x, g, h=1e-6):
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[idx] = np.sum(g * (f(xp) - f(xm))) / (2 * h)
    return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_match_finite_differences(reduction):
    z, y, z_adv = batch(4)
    y[2] = -100
    g = np.random.default_rng(5).uniform(0.5, 2, size=5) if reduction == "none" else np.float64(1.7)
    kw = dict(tau=0.7, nu=1.3, reduction=reduction)
    grads = smooth_adv_comp_sum_loss_grad(g, z, y, z_adv, **kw)
    np.testing.assert_allclose(grads["logits"], fd_vjp(lambda v: smooth_adv_comp_sum_loss(v, y, z_adv, **kw), z, g),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads["adv_logits"],
                               fd_vjp(lambda v: smooth_adv_comp_sum_loss(z, y, v, **kw), z_adv, g), rtol=1e-6, atol=1e-8)


def test_gradient_at_the_kink_is_the_comp_sum_gradient():
    z, y, _ = batch(6)
    grads = smooth_adv_comp_sum_loss_grad(np.float64(1.0), z, y, z.copy(), nu=2.0)
    assert np.all(grads["adv_logits"] == 0.0)
    from twinops.reference.classification.comp_sum_loss import comp_sum_loss_grad

    np.testing.assert_allclose(grads["logits"], comp_sum_loss_grad(np.float64(1.0), z, y), rtol=1e-14)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(nu=-1.0), ValueError, "nu"), (dict(nu=float("nan")), ValueError, "nu"), (dict(tau=-0.1), ValueError, "tau"),
    (dict(nu="1"), TypeError, "nu"),
])
def test_bad_hyperparameters(kw, exc, name):
    z, y, z_adv = batch(7)
    with pytest.raises(exc, match=rf"^{name} "):
        smooth_adv_comp_sum_loss(z, y, z_adv, **kw)


def test_bad_adversarial_logits():
    z, y, _ = batch(8)
    with pytest.raises(ValueError, match="adv_logits"):
        smooth_adv_comp_sum_loss(z, y, z[:, :3])
    with pytest.raises(TypeError, match="adv_logits"):
        smooth_adv_comp_sum_loss(z, y, z > 0)


# --- accelerated --------------------------------------------------------------------------------


def tensors(seed=0, n=5, c=37):
    z, y, z_adv = batch(seed, n, c)
    y[1] = -100
    return torch.tensor(z, dtype=torch.float32), torch.tensor(y), torch.tensor(z_adv, dtype=torch.float32)


def test_module_matches_function_and_inputs_are_kept():
    z, y, z_adv = tensors()
    before = (z.clone(), z_adv.clone())
    torch.testing.assert_close(acc.SmoothAdvCompSumLoss(tau=1.5, nu=0.3)(z, y, z_adv),
                               acc.smooth_adv_comp_sum_loss(z, y, z_adv, tau=1.5, nu=0.3))
    assert torch.equal(z, before[0]) and torch.equal(z_adv, before[1])


def test_nu_zero_equals_the_comp_sum_kernel():
    from twinops.accelerated.classification.comp_sum_loss import comp_sum_loss as acc_comp_sum

    z, y, z_adv = tensors(1)
    torch.testing.assert_close(acc.smooth_adv_comp_sum_loss(z, y, z_adv, tau=0.5, nu=0.0, reduction="none"),
                               acc_comp_sum(z, y, tau=0.5, reduction="none"))


def test_gradient_for_one_input_only():
    z, y, z_adv = tensors(2)
    zg, ag = z.clone().requires_grad_(True), z_adv.clone().requires_grad_(True)
    both = torch.autograd.grad(acc.smooth_adv_comp_sum_loss(zg, y, ag), [zg, ag])
    (only_adv,) = torch.autograd.grad(acc.smooth_adv_comp_sum_loss(z, y, ag), [ag])
    (only_clean,) = torch.autograd.grad(acc.smooth_adv_comp_sum_loss(zg, y, z_adv), [zg])
    torch.testing.assert_close(only_clean, both[0])
    torch.testing.assert_close(only_adv, both[1])


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc, "_smooth_adv_backward_kernel", _NoLaunch())
    z, y, z_adv = tensors(3)
    assert acc.smooth_adv_comp_sum_loss(z, y, z_adv).grad_fn is None
    with torch.no_grad():
        assert acc.smooth_adv_comp_sum_loss(z.requires_grad_(True), y, z_adv).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, y, a: acc.smooth_adv_comp_sum_loss(z, y, a, nu=0.7), fullgraph=True,
                       backend="aot_eager")
    z, y, z_adv = tensors(4, c=20)
    z1, a1 = z.clone().requires_grad_(True), z_adv.clone().requires_grad_(True)
    z2, a2 = z.clone().requires_grad_(True), z_adv.clone().requires_grad_(True)
    out = fn(z1, y, a1)
    out.backward()
    want = acc.smooth_adv_comp_sum_loss(z2, y, a2, nu=0.7)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(a1.grad, a2.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(adv_logits=torch.zeros(4, 3, dtype=torch.float16)), "adv_logits"),
    (dict(adv_logits=torch.zeros(4, 2)), "adv_logits"),
    (dict(adv_logits=torch.zeros(4, 3, dtype=torch.long)), "adv_logits"),
    (dict(logits=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(target=torch.zeros(5, dtype=torch.long)), "target"),
    (dict(nu=-1.0), "nu"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long), adv_logits=torch.zeros(4, 3)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc.smooth_adv_comp_sum_loss(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
GPU_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _gpu_inputs(n, c, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, c, device="cuda", generator=gen).to(dtype)
    adv = (z.float() + 0.1 * torch.randn(n, c, device="cuda", generator=gen)).to(dtype)
    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
    y[::7] = -100
    return z, y, adv


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,c", [(64, 32000), (8, 128256)])
def test_gpu_benchmark_rows_match_the_reference(dtype, n, c):
    """The compiled 4096-wide chunks on vocabulary-sized rows, against float64 on the rounded inputs."""
    z, y, adv = _gpu_inputs(n, c, dtype)
    zg, ag = z.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    loss = acc.smooth_adv_comp_sum_loss(zg, y, ag, tau=1.5, nu=0.5, reduction="none")
    g = torch.rand_like(loss) + 0.5
    gz, ga = torch.autograd.grad(loss, [zg, ag], g)
    z64, a64, y64, g64 = (t.double().cpu().numpy() for t in (z, adv, y, g))
    y64 = y64.astype(np.int64)
    want = smooth_adv_comp_sum_loss(z64, y64, a64, tau=1.5, nu=0.5, reduction="none")
    want_g = smooth_adv_comp_sum_loss_grad(g64, z64, y64, a64, tau=1.5, nu=0.5, reduction="none")
    rtol = GPU_RTOL[dtype]
    np.testing.assert_allclose(loss.double().cpu().numpy(), want, rtol=rtol, atol=1e-6 * math.sqrt(c))
    for got, ref in ((gz, want_g["logits"]), (ga, want_g["adv_logits"])):
        np.testing.assert_allclose(got.double().cpu().numpy(), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """(16 400, 131 072) bf16 logits: the last rows start past element 2**31."""
    n, c = 16_400, 131_072
    try:
        z, y, adv = _gpu_inputs(n, c, torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    zg, ag = z.requires_grad_(True), adv.requires_grad_(True)
    loss = acc.smooth_adv_comp_sum_loss(zg, y, ag, reduction="none")
    gz, ga = torch.autograd.grad(loss, [zg, ag], torch.ones_like(loss))
    tail = slice(n - 3, n)
    z2, a2 = z[tail].detach().clone().requires_grad_(True), adv[tail].detach().clone().requires_grad_(True)
    want = acc.smooth_adv_comp_sum_loss(z2, y[tail], a2, reduction="none")
    wz, wa = torch.autograd.grad(want, [z2, a2], torch.ones_like(want))
    torch.testing.assert_close(loss[tail], want)
    torch.testing.assert_close(gz[tail], wz)
    torch.testing.assert_close(ga[tail], wa)


@on_gpu
def test_gpu_inductor_fullgraph():
    torch._dynamo.reset()
    z, y, adv = _gpu_inputs(256, 32000, torch.bfloat16)
    fn = torch.compile(lambda z, y, a: acc.smooth_adv_comp_sum_loss(z, y, a), fullgraph=True)
    z1, a1 = z.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    z2, a2 = z.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    out = fn(z1, y, a1)
    out.backward()
    want = acc.smooth_adv_comp_sum_loss(z2, y, a2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(a1.grad, a2.grad)
