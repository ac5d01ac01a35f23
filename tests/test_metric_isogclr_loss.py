"""iSogCLR (P19): the reference against independent forms (a literal loop transcription of the
authors' update, closed-form limits, torch autograd of the eager code), and the accelerated path's
behaviour (explicit state, module, input hygiene, compile, skipped work, device-side bad values)."""

import importlib
import math

import numpy as np
import pytest
import torch

acc_mod = importlib.import_module("twinops.accelerated.metric.isogclr_loss")  # the package exports a function of the same name
from twinops.accelerated.metric.isogclr_loss import ISogCLRLoss
from twinops.accelerated.metric.isogclr_loss import isogclr_loss as acc_loss
from twinops.conformance.baselines.metric.isogclr_loss import isogclr_loss as eager_loss
from twinops.reference.metric.isogclr_loss import isogclr_init_state, isogclr_loss, isogclr_loss_grad

HYPER = dict(gamma=0.7, rho=6.0, eta=0.05, beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10)


def _unit(rng, b, d):
    x = rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _warm_state(rng, b):
    return np.stack([rng.uniform(0.01, 0.5, b), rng.uniform(0.1, 2.0, b), rng.uniform(0.0, 30.0, b),
                     rng.uniform(-2.0, 2.0, b)], axis=1)


def _loop_side(sim, state, hp):
    """The image side of the authors' SogCLR_DRO_Loss.forward, transcribed entry by entry with
    Python floats (rows anchored; call with the transposed similarity for the text side)."""
    bsz = len(sim)
    losses, new_state = [], []
    for i in range(bsz):
        tau, s, b, u = state[i]
        diffs = [sim[i][j] - sim[i][i] for j in range(bsz)]
        hats = [dj / tau for dj in diffs]
        b_new = max(b, max(hats))
        exps = [math.exp(hj - b_new) for hj in hats]  # no mask: the positive's own term is summed
        g = sum(exps) / (bsz - 1)
        s_new = (1 - hp["gamma"]) * s * math.exp(b - b_new) + hp["gamma"] * g
        weights = [ej / (s_new + hp["eps"]) for ej in exps]
        losses.append(sum(wj * dj for wj, dj in zip(weights, diffs)) / (bsz - 1))
        grad_tau = math.log(s_new) + b_new + hp["rho"] - sum(wj * hj for wj, hj in zip(weights, hats)) / (bsz - 1)
        u_new = (1 - hp["beta_u"]) * u + hp["beta_u"] * min(max(grad_tau, -hp["grad_clip"]), hp["grad_clip"])
        tau_new = min(max(tau - hp["eta"] * u_new, hp["tau_min"]), hp["tau_max"])
        new_state.append([tau_new, s_new, b_new, u_new])
    return losses, np.array(new_state)


def test_reference_matches_a_loop_transcription_of_the_authors_update():
    rng = np.random.default_rng(3)
    x, y = _unit(rng, 6, 5), _unit(rng, 6, 5)
    st_i, st_t = _warm_state(rng, 6), isogclr_init_state(6, tau_init=0.03)
    sim = (x @ y.T).tolist()
    li, ni = _loop_side(sim, st_i, HYPER)
    lt, nt = _loop_side(np.array(sim).T.tolist(), st_t, HYPER)
    loss, new_i, new_t = isogclr_loss(x, y, st_i, st_t, **HYPER)
    np.testing.assert_allclose(loss, np.mean(li) + np.mean(lt), rtol=1e-12)
    np.testing.assert_allclose(new_i, ni, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new_t, nt, rtol=1e-12, atol=1e-14)


