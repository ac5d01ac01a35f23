"""ELECTRA (P35): the reference against independent forms (torch's cross-entropy and BCE, a
per-slot loop, a hand-computed example, the Gumbel-max distribution), and the accelerated path's
behaviour beyond numerical agreement (which tests/test_conformance.py checks)."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

acc_module = importlib.import_module("twinops.accelerated.classification.electra")
from twinops.accelerated.classification.electra import ElectraGeneratorSample, RTDLoss
from twinops.accelerated.classification.electra import electra_generator_sample as acc_generator
from twinops.accelerated.classification.electra import rtd_loss as acc_rtd
from twinops.reference.classification.electra import (
    electra_generator_sample,
    electra_generator_sample_grad,
    rtd_loss,
    rtd_loss_grad,
)

REDUCTIONS = ["none", "mean", "sum"]


def generator_inputs(m=6, h=5, v=9, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        hidden=rng.normal(size=(m, h)), weight=rng.normal(size=(v, h)) / np.sqrt(h), bias=rng.normal(size=v),
        target=rng.integers(0, v, m), slot_weight=np.array([1.0, 1, 0, 1, 1, 0]) if m == 6 else np.ones(m),
        noise=rng.random((m, v), dtype=np.float32),
    )


def loop_generator(hidden, weight, target, slot_weight, noise, bias, temperature, disallow_correct):
    """The paper's formulas slot by slot, in plain Python."""
    m, v = len(target), weight.shape[0]
    total, samples = 0.0, []
    for i in range(m):
        logits = [float(np.dot(hidden[i], weight[k]) + bias[k]) for k in range(v)]
        lse = math.log(sum(math.exp(z) for z in logits))
        total += slot_weight[i] * (lse - logits[target[i]])
        scores = [logits[k] / temperature - 1000.0 * (disallow_correct and k == target[i])
                  - math.log(-math.log(noise[i, k] + 1e-9) + 1e-9) for k in range(v)]
        samples.append(max(range(v), key=lambda k: (scores[k], -k)))
    return total / (float(np.sum(slot_weight)) + 1e-6), np.array(samples)


# --- reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.5, True), (3.0, False)])
def test_generator_matches_the_per_slot_loop(temperature, disallow):
    x = generator_inputs()
    loss, samples = electra_generator_sample(**x, temperature=temperature, disallow_correct=disallow)
    want_loss, want_samples = loop_generator(**x, temperature=temperature, disallow_correct=disallow)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_array_equal(samples, want_samples)


def test_generator_loss_is_weighted_cross_entropy():
    """Independent anchor: torch's cross_entropy on the materialised logits, masked slots dropped."""
    x = generator_inputs()
    logits = torch.tensor(x["hidden"]) @ torch.tensor(x["weight"]).T + torch.tensor(x["bias"])
    ce = F.cross_entropy(logits, torch.tensor(x["target"]), reduction="none").numpy()
    w = x["slot_weight"].astype(np.float64)
    terms, _ = electra_generator_sample(**x, reduction="none")
    np.testing.assert_allclose(terms, w * ce, rtol=1e-12)
    loss, _ = electra_generator_sample(**x)
    np.testing.assert_allclose(loss, (w * ce).sum() / (w.sum() + 1e-6), rtol=1e-12)


def test_generator_hand_computed_example():
    """H = 1, V = 2, logits (1, 0): loss log(1 + e^-1). Noise (0.5, 0.9) gives Gumbels (0.3665, 2.2504):
    at T = 1 the scores are (1.3665, 2.2504) and token 1 wins; at T = 0.5 they are (2.3665, 2.2504)
    and token 0 wins."""
    args = dict(hidden=[[1.0]], weight=[[1.0], [0.0]], target=np.array([0]), slot_weight=np.ones(1),
                noise=np.array([[0.5, 0.9]]))
    loss, s = electra_generator_sample(**args)
    assert loss == pytest.approx(math.log1p(math.exp(-1.0)) / (1 + 1e-6), rel=1e-12)
    g = [-math.log(-math.log(u + 1e-9) + 1e-9) for u in (0.5, 0.9)]
    assert g == pytest.approx([0.36651, 2.25037], abs=1e-5)
    assert s.tolist() == [1]
    assert electra_generator_sample(**args, temperature=0.5)[1].tolist() == [0]


