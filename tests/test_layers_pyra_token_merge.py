"""pyra_token_merge (P20): the reference against a loop form, ToMe's merge and the tie rules; the accelerated
path's behaviour beyond conformance (module, compile, no writes, no gradient kernels without grad, errors)."""

import importlib

import numpy as np
import pytest
import torch

from twinops.conformance.baselines.layers.pyra_token_merge import pyra_token_merge as baseline
from twinops.reference.layers.pyra_token_merge import bipartite_match
from twinops.reference.layers.pyra_token_merge import pyra_token_merge as ref
from twinops.reference.layers.pyra_token_merge import pyra_token_merge_grad as ref_grad

# The package exports a function of the same name: reach the module through importlib.
acc_mod = importlib.import_module("twinops.accelerated.layers.pyra_token_merge")
acc = acc_mod.pyra_token_merge
PyraTokenMerge = acc_mod.PyraTokenMerge


def _data(n=2, t=9, c=5, ck=4, r=3, seed=0, trained=True):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(n, t, c)), size=rng.integers(1, 4, (n, t)).astype(float), metric=rng.normal(size=(n, t, ck)),
        a=rng.uniform(-1, 1, r), b=rng.normal(size=c) * 0.5 if trained else np.zeros(c),
        ln_weight=1 + 0.3 * rng.normal(size=c), ln_bias=0.2 * rng.normal(size=c),
    )


def _loop_form(x, size, metric, a, b, ln_weight, ln_bias, r, class_token=False, eps=1e-5):
    """The definition written token by token, one image at a time (no distillation token)."""
    n, t, c = x.shape
    outs, sizes = [], []
    for i in range(n):
        A, B = list(range(0, t, 2)), list(range(1, t, 2))
        best = {}
        for ai in A:
            if class_token and ai == 0:
                best[ai] = (-np.inf, B[0])
                continue
            cand = [(metric[i, ai] @ metric[i, bj] / np.linalg.norm(metric[i, ai]) / np.linalg.norm(metric[i, bj]), bj)
                    for bj in B]
            top = max(s for s, _ in cand)
            best[ai] = (top, min(bj for s, bj in cand if s == top))
        ranked = sorted(A, key=lambda ai: (-best[ai][0], ai))
        src, unm = ranked[:r], ranked[r:]
        if class_token:
            unm = sorted(unm)
        xs = x[i] * size[i][:, None]
        Y = []
        for ai in src:
            p = xs[ai] + xs[best[ai][1]]
            Y.append((p - p.mean()) / np.sqrt(p.var() + eps) * ln_weight + ln_bias)
        Y = np.array(Y)
        w1 = 2 / (1 + np.exp(-(a @ Y)))
        num, den = {j: xs[j].copy() for j in range(t)}, {j: size[i, j] for j in range(t)}
        for k, ai in enumerate(src):
            w2 = 2 / (1 + np.exp(-(Y[k] @ b))) - 1
            num[best[ai][1]] += xs[ai] * (1 + w1 * w2)
            den[best[ai][1]] += size[i, ai]
        order = unm + B
        outs.append([num[j] / den[j] for j in order])
        sizes.append([den[j] for j in order])
    return np.array(outs), np.array(sizes)


@pytest.mark.parametrize("class_token", [False, True])
def test_reference_matches_the_loop_form(class_token):
    d = _data(t=11, r=4)
    got, got_size = ref(**d, r=4, class_token=class_token)
    want, want_size = _loop_form(**d, r=4, class_token=class_token)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(got_size, want_size)


