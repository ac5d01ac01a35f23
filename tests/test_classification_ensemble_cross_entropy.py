"""ensemble_cross_entropy (P24): the reference against independent anchors (PyTorch's cross-entropy at
K = 1, a loop form over members and classes, identical members), and the kernels' behaviour (module,
views, inputs untouched, torch.compile, no gradient kernels when none is wanted, errors, GPU lane)."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinops.accelerated.classification.ensemble_cross_entropy import EnsembleCrossEntropy
from twinops.accelerated.classification.ensemble_cross_entropy import ensemble_cross_entropy as acc_ece
from twinops.conformance.baselines.classification.ensemble_cross_entropy import ensemble_cross_entropy as eager_ece
from twinops.reference.classification.ensemble_cross_entropy import (
    ensemble_cross_entropy,
    ensemble_cross_entropy_grad,
)

acc_module = importlib.import_module("twinops.accelerated.classification.ensemble_cross_entropy")

MODES = ["logit_mean", "prob_mean"]
REDUCTIONS = ["none", "mean", "sum"]


def _members(k=3, n=6, v=7, scale=2.0, seed=0):
    return np.random.default_rng(seed).normal(scale=scale, size=(k, n, v))


def _upstream(reduction, n, seed=0):
    rng = np.random.default_rng(seed + 100)
    return rng.uniform(0.3, 2.0, size=n) if reduction == "none" else np.float64(rng.uniform(0.3, 2.0))


# --- reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_one_member_is_torch_cross_entropy(mode, reduction):
    """Independent anchor: K = 1 is F.cross_entropy(Z / t) in float64, loss and gradient, ignored rows included."""
    z = _members(k=1)
    y = np.array([0, 6, -100, 3, 2, -100])
    t = 0.7
    x = torch.tensor(z[0], requires_grad=True)
    want = F.cross_entropy(x / t, torch.tensor(y), ignore_index=-100, reduction=reduction)
    g = _upstream(reduction, 6)
    (want_g,) = torch.autograd.grad(want, x, torch.tensor(g))
    got = ensemble_cross_entropy(z, y, mode=mode, temperature=t, reduction=reduction)
    got_g = ensemble_cross_entropy_grad(g, z, y, mode=mode, temperature=t, reduction=reduction)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_g[0], want_g.numpy(), rtol=1e-12, atol=1e-14)


def _loop_logit_mean(z, y, t):
    k, n, v = z.shape
    out = []
    for i in range(n):
        zi = [sum(z[m][i][c] for m in range(k)) / (k * t) for c in range(v)]
        out.append(math.log(sum(math.exp(a) for a in zi)) - zi[y[i]])
    return np.array(out)


def _loop_prob_mean(z, y, t):
    k, n, v = z.shape
    out = []
    for i in range(n):
        p = 0.0
        for m in range(k):
            p += math.exp(z[m][i][y[i]] / t) / sum(math.exp(z[m][i][c] / t) for c in range(v)) / k
        out.append(-math.log(p))
    return np.array(out)


@pytest.mark.parametrize("mode, loop", [("logit_mean", _loop_logit_mean), ("prob_mean", _loop_prob_mean)])
def test_reference_matches_a_loop_over_members_and_classes(mode, loop):
    z = _members(k=4, n=5, v=6, scale=1.5, seed=3)
    y = np.array([0, 5, 2, 2, 4])
    got = ensemble_cross_entropy(z, y, mode=mode, temperature=1.3, reduction="none")
    np.testing.assert_allclose(got, loop(z, y, 1.3), rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_reference_identical_members_are_one_member(mode):
    z = _members(k=1, seed=4)
    y = np.array([1, 0, 6, 3, 3, 5])
    one = ensemble_cross_entropy(z, y, mode=mode, temperature=2.0, reduction="none")
    many = ensemble_cross_entropy(np.repeat(z, 5, axis=0), y, mode=mode, temperature=2.0, reduction="none")
    np.testing.assert_allclose(many, one, rtol=1e-12)
    g = _upstream("none", 6)
    g_one = ensemble_cross_entropy_grad(g, z, y, mode=mode, temperature=2.0, reduction="none")
    g_many = ensemble_cross_entropy_grad(g, np.repeat(z, 5, axis=0), y, mode=mode, temperature=2.0, reduction="none")
    np.testing.assert_allclose(g_many, np.repeat(g_one / 5, 5, axis=0), rtol=1e-12, atol=1e-15)


def test_reference_mixture_gradient_weights_members_by_responsibility():
    """prob_mean: member k's gradient is r_k / t (softmax(Z_k / t) - e_y); a member that gives the target
    probability 0 gets none; the rows sum to 0 over classes."""
    z = _members(k=3, n=2, v=5, seed=5)
    z[1, 0, 2] = -np.inf  # member 1 rules out token 0's target
    y = np.array([2, 4])
    g = ensemble_cross_entropy_grad(np.ones(2), z, y, mode="prob_mean", reduction="none")
    assert np.all(g[1, 0] == 0.0)
    np.testing.assert_allclose(g.sum(axis=2), 0.0, atol=1e-15)
    p = np.exp(z[:, 1] - z[:, 1].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    r = p[:, 4] / p[:, 4].sum()
    np.testing.assert_allclose(g[:, 1], r[:, None] * (p - np.eye(5)[4]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_reference_target_impossible_for_every_member(mode):
    """Loss +inf; the gradient stays finite (uniform responsibilities in prob_mean), as PyTorch's
    cross-entropy gives for K = 1."""
    z = _members(k=1, n=2, v=4, seed=6)
    z[0, 0, 1] = -np.inf
    y = np.array([1, 0])
    x = torch.tensor(z[0], requires_grad=True)
    want = F.cross_entropy(x, torch.tensor(y), reduction="none")
    (want_g,) = torch.autograd.grad(want, x, torch.ones(2, dtype=torch.float64))
    np.testing.assert_array_equal(ensemble_cross_entropy(z, y, mode=mode, reduction="none"), want.detach().numpy())
    np.testing.assert_allclose(ensemble_cross_entropy_grad(np.ones(2), z, y, mode=mode, reduction="none")[0],
                               want_g.numpy(), rtol=1e-12)
    zz = np.concatenate([z, z + 1.0])
    g = ensemble_cross_entropy_grad(np.ones(2), zz, y, mode=mode, reduction="none")
    assert np.isinf(ensemble_cross_entropy(zz, y, mode=mode, reduction="none")[0]) and np.isfinite(g).all()


def test_reference_nan_and_ignored_rows():
    z = _members(k=2, n=3, v=4)
    z[1, 0, 2] = np.nan
    z[0, 2, :] = np.nan
    y = np.array([1, 0, -100])
    for mode in MODES:
        loss = ensemble_cross_entropy(z, y, mode=mode, reduction="none")
        g = ensemble_cross_entropy_grad(np.ones(3), z, y, mode=mode, reduction="none")
        assert np.isnan(loss[0]) and np.isfinite(loss[1]) and loss[2] == 0.0
        assert np.isnan(g[:, 0]).all() and np.isfinite(g[:, 1]).all() and np.all(g[:, 2] == 0.0)
        assert np.isnan(ensemble_cross_entropy(z[:, 2:], y[2:], mode=mode))  # mean over no token: 0/0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(logits=np.zeros((2, 3))), ValueError, "logits"),
    (dict(mode="mean"), ValueError, "mode"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(target=np.array([0, 1, 5])), ValueError, "target"),
])
def test_reference_errors_name_the_argument(kwargs, error, match):
    args = dict(logits=np.zeros((2, 3, 4)), target=np.array([0, 1, 2])) | kwargs
    with pytest.raises(error, match=match):
        ensemble_cross_entropy(args.pop("logits"), args.pop("target"), **args)


# --- accelerated (interpreter on CPU, compiled on a GPU) ----------------------------------------


def _torch_members(k=3, n=5, v=37, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, n, v, generator=g) * 3).to(device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_one_member_is_torch_cross_entropy(mode, reduction):
    x = _torch_members(k=1)
    y = torch.tensor([0, 36, -100, 5, 17])
    xg, xd = x.clone().requires_grad_(True), x[0].double().requires_grad_(True)
    got = acc_ece(xg, y, mode=mode, temperature=0.5, reduction=reduction)
    want = F.cross_entropy(xd / 0.5, y, reduction=reduction)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    g = torch.rand_like(got) + 0.5
    (gx,) = torch.autograd.grad(got, xg, g)
    (gd,) = torch.autograd.grad(want, xd, g.double())
    torch.testing.assert_close(gx[0].double(), gd, rtol=1e-5, atol=1e-7)


def test_kernel_member_major_and_class_major_views_agree():
    """Strided views are read in place: members interleaved (a permuted (N, V, K) buffer) and
    class-major rows give the contiguous result, loss and gradient."""
    x = _torch_members(k=3, n=4, v=33)
    y = torch.tensor([0, 5, 32, -100])
    views = [x.permute(1, 2, 0).contiguous().permute(2, 0, 1), x.transpose(1, 2).contiguous().transpose(1, 2)]
    for mode in MODES:
        xc = x.clone().requires_grad_(True)
        want = acc_ece(xc, y, mode=mode, reduction="none")
        (want_g,) = torch.autograd.grad(want, xc, torch.arange(1.0, 5.0))
        for view in views:
            assert not view.is_contiguous()
            v = view.detach().requires_grad_(True)
            got = acc_ece(v, y, mode=mode, reduction="none")
            (got_g,) = torch.autograd.grad(got, v, torch.arange(1.0, 5.0))
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(got_g, want_g)


def test_kernel_out_of_range_label_poisons_its_token_only():
    for mode in MODES:
        out = acc_ece(_torch_members(n=3, v=7), torch.tensor([0, 7, 3]), mode=mode, reduction="none")
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("mode", MODES)
def test_kernel_nan_and_inf_positions_follow_the_reference(mode):
    """A member row of -inf (NaN in prob_mean, a -inf average in logit_mean), every member -inf,
    and a partly -inf row: losses and gradients match the reference, NaN positions exactly."""
    z = _members(k=3, n=4, v=6, seed=7)
    z[1, 0, :] = -np.inf
    z[:, 1, :] = -np.inf
    z[0, 2, :3] = -np.inf
    y = np.array([0, 1, 4, 5])
    g = _upstream("none", 4)
    want = ensemble_cross_entropy(z, y, mode=mode, reduction="none")
    want_g = ensemble_cross_entropy_grad(g, z, y, mode=mode, reduction="none")
    x = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    got = acc_ece(x, torch.tensor(y), mode=mode, reduction="none")
    (got_g,) = torch.autograd.grad(got, x, torch.tensor(g, dtype=torch.float32))
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(got_g.double().numpy(), want_g, rtol=1e-5, atol=1e-7)


def test_kernel_module_and_inputs_untouched():
    x = _torch_members(k=2).requires_grad_(True)
    y = torch.tensor([1, -100, 4, 36, 0], dtype=torch.int32)
    x0, y0 = x.detach().clone(), y.clone()
    module = EnsembleCrossEntropy(mode="prob_mean", temperature=1.5, reduction="sum")
    out = module(x, y)
    torch.testing.assert_close(out, acc_ece(x, y, mode="prob_mean", temperature=1.5, reduction="sum"))
    g = torch.tensor(0.75)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(x.detach(), x0) and torch.equal(y, y0) and g.item() == 0.75
    assert gx.shape == x.shape and gx.dtype == x.dtype


@pytest.mark.parametrize("mode", ["prob_mean"])  # the modes share one custom op; the contract test traces logit_mean
def test_kernel_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    fn = torch.compile(lambda z, t: acc_ece(z, t, mode=mode, temperature=0.8), fullgraph=True, backend="aot_eager")
    x = _torch_members(k=2, n=4, v=20)
    y = torch.tensor([3, -100, 19, 0])
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = fn(a, y)
    out.backward()
    want = acc_ece(b, y, mode=mode, temperature=0.8)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, b.grad)


class _Counting:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_kernel_no_backward_launch_when_no_gradient_is_wanted(monkeypatch):
    counter = _Counting(acc_module._ensemble_backward_kernel)
    monkeypatch.setattr(acc_module, "_ensemble_backward_kernel", counter)
    x = _torch_members(k=2, n=3, v=9)
    y = torch.tensor([0, 1, 2])
    out = acc_ece(x, y)
    assert out.grad_fn is None
    with torch.no_grad():
        assert acc_ece(x.clone().requires_grad_(True), y).grad_fn is None
    assert counter.launches == 0
    xg = x.clone().requires_grad_(True)
    acc_ece(xg, y).backward()
    assert counter.launches == 1 and xg.grad is not None


def test_kernel_float16_returns_the_input_dtype():
    x = _torch_members(k=2, n=3, v=40).half().requires_grad_(True)
    y = torch.tensor([0, 39, 7])
    for mode in MODES:
        out = acc_ece(x, y, mode=mode)
        (gx,) = torch.autograd.grad(out, x)
        assert out.dtype == torch.float16 and gx.dtype == torch.float16
        want = eager_ece(x.detach().double(), y, mode=mode)
        torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(logits=torch.zeros(3, 4)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "float32"),
    (dict(logits=torch.zeros(0, 3, 4)), ValueError, "K >= 1"),
    (dict(logits=torch.zeros(2, 3, 0)), ValueError, "V >= 1"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target"),
    (dict(target=torch.zeros(3)), TypeError, "target"),
    (dict(mode="geometric"), ValueError, "mode"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_kernel_errors_name_the_argument(kwargs, error, match):
    args = dict(logits=torch.zeros(2, 3, 4), target=torch.zeros(3, dtype=torch.long)) | kwargs
    with pytest.raises(error, match=match):
        acc_ece(args.pop("logits"), args.pop("target"), **args)


# --- GPU lane -----------------------------------------------------------------------------------

on_gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)
# (loss rtol, gradient tolerance relative to the largest gradient entry) per dtype on the GPU.
GPU_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _gpu_check(x, y, dtype, mode, temperature=1.0):
    loss_rtol, grad_tol = GPU_TOLERANCE[dtype]
    n = x.shape[1]
    g = np.random.default_rng(1).uniform(0.5, 2.0, n)
    xt = x.detach().to(dtype).requires_grad_(True)
    out = acc_ece(xt, y, mode=mode, temperature=temperature, reduction="none")
    (gx,) = torch.autograd.grad(out, xt, torch.tensor(g, device=x.device, dtype=dtype))
    x64, y64 = xt.detach().double().cpu().numpy(), y.cpu().numpy()
    g64 = torch.tensor(g).to(dtype).double().numpy()
    kw = dict(mode=mode, temperature=temperature, reduction="none")
    want = ensemble_cross_entropy(x64, y64, **kw)
    want_g = ensemble_cross_entropy_grad(g64, x64, y64, **kw)
    assert out.dtype == dtype and gx.dtype == dtype
    np.testing.assert_allclose(out.double().cpu().numpy(), want, rtol=loss_rtol, atol=loss_rtol * np.abs(want).max())
    np.testing.assert_allclose(gx.double().cpu().numpy(), want_g, rtol=0, atol=grad_tol * np.abs(want_g).max())


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k, n, v", [(4, 64, 32000), (1, 33, 4097), (5, 17, 50257)])
def test_gpu_matches_the_reference(dtype, mode, k, n, v):
    """Compiled kernels at vocabulary-sized rows (several 4096-element tiles, a padded member tile at K = 5)."""
    x = torch.randn(k, n, v, device="cuda") * 4 + 0.3 * torch.randn(n, v, device="cuda")
    y = torch.randint(0, v, (n,), device="cuda")
    y[::7] = -100
    _gpu_check(x, y, dtype, mode, temperature=0.9)


@on_gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_offsets_beyond_2_to_the_31(mode):
    """K = 4 members of a (4, 5500, 131072) bf16 tensor: 2.9e9 elements; the member offset alone,
    3 * stride_k = 2.16e9, passes 2**31. The last tokens are checked against the eager baseline on a slice."""
    k, n, v = 4, 5500, 131072
    try:
        x = torch.randn(k, n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 5.8 GB tensor and its gradient")
    y = torch.randint(0, v, (n,), device="cuda")
    out = acc_ece(x, y, mode=mode, reduction="none")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    tail = slice(n - 8, n)
    xs = x.detach()[:, tail].float().requires_grad_(True)
    want = eager_ece(xs, y[tail], mode=mode, reduction="none")
    (want_g,) = torch.autograd.grad(want, xs, torch.ones_like(want))
    torch.testing.assert_close(out[tail].float(), want, rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(gx[:, tail].float(), want_g, rtol=1.6e-2, atol=1e-4)


@on_gpu
def test_gpu_extra_memory_is_linear_in_the_tokens():
    """K = 4, 2048 x 32000 bf16: forward + backward allocate the (K, N, V) gradient and O(N K)
    statistics, never an averaged (N, V) distribution."""
    k, n, v = 4, 2048, 32000
    x = torch.randn(k, n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, v, (n,), device="cuda")
    for mode in MODES:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        acc_ece(x, y, mode=mode).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < k * n * v * 2 + n * v * 2 // 10, f"{mode}: extra peak {extra / 2**20:.1f} MiB"
        x.grad = None


@on_gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    fn = torch.compile(lambda z, t: acc_ece(z, t, mode=mode, temperature=0.7), fullgraph=True)
    x = torch.randn(3, 300, 5000, device="cuda").to(torch.bfloat16)
    y = torch.randint(0, 5000, (300,), device="cuda")
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = fn(a, y)
    out.backward()
    want = acc_ece(b, y, mode=mode, temperature=0.7)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, b.grad)