def test_generator_samples_follow_softmax_over_temperature():
    """Gumbel-max with uniform noise draws from softmax(h / T): chi-square with 4 degrees of freedom
    below 18.47, its 1e-3 critical value."""
    rng = np.random.default_rng(3)
    n, v, t = 40000, 5, 0.7
    h = np.array([[0.3, -1.0, 1.2, 0.0, 0.5]])
    args = dict(hidden=np.repeat(h, n, axis=0), weight=np.eye(v), target=np.zeros(n, np.int64),
                slot_weight=np.ones(n), noise=rng.random((n, v)))
    _, samples = electra_generator_sample(**args, temperature=t)
    p = np.exp(h[0] / t) / np.exp(h[0] / t).sum()
    counts = np.bincount(samples, minlength=v)
    expected = p * n
    assert np.sum((counts - expected) ** 2 / expected) < 18.47


def test_generator_zero_weight_slots_and_ties():
    x = generator_inputs()
    x["hidden"][2] = np.nan  # slot 2 has weight 0
    loss, samples = electra_generator_sample(**x)
    assert np.isfinite(loss) and samples[2] == -1
    grads = electra_generator_sample_grad(np.array(1.0), **x)
    assert np.all(grads["hidden"][2] == 0) and np.all(np.isfinite(grads["weight"]))
    tie = dict(hidden=np.ones((1, 1)), weight=np.ones((4, 1)), target=np.array([3]), slot_weight=np.ones(1),
               noise=np.full((1, 4), 0.25))
    assert electra_generator_sample(**tie)[1].tolist() == [0]
    assert electra_generator_sample(**tie, disallow_correct=True)[1].tolist() == [0]
    empty = electra_generator_sample(**{**x, "slot_weight": np.zeros(6)})[0]
    assert empty == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_generator_gradient_against_finite_differences(reduction):
    x = generator_inputs(m=4, h=3, v=5, seed=2)
    g = np.random.default_rng(4).normal(size=(4,) if reduction == "none" else ())
    grads = electra_generator_sample_grad(g, **x, reduction=reduction)
    for name in ("hidden", "weight", "bias"):
        def f(value, name=name):
            return electra_generator_sample(**{**x, name: value}, reduction=reduction)[0]
        fd = np.zeros_like(x[name])
        for idx in np.ndindex(x[name].shape):
            plus, minus = x[name].copy(), x[name].copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            fd[idx] = np.sum(g * (f(plus) - f(minus))) / 2e-6
        np.testing.assert_allclose(grads[name], fd, atol=1e-7)