def test_reference_without_modulation_is_tomes_size_weighted_merge():
    """b = 0 (PYRA's initialisation): w2 = 0, so the layer is ToMe's merge_wavg, written here by hand."""
    x = np.array([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0], [9.0, 8.0]]])
    size = np.array([[1.0, 2.0, 1.0, 1.0, 3.0]])
    # Keys: A = tokens 0, 2, 4 and B = tokens 1, 3. Token 4 matches 3 exactly, token 2 is closest to 1.
    metric = np.array([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    src, dst, unm = bipartite_match(metric, 2)
    # Tokens 0 and 4 both score 1 against token 3: the tie ranks token 0 first (lower index).
    assert src.tolist() == [[0, 4]] and dst.tolist() == [[3, 3]] and unm.tolist() == [[2]]
    out, new_size = ref(x, size, metric, np.array([0.3, -0.7]), np.zeros(2), np.ones(2), np.zeros(2), r=2)
    merged = (x[0, 3] * 1 + x[0, 0] * 1 + x[0, 4] * 3) / 5
    np.testing.assert_allclose(out[0], [x[0, 2], x[0, 1], merged], rtol=1e-15)
    np.testing.assert_array_equal(new_size, [[1.0, 2.0, 5.0]])


def test_reference_ties_go_to_the_lowest_index():
    metric = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    # A token 0 scores 1 against B tokens 1 and 3 (B indices 0 and 1): the lower, token 1, wins.
    src, dst, _ = bipartite_match(metric, 2)
    assert src[0, 0] == 0 and dst[0, 0] == 1
    # A tokens 2 and 4 are identical: the same best score, ranked by index.
    assert src[0, 1] == 2


def test_reference_class_and_distillation_tokens_are_protected_and_ordered():
    d = _data(n=1, t=12, r=3, seed=3)
    src, dst, unm = bipartite_match(d["metric"], 3, class_token=True, distill_token=True)
    assert 0 not in src and 1 not in dst
    assert unm[0, 0] == 0 and list(unm[0]) == sorted(unm[0])
    out, size = ref(**d, r=3, class_token=True, distill_token=True)
    # [class token, distillation token (B[0], never a destination), other unmerged, other B]
    np.testing.assert_allclose(out[0, :2], d["x"][0, :2], rtol=1e-15)
    np.testing.assert_array_equal(size[0, :2], d["size"][0, :2])
    assert unm.shape == (1, 3)
    np.testing.assert_array_equal(size[0, 2:4], d["size"][0, unm[0, 1:]])


def test_reference_r_zero_is_the_identity_and_r_is_checked():
    d = _data()
    out, size = ref(**dict(d, a=np.zeros(0)), r=0)
    np.testing.assert_array_equal(out, d["x"])
    np.testing.assert_array_equal(size, d["size"])
    with pytest.raises(ValueError, match="r must lie in"):
        ref(**dict(d, a=np.zeros(5)), r=5)  # T = 9: at most 4 pairs
    with pytest.raises(ValueError, match="r must lie in"):
        ref(**dict(d, a=np.zeros(4)), r=4, class_token=True, distill_token=True)  # (9 - 2) // 2 = 3
    with pytest.raises(ValueError, match="a must have shape"):
        ref(**d, r=2)


def test_reference_gradient_matches_autograd_of_the_eager_code():
    d = _data(t=12, r=5, seed=4)
    kw = dict(r=5, class_token=True)
    t = {k: torch.tensor(v, requires_grad=k in ("x", "a", "b", "ln_weight", "ln_bias")) for k, v in d.items()}
    out, _ = baseline(**t, **kw)
    g = np.random.default_rng(5).normal(size=out.shape)
    names = ("x", "a", "b", "ln_weight", "ln_bias")
    want = torch.autograd.grad(out, [t[k] for k in names], torch.tensor(g))
    got = ref_grad(g, **d, **kw)
    np.testing.assert_allclose(ref(**d, **kw)[0], out.detach().numpy(), rtol=1e-12, atol=1e-13)
    for k, w in zip(names, want):
        np.testing.assert_allclose(got[k], w.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(dtype=torch.float32, **kw):
    return {k: torch.tensor(v, dtype=dtype) for k, v in _data(**kw).items()}


def test_accelerated_matches_the_reference_with_duplicate_destinations():
    """Every A token matches B token 1: one destination receives every source (the one-hot scatter)."""
    d = _data(n=2, t=9, c=20, r=4, seed=6)
    d["metric"][:, 0::2] = d["metric"][:, 1:2] + 0.01 * np.arange(5)[None, :, None]
    tens = {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}
    for k in ("x", "a", "b", "ln_weight", "ln_bias"):
        tens[k].requires_grad_(True)
    out, size = acc(**tens, r=4)
    want, want_size = ref(**d, r=4)
    assert (want_size[:, 1] >= 5).all()  # output 1 is B[0] = token 1, which received all four sources
    torch.testing.assert_close(out.double(), torch.tensor(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(size.double(), torch.tensor(want_size))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [tens[k] for k in ("x", "a", "b", "ln_weight", "ln_bias")], g)
    want_g = ref_grad(g.double().numpy(), **d, r=4)
    for k, v in zip(("x", "a", "b", "ln_weight", "ln_bias"), got):
        torch.testing.assert_close(v.double(), torch.tensor(want_g[k]), rtol=1e-5, atol=1e-5, msg=k)


def test_module_matches_function_and_starts_as_tome():
    torch.manual_seed(0)
    mod = PyraTokenMerge(5, 3, class_token=True)
    assert mod.a.shape == (3,) and (mod.a.abs() <= 1).all() and not mod.b.any()
    d = _tensors()
    out, size = mod(d["x"], d["metric"], d["size"])
    want = acc(d["x"], d["size"], d["metric"], mod.a, mod.b, mod.ln_weight, mod.ln_bias, r=3, class_token=True)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(size, want[1])
    tome = ref(*(d[k].double().numpy() for k in ("x", "size", "metric")), np.full(3, 0.5), np.zeros(5), np.ones(5),
               np.zeros(5), r=3, class_token=True)  # b = 0: the modulation weights a do not matter
    torch.testing.assert_close(out.double(), torch.tensor(tome[0]), rtol=1e-5, atol=1e-6)
    mod.eval()  # no train/eval difference
    torch.testing.assert_close(mod(d["x"], d["metric"], d["size"])[0], out)
    ones, ones_size = mod(d["x"], d["metric"])
    assert torch.equal(ones_size.sum(1), torch.full((2,), 9.0))
    out.sum().backward()
    assert mod.a.grad is not None and mod.b.grad is not None and mod.ln_weight.grad is not None


def test_inputs_and_incoming_gradient_are_not_written():
    d = _tensors(r=3)
    for k in ("x", "a", "b"):
        d[k].requires_grad_(True)
    before = {k: v.detach().clone() for k, v in d.items()}
    out, _ = acc(**d, r=3)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(g, g0)
    for k, v in d.items():
        assert torch.equal(v.detach(), before[k]), k


def test_strided_views_equal_contiguous():
    d = _tensors(c=17, r=3)
    x = d["x"].transpose(1, 2).contiguous().transpose(1, 2)
    metric = d["metric"].transpose(0, 2).contiguous().transpose(0, 2)
    assert not x.is_contiguous() and not metric.is_contiguous()
    got = acc(**dict(d, x=x, metric=metric), r=3)
    want = acc(**d, r=3)
    torch.testing.assert_close(got[0], want[0])


def test_no_backward_kernels_without_grad(monkeypatch):
    calls = []
    for name in ("_bwd_partials_kernel", "_bwd_kernel"):
        kernel = getattr(acc_mod, name)

        class Counting:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid):
                calls.append(grid)
                return self.k[grid]

        monkeypatch.setattr(acc_mod, name, Counting(kernel))
    d = _tensors()
    d["x"].requires_grad_(True)
    with torch.no_grad():
        assert acc(**d, r=3)[0].grad_fn is None
    assert acc(**dict(d, x=d["x"].detach()), r=3)[0].grad_fn is None and not calls
    out, size = acc(**d, r=3)
    assert not size.requires_grad
    out.sum().backward()
    assert len(calls) == 2


def test_r_zero_is_the_identity_with_zero_parameter_gradients():
    d = _tensors(r=0)
    for k in ("x", "a", "b", "ln_weight", "ln_bias"):
        d[k].requires_grad_(True)
    out, size = acc(**d, r=0)
    assert torch.equal(out, d["x"]) and torch.equal(size, d["size"])
    out.sum().backward()
    assert torch.equal(d["x"].grad, torch.ones_like(d["x"])) and not d["b"].grad.any()


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda **kw: acc(**kw, r=3, class_token=True), fullgraph=True, backend="aot_eager")
    d = _tensors()
    d2 = {k: v.clone() for k, v in d.items()}
    for t in (d, d2):
        for k in ("x", "a", "b"):
            t[k].requires_grad_(True)
    out, size = fn(**d)
    out.sum().backward()
    want, want_size = acc(**d2, r=3, class_token=True)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(size, want_size)
    for k in ("x", "a", "b"):
        torch.testing.assert_close(d[k].grad, d2[k].grad)


def test_bad_values_come_out_nan():
    d = _tensors()
    d["size"][1, 4] = 0.0
    d["metric"][0, 3, 1] = float("nan")
    out, size = acc(**d, r=3)
    assert out[0].isnan().all()  # image 0: its keys are not finite
    assert out[1].isnan().any() and not out[1].isnan().all()


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.zeros(2, 9, 5, dtype=torch.float64)), TypeError, "float32"),
    (dict(x=torch.zeros(2, 9)), ValueError, "x"),
    (dict(size=torch.ones(2, 8)), ValueError, "size"),
    (dict(metric=torch.ones(2, 8, 4)), ValueError, "metric"),
    (dict(a=torch.zeros(4)), ValueError, "a must have shape"),
    (dict(b=torch.zeros(6)), ValueError, "b must have shape"),
    (dict(ln_weight=torch.zeros(4)), ValueError, "ln_weight"),
    (dict(ln_bias=[0.0] * 5), TypeError, "ln_bias"),
])
def test_bad_tensors_name_the_argument(change, err, match):
    args = _tensors() | change
    with pytest.raises(err, match=match):
        acc(**args, r=3)