def test_gamma_one_limits_are_softmax_expectation_and_tau_derivative():
    """With gamma = 1 (no memory) and eps = 0: s' = g, so the image loss of row i is the softmax(h_i / tau_i)
    expectation of h_i (over all B columns), and the temperature gradient is the derivative in tau of
    tau log((1/(B-1)) sum_j exp(h_ij / tau)) + tau rho (read off u' with beta_u = 1, u = 0)."""
    rng = np.random.default_rng(4)
    b = 5
    x, y = _unit(rng, b, 4), _unit(rng, b, 4)
    st = isogclr_init_state(b, tau_init=0.2)
    hp = dict(gamma=1.0, rho=3.0, eta=0.0, beta_u=1.0, grad_clip=1e6, eps=0.0)
    loss, new_i, new_t = isogclr_loss(x, y, st, st, **hp)
    h = x @ y.T - np.diag(x @ y.T)[:, None]
    p = np.exp(h / 0.2) / np.exp(h / 0.2).sum(axis=1, keepdims=True)
    ht = (x @ y.T - np.diag(x @ y.T)[None, :]).T  # rows = texts
    pt = np.exp(ht / 0.2) / np.exp(ht / 0.2).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(loss, (p * h).sum(1).mean() + (pt * ht).sum(1).mean(), rtol=1e-12)

    def dro(tau, row):
        return tau * np.log(np.exp(row / tau).sum() / (b - 1)) + tau * hp["rho"]

    step = 1e-6
    fd = np.array([(dro(0.2 + step, h[i]) - dro(0.2 - step, h[i])) / (2 * step) for i in range(b)])
    np.testing.assert_allclose(new_i[:, 3], fd, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(new_i[:, 1], np.exp(h / 0.2 - new_i[:, 2:3]).sum(1) / (b - 1), rtol=1e-12)
    assert np.all(new_i[:, 0] == 0.2) and np.all(new_t[:, 0] == 0.2)  # eta = 0 leaves tau alone


def test_surrogate_gradient_equals_autograd_of_the_eager_code_in_float64():
    rng = np.random.default_rng(5)
    x, y = _unit(rng, 7, 6), _unit(rng, 7, 6)
    st_i, st_t = _warm_state(rng, 7), _warm_state(rng, 7)
    xt, yt = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    loss, new_i, new_t = eager_loss(xt, yt, torch.tensor(st_i), torch.tensor(st_t), **HYPER)
    loss.backward(torch.tensor(-0.7, dtype=torch.float64))
    want = isogclr_loss_grad(-0.7, x, y, st_i, st_t, **HYPER)
    np.testing.assert_allclose(want["image_features"], xt.grad.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(want["text_features"], yt.grad.numpy(), rtol=1e-10, atol=1e-13)
    ref = isogclr_loss(x, y, st_i, st_t, **HYPER)
    np.testing.assert_allclose(ref[0], loss.item(), rtol=1e-12)
    np.testing.assert_allclose(ref[1], new_i.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ref[2], new_t.numpy(), rtol=1e-12)


def test_reference_does_not_write_its_inputs():
    rng = np.random.default_rng(6)
    args = [_unit(rng, 4, 3), _unit(rng, 4, 3), _warm_state(rng, 4), _warm_state(rng, 4)]
    before = [a.copy() for a in args]
    isogclr_loss(*args)
    isogclr_loss_grad(1.0, *args)
    assert all(np.array_equal(a, b) for a, b in zip(args, before))


# ------------------------------------------------------------------------------------ accelerated


def _torch_inputs(b=6, d=5, seed=0, grad=True):
    rng = np.random.default_rng(seed)
    x = torch.tensor(_unit(rng, b, d), dtype=torch.float32, requires_grad=grad)
    y = torch.tensor(_unit(rng, b, d), dtype=torch.float32, requires_grad=grad)
    st_i = torch.tensor(_warm_state(rng, b), dtype=torch.float32)
    st_t = torch.tensor(_warm_state(rng, b), dtype=torch.float32)
    return x, y, st_i, st_t


def test_three_training_steps_with_the_state_fed_back_match_the_reference():
    """The explicit-state contract: gather, call, store back. Three steps with new features each time."""
    rng = np.random.default_rng(7)
    n, b, d = 9, 5, 4
    ref_i, ref_t = isogclr_init_state(n), isogclr_init_state(n)
    acc_i, acc_t = torch.tensor(ref_i, dtype=torch.float32), torch.tensor(ref_t, dtype=torch.float32)
    for step in range(3):
        ids = rng.permutation(n)[:b]
        x, y = _unit(rng, b, d).astype(np.float32), _unit(rng, b, d).astype(np.float32)
        _, new_i, new_t = isogclr_loss(x.astype(np.float64), y.astype(np.float64), ref_i[ids], ref_t[ids], **HYPER)
        ref_i[ids], ref_t[ids] = new_i, new_t
        tids = torch.tensor(ids)
        _, a_i, a_t = acc_loss(torch.tensor(x), torch.tensor(y), acc_i[tids], acc_t[tids], **HYPER)
        acc_i[tids], acc_t[tids] = a_i, a_t
        ref_i, ref_t = acc_i.double().numpy().copy(), acc_t.double().numpy().copy()  # same rounded state next step
        np.testing.assert_allclose(a_i.numpy(), new_i, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a_t.numpy(), new_t, rtol=1e-4, atol=1e-5)


def test_module_keeps_dataset_state_and_matches_the_functional_form():
    x, y, _, _ = _torch_inputs(4, 5)
    module = ISogCLRLoss(10, tau_init=0.05, eta=0.01)
    ids_i, ids_t = torch.tensor([7, 2, 5, 0]), torch.tensor([1, 2, 3, 9])
    want, new_i, new_t = acc_loss(x, y, isogclr_init_state_torch(4, 0.05), isogclr_init_state_torch(4, 0.05),
                                  eta=0.01)
    got = module(x, y, ids_i, ids_t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(module.state_image[ids_i], new_i)
    torch.testing.assert_close(module.state_text[ids_t], new_t)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[ids_i] = False
    assert torch.all(module.state_image[untouched] == torch.tensor([0.05, 0.0, 0.0, 0.0]))
    module.eval()
    frozen = module.state_image.clone()
    module(x, y, ids_i, ids_t)
    assert torch.equal(module.state_image, frozen)  # evaluation does not move the estimators


def isogclr_init_state_torch(n, tau):
    return acc_mod.isogclr_init_state(n, tau_init=tau)


def test_inputs_states_and_incoming_gradient_are_not_written():
    x, y, st_i, st_t = _torch_inputs()
    saved = [t.detach().clone() for t in (x, y, st_i, st_t)]
    loss, _, _ = acc_loss(x, y, st_i, st_t)
    g = torch.tensor(0.75)
    g0 = g.clone()
    loss.backward(g)
    assert all(torch.equal(a.detach(), b) for a, b in zip((x, y, st_i, st_t), saved)) and torch.equal(g, g0)


def test_new_states_are_float32_and_carry_no_gradient():
    x, y, st_i, st_t = _torch_inputs()
    loss, new_i, new_t = acc_loss(x.half(), y.half(), st_i.double(), st_t.half())
    assert loss.dtype == torch.float16 and new_i.dtype == new_t.dtype == torch.float32
    assert not new_i.requires_grad and not new_t.requires_grad and loss.requires_grad


def test_compiles_as_one_graph_forward_and_backward():
    x, y, st_i, st_t = _torch_inputs()

    def step(x, y, st_i, st_t):
        loss, new_i, new_t = acc_loss(x, y, st_i, st_t, eta=0.01)
        return loss * 2, new_i, new_t

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, st_i, st_t)
    (gx, gy) = torch.autograd.grad(got[0], (x, y))
    want = step(x, y, st_i, st_t)
    (wx, wy) = torch.autograd.grad(want[0], (x, y))
    for a, b in zip(got + (gx, gy), want + (wx, wy)):
        torch.testing.assert_close(a, b)


def test_no_gradient_kernels_for_inputs_that_do_not_ask(monkeypatch):
    calls = []
    real = acc_mod._isogclr_bwd
    monkeypatch.setattr(acc_mod, "_isogclr_bwd", lambda *a: calls.append(1) or real(*a))
    x, y, st_i, st_t = _torch_inputs(grad=False)
    x.requires_grad_(True)
    loss, _, _ = acc_loss(x, y, st_i, st_t)
    loss.backward()
    assert len(calls) == 1 and y.grad is None  # only d/d image_features was computed
    with torch.no_grad():
        loss, _, _ = acc_loss(x, y, st_i, st_t)
    assert loss.grad_fn is None


@pytest.mark.parametrize("scale", [2.0 ** 15, 0.0])
def test_fp16_backward_under_an_amp_sized_or_zero_upstream_gradient(scale):
    """P is normalised by the largest upstream gradient: a GradScaler-sized 2**15 neither overflows
    the fp16 copy of P nor changes the result; a zero upstream gradient gives zeros, not NaN."""
    x, y, st_i, st_t = _torch_inputs(17, 8, grad=False)
    xh, yh = x.half().requires_grad_(True), y.half().requires_grad_(True)
    loss, _, _ = acc_loss(xh, yh, st_i, st_t)
    gx, gy = torch.autograd.grad(loss, (xh, yh), torch.tensor(scale, dtype=torch.float16))
    xr, yr = xh.detach().double().numpy(), yh.detach().double().numpy()
    want = isogclr_loss_grad(scale, xr, yr, st_i.double().numpy(), st_t.double().numpy())
    for got, ref in ((gx, want["image_features"]), (gy, want["text_features"])):
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-3, atol=2e-3 * max(scale, 1.0) * 1e-2)


def test_invalid_state_poisons_the_loss_and_that_sample_only():
    x, y, st_i, st_t = _torch_inputs(grad=False)
    st_i[2, 0] = 0.0  # temperature 0
    loss, new_i, new_t = acc_loss(x, y, st_i, st_t)
    assert torch.isnan(loss)
    assert torch.isnan(new_i[2]).all() and torch.isfinite(new_i[[0, 1, 3, 4, 5]]).all()
    assert torch.isfinite(new_t).all()  # the text side does not read image temperatures
    with pytest.raises(ValueError, match="state_image"):
        isogclr_loss(x.double().numpy(), y.double().numpy(), st_i.double().numpy(), st_t.double().numpy())


def test_strided_views_equal_contiguous():
    x, y, st_i, st_t = _torch_inputs(17, 6, grad=False)
    xt = x.t().contiguous().t()
    st_view = torch.zeros(17, 8)
    st_view[:, ::2] = st_i
    got = acc_loss(xt, y, st_view[:, ::2], st_t)
    want = acc_loss(x, y, st_i, st_t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,match", [
    (lambda x, y, si, st: acc_loss(x[:1], y[:1], si[:1], st[:1]), "image_features"),
    (lambda x, y, si, st: acc_loss(x, y[:, :3], si, st), "text_features"),
    (lambda x, y, si, st: acc_loss(x, y.half(), si, st), "text_features"),
    (lambda x, y, si, st: acc_loss(x, y, si[:, :3], st), "state_image"),
    (lambda x, y, si, st: acc_loss(x, y, si, st.long()), "state_text"),
    (lambda x, y, si, st: acc_loss(x, y, si, st, tau_max=1e-3), "tau_max"),
    (lambda x, y, si, st: acc_loss(x, y, si, st, gamma=2.0), "gamma"),
])
def test_clear_errors_name_the_argument(call, match):
    x, y, st_i, st_t = _torch_inputs(grad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, y, st_i, st_t)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,d", [(1000, 256), (700, 1024)])