def test_rtd_loss_is_masked_bce_mean():
    """Independent anchor: torch's BCE-with-logits over the real tokens, one global mean."""
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(3, 7)) * 3, rng.integers(0, 2, (3, 7))
    a = (np.arange(7)[None, :] < np.array([[7], [4], [1]])).astype(np.int64)
    bce = F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y, dtype=torch.float64),
                                             reduction="none").numpy()
    np.testing.assert_allclose(rtd_loss(z, y, a), (bce * a).sum() / (a.sum() + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(rtd_loss(z, y, a, reduction="none"), bce * a, rtol=1e-12)
    np.testing.assert_allclose(rtd_loss_grad(np.array(1.0), z, y, a),
                               a * (1 / (1 + np.exp(-z)) - y) / (a.sum() + 1e-6), rtol=1e-10, atol=1e-15)
    assert rtd_loss(z, y, np.zeros_like(a)) == 0.0


def test_rtd_loss_infinite_logits():
    z = np.array([[np.inf, -np.inf, np.inf, -np.inf]])
    y = np.array([[1, 0, 0, 1]])
    np.testing.assert_array_equal(rtd_loss(z, y, np.ones((1, 4)), reduction="none"), [[0, 0, np.inf, np.inf]])


@pytest.mark.parametrize("bad, match", [
    (dict(target=np.array([0, 9, 0, 0, 0, 0])), "target"),
    (dict(noise=np.ones((6, 9))), "noise"),
    (dict(weight=np.zeros((9, 4))), "weight"),
    (dict(bias=np.zeros(3)), "bias"),
    (dict(slot_weight=np.ones(2)), "slot_weight"),
    (dict(temperature=-1.0), "temperature"),
    (dict(disallow_correct="yes"), "disallow_correct"),
])
def test_reference_generator_errors_name_the_argument(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        electra_generator_sample(**{**generator_inputs(), **bad})


# --- accelerated ----------------------------------------------------------------------------------


def torch_inputs(x, dtype=torch.float32, grad=True):
    out = {k: torch.tensor(v) for k, v in x.items()}
    out["slot_weight"] = out["slot_weight"].float()
    for k in ("hidden", "weight", "bias"):
        if k in out:
            out[k] = out[k].to(dtype).requires_grad_(grad)
    return out


def test_accelerated_generator_matches_the_reference_without_bias():
    x = generator_inputs(m=17, h=18, v=33, seed=5)
    x.pop("bias")
    t = torch_inputs({k: v for k, v in x.items()}, grad=False)
    t["hidden"].requires_grad_(True)
    t["weight"].requires_grad_(True)
    loss, samples = acc_generator(**t, temperature=0.8)
    want, want_s = electra_generator_sample(**x, temperature=0.8)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    np.testing.assert_array_equal(samples.numpy(), want_s)
    dh, dw = torch.autograd.grad(loss, [t["hidden"], t["weight"]])
    g = electra_generator_sample_grad(np.array(1.0), **x, temperature=0.8)
    np.testing.assert_allclose(dh.numpy(), g["hidden"], atol=1e-6)
    np.testing.assert_allclose(dw.numpy(), g["weight"], atol=1e-6)


def test_module_matches_function():
    x = torch_inputs(generator_inputs(), grad=False)
    module = ElectraGeneratorSample(torch.nn.Parameter(x["weight"]), torch.nn.Parameter(x["bias"]),
                                    temperature=0.5)
    loss, samples = module(x["hidden"], x["target"], x["slot_weight"], x["noise"])
    want, want_s = acc_generator(**x, temperature=0.5)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(samples, want_s)
    loss.backward()
    assert module.weight.grad is not None and module.bias.grad is not None
    z = torch.randn(2, 5)
    y, a = torch.randint(0, 2, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(RTDLoss(reduction="sum")(z, y, a), acc_rtd(z, y, a, reduction="sum"))


def test_inputs_and_incoming_gradient_are_not_written():
    x = torch_inputs(generator_inputs(m=6, h=17, v=20, seed=1))
    copies = {k: v.detach().clone() for k, v in x.items()}
    loss, _ = acc_generator(**x, reduction="none")
    g = torch.randn(6)
    g_copy = g.clone()
    loss.backward(g)
    for k, v in x.items():
        torch.testing.assert_close(v.detach(), copies[k], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g, g_copy, rtol=0, atol=0)


def test_gumbel_noise_is_accurate_up_to_u_near_one():
    """The kernel's g(u) against float64 for random u, u within a few ulps of 1, and u = 0."""
    import triton
    import triton.language as tl

    @triton.jit
    def gumbel_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, acc_module._gumbel(tl.load(u_ptr + i, mask=i < n, other=0.5)), mask=i < n)

    top = np.float32(1) - np.arange(1, 100, dtype=np.float32) * np.float32(2**-24)
    u = np.concatenate([np.random.default_rng(0).random(1000, dtype=np.float32), top,
                        np.array([0, 1e-9, 0.5, 0.9, np.nextafter(np.float32(0.9), 0)], np.float32)])
    out = torch.empty(len(u))
    gumbel_kernel[(triton.cdiv(len(u), 256),)](torch.tensor(u), out, len(u), BLOCK=256)
    want = -np.log(-np.log(u.astype(np.float64) + 1e-9) + 1e-9)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_generator_dx_kernel", _NoLaunch())
    monkeypatch.setattr(acc_module, "_generator_dw_kernel", _NoLaunch())
    monkeypatch.setattr(acc_module, "_rtd_backward_kernel", _NoLaunch())
    x = torch_inputs(generator_inputs(), grad=False)
    loss, _ = acc_generator(**x)
    assert loss.grad_fn is None
    xg = torch_inputs(generator_inputs())
    with torch.no_grad():
        assert acc_generator(**xg)[0].grad_fn is None
    z = torch.randn(2, 5, requires_grad=True)
    with torch.no_grad():
        assert acc_rtd(z, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5)).grad_fn is None


def test_only_the_requested_gradients_are_computed(monkeypatch):
    """Only the bias requires grad: the dx kernel is not launched and the weight gradient is skipped."""
    monkeypatch.setattr(acc_module, "_generator_dx_kernel", _NoLaunch())
    x = torch_inputs(generator_inputs(), grad=False)
    x["bias"].requires_grad_(True)
    loss, _ = acc_generator(**x)
    (db,) = torch.autograd.grad(loss, [x["bias"]])
    want = electra_generator_sample_grad(np.array(1.0), **generator_inputs())["bias"]
    np.testing.assert_allclose(db.numpy(), want, atol=1e-6)


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda **kw: acc_generator(**kw, temperature=0.7), fullgraph=True, backend="aot_eager")
    x1, x2 = torch_inputs(generator_inputs()), torch_inputs(generator_inputs())
    out, s = fn(**x1)
    out.backward()
    want, want_s = acc_generator(**x2, temperature=0.7)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s, want_s)
    for k in ("hidden", "weight", "bias"):
        torch.testing.assert_close(x1[k].grad, x2[k].grad)
    rtd = torch.compile(lambda z, y, a: acc_rtd(z, y, a), fullgraph=True, backend="aot_eager")
    z1 = torch.randn(3, 6, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    y, a = torch.randint(0, 2, (3, 6)), torch.randint(0, 2, (3, 6))
    rtd(z1, y, a).backward()
    acc_rtd(z2, y, a).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.zeros(6, 5, dtype=torch.float64)), "float32"),
    (dict(weight=torch.zeros(9, 5, dtype=torch.float16)), "dtype"),
    (dict(weight=torch.zeros(9, 4)), "weight"),
    (dict(bias=torch.zeros(4)), "bias"),
    (dict(target=torch.zeros(6)), "target"),
    (dict(slot_weight=torch.ones(6, requires_grad=True)), "slot_weight"),
    (dict(noise=torch.rand(6, 8)), "noise"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    args = torch_inputs(generator_inputs(), grad=False) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc_generator(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.zeros(2, 5)), "labels"),
    (dict(attention_mask=torch.ones(2, 4)), "attention_mask"),
    (dict(logits=torch.zeros(10)), "logits"),
])
def test_rtd_bad_arguments_are_named(bad, match):
    args = dict(logits=torch.zeros(2, 5), labels=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises((TypeError, ValueError), match=match):
        acc_rtd(**(args | bad))


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
GPU_TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.6e-2, 2e-2)}


