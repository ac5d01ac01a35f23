"""MSE distillation losses: logit_mse_distillation (P45) and softmax_mse_distillation (P60). The
references against independent forms (torch's mse_loss, per-row loops, the single-target form,
hand-computed values), and the accelerated path's behaviour beyond numerical agreement (which
tests/test_conformance.py checks): the teacher never gets a gradient."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinops.reference.classification.distillation import (
    logit_mse_distillation,
    logit_mse_distillation_grad,
    softmax_mse_distillation,
    softmax_mse_distillation_grad,
)

acc = importlib.import_module("twinops.accelerated.classification.distillation")

REDUCTIONS = ["none", "mean", "sum"]


def pair(seed=0, n=5, c=7):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, c)) * 2
    return s, s + rng.normal(size=(n, c)), rng.integers(0, c, size=n)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fd_vjp(f, x, g, h=1e-6):
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[idx] = np.sum(g * (f(xp) - f(xm))) / (2 * h)
    return out


def upstream(reduction, n):
    return np.random.default_rng(9).uniform(0.5, 2, size=n) if reduction == "none" else np.float64(1.7)


# --- logit MSE: reference -----------------------------------------------------------------------


def test_logit_mse_equals_torch_mse_loss():
    s, t, _ = pair(1)
    want = F.mse_loss(torch.tensor(s), torch.tensor(t)).item()
    np.testing.assert_allclose(logit_mse_distillation(s, t), want, rtol=1e-14)
    want_sum = F.mse_loss(torch.tensor(s), torch.tensor(t), reduction="sum").item()
    np.testing.assert_allclose(logit_mse_distillation(s, t, reduction="sum"), want_sum / s.shape[1], rtol=1e-14)
    rows = [sum((a - b) ** 2 for a, b in zip(si, ti)) / len(si) for si, ti in zip(s, t)]
    np.testing.assert_allclose(logit_mse_distillation(s, t, reduction="none"), rows, rtol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logit_mse_gradient(reduction):
    s, t, _ = pair(2)
    g = upstream(reduction, 5)
    got = logit_mse_distillation_grad(g, s, t, reduction=reduction)
    np.testing.assert_allclose(got, fd_vjp(lambda v: logit_mse_distillation(v, t, reduction=reduction), s, g),
                               rtol=1e-6, atol=1e-9)


def test_logit_mse_empty_batch_and_bad_inputs():
    assert np.isnan(logit_mse_distillation(np.zeros((0, 3)), np.zeros((0, 3))))
    assert logit_mse_distillation(np.zeros((0, 3)), np.zeros((0, 3)), reduction="sum") == 0.0
    with pytest.raises(ValueError, match="teacher_logits"):
        logit_mse_distillation(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(TypeError, match="student_logits"):
        logit_mse_distillation(np.zeros((2, 3), bool), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="reduction"):
        logit_mse_distillation(np.zeros((2, 3)), np.zeros((2, 3)), reduction="avg")


# --- softmax MSE: reference ---------------------------------------------------------------------


def test_softmax_mse_hand_computed():
    """z = (0, 0): p = (1/2, 1/2); y = 0; t with q = (1/4, 3/4) (t = (0, log 3)).
    (p - onehot)^2 = (1/4, 1/4), (p - q)^2 = (1/16, 1/16); alpha = 0.6:
    loss = 0.6 * 1/4 + 0.4 * 1/16 = 0.175."""
    got = softmax_mse_distillation(np.zeros((1, 2)), np.array([0]), np.array([[0.0, math.log(3)]]), reduction="none")
    np.testing.assert_allclose(got, [0.175], rtol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 0.25])
def test_softmax_mse_equals_torch_mse_and_single_target_form(alpha):
    z, t, y = pair(3)
    p, q, onehot = softmax(z), softmax(t), np.eye(z.shape[1])[y]
    want = (alpha * F.mse_loss(torch.tensor(p), torch.tensor(onehot))
            + (1 - alpha) * F.mse_loss(torch.tensor(p), torch.tensor(q))).item()
    np.testing.assert_allclose(softmax_mse_distillation(z, y, t, alpha=alpha), want, rtol=1e-13)
    # mean((p - (alpha onehot + (1 - alpha) q))^2) differs from the loss by a constant in z.
    mixed = alpha * onehot + (1 - alpha) * q
    const = softmax_mse_distillation(z, y, t, alpha=alpha, reduction="none") - np.mean((p - mixed) ** 2, axis=1)
    z2 = z + np.random.default_rng(4).normal(size=z.shape)
    const2 = (softmax_mse_distillation(z2, y, t, alpha=alpha, reduction="none")
              - np.mean((softmax(z2) - mixed) ** 2, axis=1))
    np.testing.assert_allclose(const2, const, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_softmax_mse_gradient(reduction, alpha):
    z, t, y = pair(5)
    y[1] = -100
    z[1, 0] = np.nan
    g = upstream(reduction, 5)
    kw = dict(alpha=alpha, reduction=reduction)
    got = softmax_mse_distillation_grad(g, z, y, t, **kw)
    assert np.all(got[1] == 0.0)
    active = y != -100
    fd = fd_vjp(lambda v: softmax_mse_distillation(np.where(active[:, None], v, 0.0), y, t, **kw),
                np.where(active[:, None], z, 0.0), g)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-10)


def test_softmax_mse_student_equal_to_teacher_and_one_class():
    z, _, y = pair(6)
    # alpha = 0 and the teacher's logits shifted per row: the same softmax, loss exactly 0.
    assert np.all(softmax_mse_distillation(z, y, z + 3.0, alpha=0.0, reduction="none") < 1e-30)
    assert np.all(softmax_mse_distillation(z[:, :1], np.zeros(5, int), z[:, :1], reduction="none") == 0.0)


@pytest.mark.parametrize("kw,exc", [(dict(alpha=-0.1), ValueError), (dict(alpha=1.1), ValueError),
                                    (dict(alpha=float("nan")), ValueError), (dict(alpha=None), TypeError)])
def test_softmax_mse_bad_alpha(kw, exc):
    z, t, y = pair(7)
    with pytest.raises(exc, match=r"^alpha "):
        softmax_mse_distillation(z, y, t, **kw)


# --- accelerated --------------------------------------------------------------------------------


def tensors(seed=0, n=5, c=37):
    s, t, y = pair(seed, n, c)
    y[2] = -100
    return torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y)


def test_logit_mse_kernel_equals_torch():
    s, t, _ = tensors(1)
    sg, sd = s.clone().requires_grad_(True), s.double().requires_grad_(True)
    out = acc.logit_mse_distillation(sg, t)
    want = F.mse_loss(sd, t.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-6, atol=1e-7)
    (g,), (gd,) = torch.autograd.grad(out, [sg]), torch.autograd.grad(want, [sd])
    torch.testing.assert_close(g.double(), gd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["logit", "softmax"])
def test_teacher_gets_no_gradient(name):
    s, t, y = tensors(2)
    sg, tg = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = acc.logit_mse_distillation(sg, tg) if name == "logit" else acc.softmax_mse_distillation(sg, y, tg)
    out.backward()
    assert sg.grad is not None and tg.grad is None
    # A teacher alone requiring grad: nothing to differentiate.
    out = acc.logit_mse_distillation(s, tg) if name == "logit" else acc.softmax_mse_distillation(s, y, tg)
    assert out.grad_fn is None


def test_modules_match_functions():
    s, t, y = tensors(3)
    torch.testing.assert_close(acc.LogitMSEDistillation(reduction="sum")(s, t),
                               acc.logit_mse_distillation(s, t, reduction="sum"))
    torch.testing.assert_close(acc.SoftmaxMSEDistillation(alpha=0.3)(s, y, t),
                               acc.softmax_mse_distillation(s, y, t, alpha=0.3))


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc, "_logit_mse_backward_kernel", _NoLaunch())
    monkeypatch.setattr(acc, "_softmax_mse_backward_kernel", _NoLaunch())
    s, t, y = tensors(4)
    assert acc.logit_mse_distillation(s, t).grad_fn is None
    assert acc.softmax_mse_distillation(s, y, t).grad_fn is None
    with torch.no_grad():
        sg = s.clone().requires_grad_(True)
        assert acc.logit_mse_distillation(sg, t).grad_fn is None
        assert acc.softmax_mse_distillation(sg, y, t).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda s, y, t: acc.softmax_mse_distillation(s, y, t) + acc.logit_mse_distillation(s, t),
                       fullgraph=True, backend="aot_eager")
    s, t, y = tensors(5, c=20)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = fn(s1, y, t)
    out.backward()
    want = acc.softmax_mse_distillation(s2, y, t) + acc.logit_mse_distillation(s2, t)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_inputs_are_kept():
    s, t, y = tensors(6)
    before = (s.clone(), t.clone(), y.clone())
    sg = s.clone().requires_grad_(True)
    (acc.softmax_mse_distillation(sg, y, t, reduction="sum") + acc.logit_mse_distillation(sg, t)).backward()
    assert torch.equal(t, before[1]) and torch.equal(y, before[2]) and torch.equal(sg.detach(), before[0])


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_logits=torch.zeros(4, 2)), "teacher_logits"),
    (dict(teacher_logits=torch.zeros(4, 3, dtype=torch.float16)), "teacher_logits"),
    (dict(teacher_logits=torch.zeros(4, 3, dtype=torch.long)), "teacher_logits"),
    (dict(logits=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(target=torch.zeros(4)), "target"),
    (dict(alpha=1.5), "alpha"),
    (dict(reduction="avg"), "reduction"),
])
def test_softmax_mse_bad_arguments_are_named(bad, match):
    args = dict(logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long),
                teacher_logits=torch.zeros(4, 3)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc.softmax_mse_distillation(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_logits=torch.zeros(4, 2)), "teacher_logits"),
    (dict(student_logits=torch.zeros(4)), "student_logits"),
    (dict(student_logits=torch.zeros(4, 0), teacher_logits=torch.zeros(4, 0)), "student_logits"),
    (dict(reduction="avg"), "reduction"),
])
def test_logit_mse_bad_arguments_are_named(bad, match):
    args = dict(student_logits=torch.zeros(4, 3), teacher_logits=torch.zeros(4, 3)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc.logit_mse_distillation(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
GPU_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _gpu_inputs(n, c, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(n, c, device="cuda", generator=gen).to(dtype)
    t = (s.float() + 0.5 * torch.randn(n, c, device="cuda", generator=gen)).to(dtype)
    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
    y[::7] = -100
    return s, t, y


def _check(loss, grad, want, want_g, dtype, c):
    rtol = GPU_RTOL[dtype]
    np.testing.assert_allclose(loss.double().cpu().numpy(), want, rtol=rtol, atol=1e-6 * math.sqrt(c))
    # fp16 gradients of O(1 / C^2) underflow below its smallest subnormal, 2**-24, as any fp16 output would.
    floor = 2.0**-24 if dtype == torch.float16 else 0.0
    np.testing.assert_allclose(grad.double().cpu().numpy(), want_g, rtol=rtol,
                               atol=rtol * np.abs(want_g).max() + floor)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,c", [(64, 32000), (8, 128256)])
def test_gpu_benchmark_rows_match_the_reference(dtype, n, c):
    """The compiled 4096-wide chunks on vocabulary-sized rows, against float64 on the rounded inputs."""
    s, t, y = _gpu_inputs(n, c, dtype)
    s64, t64, y64 = s.double().cpu().numpy(), t.double().cpu().numpy(), y.cpu().numpy().astype(np.int64)
    sg = s.clone().requires_grad_(True)
    loss = acc.logit_mse_distillation(sg, t, reduction="none")
    g = torch.rand_like(loss) + 0.5
    (gs,) = torch.autograd.grad(loss, [sg], g)
    g64 = g.double().cpu().numpy()
    _check(loss, gs, logit_mse_distillation(s64, t64, reduction="none"),
           logit_mse_distillation_grad(g64, s64, t64, reduction="none"), dtype, c)
    loss = acc.softmax_mse_distillation(sg, y, t, reduction="none")
    (gs,) = torch.autograd.grad(loss, [sg], g)
    _check(loss, gs, softmax_mse_distillation(s64, y64, t64, reduction="none"),
           softmax_mse_distillation_grad(g64, s64, y64, t64, reduction="none"), dtype, c)


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """(16 400, 131 072) bf16 logits: the last rows start past element 2**31."""
    n, c = 16_400, 131_072
    try:
        s, t, y = _gpu_inputs(n, c, torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    tail = slice(n - 3, n)
    for fn in (lambda s, y, t: acc.logit_mse_distillation(s, t, reduction="none"),
               lambda s, y, t: acc.softmax_mse_distillation(s, y, t, reduction="none")):
        sg = s.detach().requires_grad_(True)
        loss = fn(sg, y, t)
        (gs,) = torch.autograd.grad(loss, [sg], torch.ones_like(loss))
        s2 = s[tail].detach().clone().requires_grad_(True)
        want = fn(s2, y[tail], t[tail])
        (ws,) = torch.autograd.grad(want, [s2], torch.ones_like(want))
        torch.testing.assert_close(loss[tail], want)
        torch.testing.assert_close(gs[tail], ws)
        del gs, sg


@on_gpu
def test_gpu_inductor_fullgraph():
    torch._dynamo.reset()
    s, t, y = _gpu_inputs(256, 32000, torch.bfloat16)
    fn = torch.compile(lambda s, y, t: acc.softmax_mse_distillation(s, y, t) + acc.logit_mse_distillation(s, t),
                       fullgraph=True)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = fn(s1, y, t)
    out.backward()
    want = acc.softmax_mse_distillation(s2, y, t) + acc.logit_mse_distillation(s2, t)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s1.grad, s2.grad)