def test_gpu_tiles_match_the_reference(dtype, b, d):
    """Compiled tiles (resident D <= 256, chunked D > 256) against float64 at moderate batches."""
    rng = np.random.default_rng(11)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    st_i, st_t = _warm_state(rng, b), isogclr_init_state(b)
    xt = torch.tensor(x, device="cuda", dtype=dtype, requires_grad=True)
    yt = torch.tensor(y, device="cuda", dtype=dtype, requires_grad=True)
    loss, new_i, new_t = acc_loss(xt, yt, torch.tensor(st_i, device="cuda"), torch.tensor(st_t, device="cuda"))
    loss.backward()
    xr, yr = xt.detach().double().cpu().numpy(), yt.detach().double().cpu().numpy()  # the rounded inputs
    want = isogclr_loss(xr, yr, st_i, st_t)
    grads = isogclr_loss_grad(1.0, xr, yr, st_i, st_t)
    # fp32 similarities err by ~1e-7 sqrt(D), amplified by 1/tau (up to 100 here) in every exponent;
    # 16-bit outputs are rounded, and the backward's P is rounded to bf16 (fp16 adds the error back).
    rtol = {torch.float32: 1e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(loss.item(), want[0], rtol=rtol)
    for got, ref in ((new_i, want[1]), (new_t, want[2])):
        scale = np.maximum(1.0, np.abs(ref).max(axis=1, keepdims=True))
        assert np.max(np.abs(got.cpu().double().numpy() - ref) / scale) < 1e-3
    for got, ref in ((xt.grad, grads["image_features"]), (yt.grad, grads["text_features"])):
        err = np.linalg.norm(got.double().cpu().numpy() - ref) / np.linalg.norm(ref)
        assert err < rtol, err


@on_gpu
def test_gpu_extra_memory_is_linear_in_the_batch():
    b, d = 16384, 256
    x = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    state = acc_mod.isogclr_init_state(b, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _, _ = acc_loss(x, y, state, state)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * b * d * 2 + 64 * b * 4 + (1 << 20), extra  # the two gradients + O(B) statistics


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """Row strides of 2**21 elements over 2048 rows: element offsets reach 2**32."""
    b, d, stride = 2048, 64, 1 << 21
    try:
        buf_x = torch.zeros(b, stride, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 8 GiB buffer")
    buf_x[:, :d] = torch.randn(b, d, device="cuda", dtype=torch.bfloat16)
    x = buf_x[:, :d]
    y = torch.randn(b, d, device="cuda", dtype=torch.bfloat16)
    state = acc_mod.isogclr_init_state(b, device="cuda")
    got = acc_loss(x, y, state, state)
    want = acc_loss(x.contiguous(), y, state, state)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