def test_bad_hyper_parameters_name_the_argument():
    d = _tensors()
    with pytest.raises(ValueError, match="r must lie in"):
        acc(**dict(d, a=torch.zeros(5)), r=5)
    with pytest.raises(TypeError, match="r must be an int"):
        acc(**d, r=3.0)
    with pytest.raises(ValueError, match="eps"):
        acc(**d, r=3, eps=-1.0)
    with pytest.raises(TypeError, match="class_token"):
        acc(**d, r=3, class_token=1)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(**_tensors(), r=3)


# ---------------------------------------------------------------------------------------------- GPU lane


def _vit_inputs(n, dtype, seed=0):
    from twinops.conformance.specs.layers.pyra_token_merge import _draw_metric

    rng = np.random.default_rng(seed)
    metric = _draw_metric(rng, n, 197, 64, "none", True, False, str(dtype).replace("torch.", ""))  # tie-free
    assert metric is not None
    d = _data(n=n, t=197, c=768, ck=64, r=16, seed=seed)
    d["metric"] = metric
    return d, {k: torch.tensor(v, dtype=dtype, device="cuda") for k, v in d.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_vit_block_against_the_reference(dtype, tol):
    d, t = _vit_inputs(4, dtype)
    if dtype != torch.float32:
        d = {k: t[k].double().cpu().numpy() for k in d}  # the reference sees the rounded values
    for k in ("x", "a", "b", "ln_weight", "ln_bias"):
        t[k].requires_grad_(True)
    out, size = acc(**t, r=16, class_token=True)
    want, want_size = ref(**d, r=16, class_token=True)
    torch.testing.assert_close(out.double().cpu(), torch.tensor(want), rtol=tol, atol=tol)
    torch.testing.assert_close(size.double().cpu(), torch.tensor(want_size))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [t[k] for k in ("x", "a", "b", "ln_weight", "ln_bias")], g)
    want_g = ref_grad(g.double().cpu().numpy(), **d, r=16, class_token=True)
    for k, v in zip(("x", "a", "b", "ln_weight", "ln_bias"), got):
        scale = max(1.0, float(np.abs(want_g[k]).max()))
        torch.testing.assert_close(v.double().cpu(), torch.tensor(want_g[k]), rtol=tol, atol=tol * scale, msg=k)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    """Images strided through a buffer of more than 2**31 elements: image offsets need 64-bit arithmetic."""
    n, t, c = 3, 17, 1024
    k = 2**31 // (n * t * c) + 1
    buf = torch.zeros((k * n, t, c), device="cuda", dtype=torch.bfloat16)
    x = buf[::k]
    x.copy_(torch.randn(n, t, c, device="cuda", dtype=torch.bfloat16))
    assert x.stride(0) * (n - 1) > 2**31
    rest = {key: v.cuda() for key, v in _tensors(n=n, t=t, c=c, r=4).items() if key != "x"}
    got = acc(x, **rest, r=4)
    want = acc(x.contiguous(), **rest, r=4)
    torch.testing.assert_close(got[0].float(), want[0].float())