def _gpu_generator_check(m, h, v, dtype, **kw):
    """Loss terms, samples and gradients of the compiled kernels against the float64 reference on
    the rounded inputs. Samples may differ only at near-ties of the perturbed score."""
    loss_rtol, grad_tol = GPU_TOLERANCE[dtype]
    gen = torch.Generator(device="cuda").manual_seed(m + v)
    x = torch.randn(m, h, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(v, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    t = torch.randint(0, v, (m,), device="cuda", generator=gen)
    sw = (torch.rand(m, device="cuda", generator=gen) < 0.9).float()
    u = torch.rand(m, v, device="cuda", generator=gen)
    terms, samples = acc_generator(x, w, t, sw, u, b, reduction="none", **kw)
    g = torch.rand(m, device="cuda", generator=gen) + 0.5
    dx, dw, db = torch.autograd.grad(terms, [x, w, b], g.to(dtype))
    np_ = lambda a: a.detach().double().cpu().numpy()
    args = dict(hidden=np_(x), weight=np_(w), bias=np_(b), target=t.cpu().numpy(), slot_weight=np_(sw),
                noise=u.cpu().numpy())
    want, want_s = electra_generator_sample(**args, reduction="none", **kw)
    want_g = electra_generator_sample_grad(np_(g.to(dtype)), **args, reduction="none", **kw)
    np.testing.assert_allclose(np_(terms), want, rtol=loss_rtol, atol=loss_rtol * np.abs(want).max())
    assert (samples.cpu().numpy() == want_s).mean() > 0.999
    for got, name in ((dx, "hidden"), (dw, "weight"), (db, "bias")):
        ref = want_g[name]
        np.testing.assert_allclose(np_(got), ref, rtol=0, atol=grad_tol * np.abs(ref).max())


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, h, v", [(300, 64, 1000), (257, 200, 4099), (1000, 768, 3001)])
def test_gpu_generator_tiles_match_the_reference(dtype, m, h, v):
    _gpu_generator_check(m, h, v, dtype, temperature=0.9, disallow_correct=dtype == torch.float16)


@on_gpu
def test_gpu_tf32_follows_the_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(AssertionError):  # TF32 logits are ~1e-3 off: the fp32 tolerance must not hold
            _gpu_generator_check(500, 512, 2000, torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)


@on_gpu
def test_gpu_extra_memory_is_far_below_the_logits():
    """M = 8192, H = 768, V = 30522, bf16: the forward allocates O(M) statistics, below 10% of the
    (M, V) bf16 logits the eager version stores (the issue's bound; the noise is an input); the
    backward adds the gradients and the fp32 accumulators (15% of those logits here)."""
    m, h, v = 8192, 768, 30522
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (m,), device="cuda")
    sw = torch.ones(m, device="cuda")
    u = torch.rand(m, v, device="cuda")
    logits_bytes = m * v * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = acc_generator(x, w, t, sw, u)
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    assert forward_extra < 0.10 * logits_bytes, f"forward extra peak {forward_extra / 2**20:.1f} MiB"
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (m * h + v * h) * 2
    sms = torch.cuda.get_device_properties("cuda").multi_processor_count
    accumulators = (m + min(v, 2 * sms * 64)) * h * 4
    assert extra < grads + accumulators + 0.02 * logits_bytes, f"extra peak {extra / 2**20:.1f} MiB"


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """A (V, H) weight view whose rows are 2**20 + 64 elements apart (offsets ~4.3e9 elements) and a
    noise view of the same kind give what their contiguous copies give."""
    m, h, v, stride = 64, 64, 4096, 2**20 + 64
    try:
        buf = torch.zeros(v, stride, device="cuda", dtype=torch.bfloat16)
        noise_buf = torch.zeros(m, 2**26 + 64, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for the 8 GiB + 16 GiB buffers")
    buf[:, :h] = (torch.randn(v, h, device="cuda") * 0.1).to(torch.bfloat16)
    noise_buf[:, :v] = torch.rand(m, v, device="cuda")
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (m,), device="cuda")
    sw = torch.ones(m, device="cuda")
    results = []
    for w, u in ((buf[:, :h], noise_buf[:, :v]), (buf[:, :h].contiguous(), noise_buf[:, :v].contiguous())):
        w = w.detach().requires_grad_(True)
        loss, samples = acc_generator(x, w, t, sw, u)
        (gw,) = torch.autograd.grad(loss, w)
        results.append((loss, samples, gw))
    del buf, noise_buf
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@on_gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: acc_generator(*a, temperature=0.7), fullgraph=True)
    m, h, v = 300, 128, 1000
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") * 0.1).to(torch.bfloat16)
    t = torch.randint(0, v, (m,), device="cuda")
    sw, u = torch.ones(m, device="cuda"), torch.rand(m, v, device="cuda")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, s = fn(x1, w, t, sw, u)
    out.backward()
    want, want_s = acc_generator(x2, w, t, sw, u, temperature=0.7)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(x1.grad, x2.grad)


@on_gpu
def test_gpu_rtd_offsets_beyond_2_to_the_31():
    """rtd_loss on a (256, 512) view whose rows are 2**23 + 2**16 elements apart: offsets reach ~2.16e9
    elements, and the view must give what its contiguous copy gives."""
    b, length, row = 256, 512, 2**23 + 2**16
    try:
        buf = torch.zeros(b, row, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4.3 GB buffer")
    buf[:, :length] = torch.randn(b, length, device="cuda").to(torch.bfloat16)
    view = buf[:, :length]
    assert (b - 1) * view.stride(0) > 2**31
    labels = torch.randint(0, 2, (b, length), device="cuda")
    mask = torch.rand(b, length, device="cuda") < 0.9
    results = []
    for z in (view, view.contiguous()):
        z = z.detach().requires_grad_(True)
        loss = acc_rtd(z, labels, mask)
        (g,) = torch.autograd.grad(loss, z)
        results.append((loss, g))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
