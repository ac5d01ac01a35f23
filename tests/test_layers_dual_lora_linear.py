"""dual_lora_linear (P2, PETALface): the reference against the authors' module written in torch
float64, its defined edge cases, and the accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# the package exports a function of the same name as the module
acc_mod = importlib.import_module("twinops.accelerated.layers.dual_lora_linear")
from twinops.accelerated.layers.dual_lora_linear import DualLoRALinear
from twinops.accelerated.layers.dual_lora_linear import dual_lora_linear as acc
from twinops.reference.layers.dual_lora_linear import dual_lora_linear as ref
from twinops.reference.layers.dual_lora_linear import dual_lora_linear_grad as ref_grad

NAMES = ("x", "weight", "lora_a1", "lora_b1", "lora_a2", "lora_b2", "alpha", "bias")


def _data(n=6, d_in=5, d_out=7, r1=2, r2=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, d_in)), "weight": rng.normal(size=(d_out, d_in)),
        "lora_a1": rng.normal(size=(r1, d_in)), "lora_b1": rng.normal(size=(d_out, r1)),
        "lora_a2": rng.normal(size=(r2, d_in)), "lora_b2": rng.normal(size=(d_out, r2)),
        "alpha": rng.uniform(-0.5, 1.5, size=n), "bias": rng.normal(size=d_out),
    }


def _authors_forward(t, m1, m2, scale):
    """``LoRALinearTwo.forward`` with the dropout layers replaced by the given masks."""
    out = F.linear(t["x"], t["weight"], t["bias"])
    lora_1 = scale * m1 * F.linear(F.linear(t["x"], t["lora_a1"]), t["lora_b1"])
    lora_2 = scale * m2 * F.linear(F.linear(t["x"], t["lora_a2"]), t["lora_b2"])
    a = t["alpha"][:, None]
    return out + (1 - a) * lora_1 + a * lora_2


def test_reference_matches_the_authors_module_and_autograd():
    d = _data()
    rng = np.random.default_rng(1)
    m1, m2 = (rng.random((6, 7)) < 0.9) / 0.9, (rng.random((6, 7)) < 0.9) / 0.9
    t = {k: torch.tensor(v, requires_grad=k not in ("weight", "bias")) for k, v in d.items()}
    want = _authors_forward(t, torch.tensor(m1), torch.tensor(m2), 0.7)
    got = ref(**d, dropout_mask1=m1, dropout_mask2=m2, scale=0.7)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.normal(size=(6, 7))
    names = ("x", "lora_a1", "lora_b1", "lora_a2", "lora_b2", "alpha")
    grads = torch.autograd.grad(want, [t[k] for k in names], torch.tensor(g))
    mine = ref_grad(g, **d, dropout_mask1=m1, dropout_mask2=m2, scale=0.7)
    assert set(mine) == set(names)
    for k, w in zip(names, grads):
        np.testing.assert_allclose(mine[k], w.numpy(), rtol=1e-11, atol=1e-12, err_msg=k)


def test_reference_alpha_0_or_1_silences_a_branch_exactly():
    d = _data()
    d["alpha"] = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    g = np.ones((6, 7))
    grads = ref_grad(g, **d)
    # branch 2 only sees rows with alpha = 1, branch 1 only rows with alpha = 0
    poisoned = dict(d, lora_b2=d["lora_b2"] * 1e6)
    np.testing.assert_array_equal(ref(**poisoned)[0::2], ref(**d)[0::2])
    only_first = dict(d, alpha=np.zeros(6))
    assert not ref_grad(g, **only_first)["lora_a2"].any() and not ref_grad(g, **only_first)["lora_b2"].any()
    assert grads["lora_a1"].any() and grads["lora_a2"].any()


def test_reference_zero_up_factors_is_the_frozen_layer():
    d = _data()
    d["lora_b1"], d["lora_b2"] = np.zeros((7, 2)), np.zeros((7, 3))
    np.testing.assert_allclose(ref(**d), d["x"] @ d["weight"].T + d["bias"], rtol=1e-14)


@pytest.mark.parametrize("change, match", [
    (dict(lora_a1=np.ones((6, 5)), lora_b1=np.ones((7, 6))), "rank r = 6"),
    (dict(lora_b1=np.ones((7, 3))), "lora_b1"),
    (dict(weight=np.ones((7, 4))), "weight"),
    (dict(alpha=np.ones(5)), "alpha"),
])
def test_reference_bad_shapes_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ref(**(_data() | change))


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(n=19, d_in=18, d_out=17, r1=2, r2=3, seed=0, grad=True):
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in _data(n, d_in, d_out, r1, r2, seed).items()}
    if grad:
        for k in ("x", "lora_a1", "lora_b1", "lora_a2", "lora_b2", "alpha"):
            t[k].requires_grad_(True)
    return t


def test_module_starts_as_the_frozen_linear_and_matches_the_function():
    torch.manual_seed(0)
    lin = torch.nn.Linear(18, 17)
    layer = DualLoRALinear.from_linear(lin, r=4)
    x = torch.randn(2, 9, 18)
    alpha = torch.tensor([0.2, 0.9])  # one value per image, repeated over its 9 tokens
    layer.eval()
    torch.testing.assert_close(layer(x, alpha), lin(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_a1", "lora_b1", "lora_a2", "lora_b2"]
    with torch.no_grad():
        layer.lora_b1.normal_()
        layer.lora_b2.normal_()
    want = acc(x.reshape(-1, 18), layer.weight, layer.lora_a1, layer.lora_b1, layer.lora_a2, layer.lora_b2,
               alpha.repeat_interleave(9), layer.bias)
    torch.testing.assert_close(layer(x, alpha), want.reshape(2, 9, 17))


def test_module_training_draws_dropout_masks_and_trains_the_factors_only():
    torch.manual_seed(0)
    layer = DualLoRALinear(8, 16, r=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_b1.normal_()
        layer.lora_b2.normal_()
    x, alpha = torch.randn(16, 8), torch.rand(16)
    y1, y2 = layer(x, alpha), layer(x, alpha)
    assert not torch.allclose(y1, y2)  # independent masks per call
    y1.sum().backward()
    assert layer.weight.grad is None and layer.lora_a1.grad is not None and layer.lora_b2.grad is not None
    layer.eval()
    torch.testing.assert_close(layer(x, alpha), layer(x, alpha))


def test_inputs_and_incoming_gradient_are_not_written():
    t = _tensors()
    m = torch.full((19, 17), 1 / 0.9)
    before = {k: v.detach().clone() for k, v in t.items()}
    out = acc(**t, dropout_mask1=m, dropout_mask2=m)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert all(torch.equal(t[k].detach(), before[k]) for k in t) and torch.equal(g, g0)
    assert torch.equal(m, torch.full((19, 17), 1 / 0.9))


def test_only_requested_gradients_are_computed(monkeypatch):
    calls = []
    for name in ("_rank_grad_kernel", "_dx_kernel", "_da_kernel", "_db_kernel"):
        kernel = getattr(acc_mod, name)

        class Counting:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                calls.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(acc_mod, name, Counting(name, kernel))
    t = _tensors(n=5, d_in=4, d_out=6, grad=False)
    with torch.no_grad():
        assert acc(**_tensors(n=5, d_in=4, d_out=6)).grad_fn is None
    assert acc(**t).grad_fn is None and not calls
    t["lora_b1"].requires_grad_(True)
    acc(**t).sum().backward()
    assert calls == ["_db_kernel"]
    calls.clear()
    t["lora_b1"].requires_grad_(False)
    t["x"].requires_grad_(True)
    acc(**t).sum().backward()
    assert calls == ["_rank_grad_kernel", "_dx_kernel"]


def test_frozen_weight_requiring_grad_is_rejected():
    t = _tensors(grad=False)
    t["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="weight is the frozen"):
        acc(**t)
    with torch.no_grad():
        acc(**t)  # fine without autograd


def test_strided_views_equal_contiguous():
    t = _tensors(grad=False)
    w_t = t["weight"].t().contiguous().t()
    x_s = torch.zeros(19, 36)[:, ::2]
    x_s.copy_(t["x"])
    torch.testing.assert_close(acc(**(t | dict(weight=w_t, x=x_s))), acc(**t))


def test_empty_batch():
    t = _tensors(grad=False)
    t["x"], t["alpha"] = t["x"][:0].requires_grad_(True), t["alpha"][:0]
    t["lora_a1"].requires_grad_(True)
    out = acc(**t)
    assert out.shape == (0, 17)
    out.sum().backward()
    assert torch.equal(t["lora_a1"].grad, torch.zeros(2, 18))


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda **kw: acc(**kw, scale=0.5), fullgraph=True, backend="aot_eager")
    t = _tensors(n=5, d_in=6, d_out=7)
    out = fn(**t)
    out.sum().backward()
    t2 = _tensors(n=5, d_in=6, d_out=7)
    want = acc(**t2, scale=0.5)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for k in ("x", "lora_a1", "lora_b2", "alpha"):
        torch.testing.assert_close(t[k].grad, t2[k].grad)


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(19, 18, dtype=torch.float64)), "float32"),
    (dict(weight=torch.zeros(17, 18, dtype=torch.float16)), "weight"),
    (dict(lora_a1=torch.zeros(18, 18), lora_b1=torch.zeros(17, 18)), "rank r = 18"),
    (dict(lora_b2=torch.zeros(17, 2)), "lora_b2"),
    (dict(alpha=torch.zeros(19, 1)), "alpha"),
    (dict(bias=torch.zeros(18)), "bias"),
    (dict(dropout_mask2=torch.zeros(19, 18)), "dropout_mask2"),
])
def test_bad_arguments_name_the_argument(change, match):
    with pytest.raises((TypeError, ValueError), match=match):
        acc(**(_tensors(grad=False) | change))


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(**_tensors(grad=False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_benchmark_shape_against_float64(dtype):
    """N = 8192, 768 -> 768, r = 16 with dropout: compiled kernels against float64 torch, and the
    fp32 path under TF32."""
    torch.manual_seed(0)
    n, d, r = 8192, 768, 16
    t = {"x": torch.randn(n, d), "weight": torch.randn(d, d) / d**0.5, "lora_a1": torch.randn(r, d) / r,
         "lora_b1": torch.randn(d, r), "lora_a2": torch.randn(r, d) / r, "lora_b2": torch.randn(d, r),
         "alpha": torch.rand(n), "bias": torch.randn(d)}
    m = ((torch.rand(n, d) < 0.9) / 0.9, (torch.rand(n, d) < 0.9) / 0.9)
    dev = {k: v.cuda().to(dtype).requires_grad_(k not in ("weight", "bias")) for k, v in t.items()}
    out = acc(**dev, dropout_mask1=m[0].cuda().to(dtype), dropout_mask2=m[1].cuda().to(dtype))
    g = torch.randn_like(out)
    out.backward(g)
    hi = {k: v.double().requires_grad_(k not in ("weight", "bias")) for k, v in t.items()}
    want = _authors_forward(hi, m[0].double(), m[1].double(), 1.0)
    want.backward(g.cpu().double())
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.cpu().double(), want.detach(), **tol)
    for k in ("x", "lora_a1", "lora_b1", "alpha"):
        scale = hi[k].grad.abs().max()
        torch.testing.assert_close(dev[k].grad.cpu().double() / scale, hi[k].grad / scale, **tol)


def test_ranks_above_the_kernel_limit_are_a_clear_error():
    t = _tensors(n=2, d_in=130, d_out=130, r1=2, r2=2, grad=False)
    t["lora_a2"], t["lora_b2"] = torch.zeros(129, 130), torch.zeros(130, 129)
    with pytest.raises(ValueError, match="lora_a2 has rank r = 129"):
        acc(**t)
