"""nested_dropout (P62): the reference against a loop and the authors' cut-off law, and the
accelerated path's behaviour beyond conformance."""

import importlib

import numpy as np
import pytest
import torch

# the package exports a function of the same name as the module
acc_mod = importlib.import_module("twinops.accelerated.layers.nested_dropout")
from twinops.accelerated.layers.nested_dropout import NestedDropout, draw_cutoff
from twinops.accelerated.layers.nested_dropout import nested_dropout as acc
from twinops.reference.layers.nested_dropout import nested_dropout as ref
from twinops.reference.layers.nested_dropout import nested_dropout_cutoff_probs
from twinops.reference.layers.nested_dropout import nested_dropout_grad as ref_grad


def test_reference_matches_a_loop():
    rng = np.random.default_rng(0)
    x, k = rng.normal(size=(5, 7)), np.array([0, 7, 3, 1, 6])
    want = np.zeros_like(x)
    for i in range(5):
        for j in range(k[i]):
            want[i, j] = x[i, j]
    np.testing.assert_array_equal(ref(x, k), want)
    g = rng.normal(size=(5, 7))
    np.testing.assert_array_equal(ref_grad(g, x, k), np.where(want != 0, g, 0.0))
    np.testing.assert_array_equal(ref(x, k, training=False), x)
    np.testing.assert_array_equal(ref_grad(g, x, k, training=False), g)


def test_reference_never_reads_past_the_cutoff():
    x, k = np.ones((2, 4)), np.array([1, 3])
    poisoned = np.where(np.arange(4)[None, :] >= k[:, None], np.nan, x)
    np.testing.assert_array_equal(ref(poisoned, k), ref(x, k))


def test_reference_rejects_cutoffs_out_of_range():
    with pytest.raises(ValueError, match=r"k\[1\] = 5"):
        ref(np.ones((2, 4)), np.array([1, 5]))
    with pytest.raises(ValueError, match="k"):
        ref(np.ones((2, 4)), np.array([-1, 2]))


def test_cutoff_law_is_the_authors_half_gaussian():
    p = nested_dropout_cutoff_probs(50, sigma=10.0)
    ks = np.arange(1, 51)
    want = np.exp(-((ks / 10.0) ** 2))
    np.testing.assert_allclose(p, want / want.sum(), rtol=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        nested_dropout_cutoff_probs(5, sigma=0.0)


def test_drawn_cutoffs_follow_the_law():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_cutoff(30, 5.0, generator=g) for _ in range(4000)]).numpy()
    p = nested_dropout_cutoff_probs(30, sigma=5.0)
    assert draws.min() >= 1 and draws.max() <= 30
    counts = np.bincount(draws, minlength=31)[1:]
    expected = 4000 * p
    big = expected > 20
    chi2 = (((counts - expected) ** 2) / expected)[big].sum()
    assert chi2 < 40, chi2  # ~ chi-square with about 10 degrees of freedom


# ---------------------------------------------------------------------------------------------- accelerated


def _tensors(n=19, d=18, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32), torch.tensor(rng.integers(0, d + 1, size=n))


def test_module_explicit_k_drawn_k_and_eval():
    x, k = _tensors()
    layer = NestedDropout(sigma=10.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x, k), acc(x, k))
    y = layer(x)
    kept = (y != 0).sum(1)
    assert (kept == kept[0]).all() and 1 <= int(kept[0]) <= 18  # one cut-off shared by the batch
    layer.eval()
    torch.testing.assert_close(layer(x), x)
    layer.eval_k = 4
    assert torch.equal(layer(x)[:, 4:], torch.zeros(19, 14)) and torch.equal(layer(x)[:, :4], x[:, :4])


def test_bad_cutoff_gives_nan_row():
    x, _ = _tensors(n=3, d=4)
    y = acc(x, torch.tensor([1, 5, -2]))
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and not torch.isnan(y[0]).any()


def test_inputs_and_incoming_gradient_are_not_written():
    x, k = _tensors()
    x.requires_grad_(True)
    x0, k0 = x.detach().clone(), k.clone()
    out = acc(x, k)
    g = torch.rand_like(out)
    g0 = g.clone()
    out.backward(g)
    assert torch.equal(x.detach(), x0) and torch.equal(k, k0) and torch.equal(g, g0)
    torch.testing.assert_close(x.grad, acc(g, k))


def test_no_backward_kernel_without_grad(monkeypatch):
    calls = []
    real = acc_mod._nested_dropout_backward

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(acc_mod, "_nested_dropout_backward", counting)
    x, k = _tensors(n=3, d=4)
    x.requires_grad_(True)
    with torch.no_grad():
        assert acc(x, k).grad_fn is None
    assert acc(x.detach(), k).grad_fn is None and not calls
    acc(x, k).sum().backward()
    assert len(calls) == 1


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, k: acc(x, k), fullgraph=True, backend="aot_eager")
    x, k = _tensors(n=5, d=6)
    x.requires_grad_(True)
    out = fn(x, k)
    out.sum().backward()
    torch.testing.assert_close(out, acc(x.detach(), k))
    torch.testing.assert_close(x.grad, acc(torch.ones(5, 6), k))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(3, 4, dtype=torch.float64)), "float32"),
    (dict(x=torch.zeros(4)), "x"),
    (dict(k=torch.ones(2, dtype=torch.long)), "k"),
    (dict(k=torch.ones(3)), "k"),
    (dict(training=1), "training"),
])
def test_bad_arguments_name_the_argument(change, match):
    args = dict(x=torch.zeros(3, 4), k=torch.ones(3, dtype=torch.long)) | change
    training = args.pop("training", True)
    with pytest.raises((TypeError, ValueError), match=match):
        acc(**args, training=training)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, k = _tensors(n=2, d=3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc(x, k)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    n, d = 4, 256
    step = 2**31 // (n * d) + 1
    buf = torch.zeros((step * n, d), device="cuda", dtype=torch.bfloat16)
    x = buf[::step]
    x.copy_(torch.randn(n, d, device="cuda", dtype=torch.bfloat16))
    k = torch.tensor([0, 17, 256, 100], device="cuda")
    assert x.stride(0) * (n - 1) > 2**31
    assert torch.equal(acc(x, k), acc(x.contiguous(), k))
