"""Loss-based reweighting (P15): the reference against independent forms (explicit loops, torch's
cross-entropy, hand-computed weights, invariances), and the kernels' behaviour beyond agreement
(modules, the two-step workflow, gradients of the weights, no work nobody asked for, errors)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import twinops.accelerated.classification.loss_reweighting as acc
from twinops.reference.classification.loss_reweighting import (
    loss_reweight_weights,
    weighted_sequence_ce,
    weighted_sequence_ce_grad,
)


def _batch(b=3, t=6, v=11, seed=0, ignore=-100):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, t, v)) * 2
    y = rng.integers(0, v, size=(b, t))
    y = np.where(rng.random((b, t)) < 0.25, ignore, y)
    y[1] = ignore  # a sequence without an active token
    return z, y


def _loop_sequence_losses(z, y, shift, ignore=-100):
    """Per-sequence mean token CE written with explicit loops and math.exp/log."""
    b, t, v = z.shape
    out = []
    for i in range(b):
        total, n = 0.0, 0
        for pos in range(t - 1 if shift else t):
            label = y[i, pos + 1] if shift else y[i, pos]
            if label == ignore:
                continue
            row = z[i, pos]
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            total += lse - row[label]
            n += 1
        out.append(total / n if n else 0.0)
    return np.array(out)


# ----------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("shift", [True, False])
def test_reference_equals_loop_form(shift):
    z, y = _batch()
    w = np.array([0.2, 0.5, 0.3])
    seq = _loop_sequence_losses(z, y, shift)
    np.testing.assert_allclose(weighted_sequence_ce(z, y, shift=shift, reduction="none"), seq, rtol=1e-12)
    got = weighted_sequence_ce(z, y, w, scale=4.0, shift=shift)
    np.testing.assert_allclose(got, 4.0 * (w * seq).sum(), rtol=1e-12)
    mean = weighted_sequence_ce(z, y, w, shift=shift, reduction="mean")
    np.testing.assert_allclose(mean, (w * seq).sum() / 2, rtol=1e-12)  # sequence 1 is empty


def test_reference_matches_torch_cross_entropy_per_sequence():
    """Independent anchor: each sequence's loss is F.cross_entropy (mean over non-ignored tokens)."""
    z, y = _batch(seed=1)
    seq = weighted_sequence_ce(z, y, shift=True, reduction="none")
    for i in range(z.shape[0]):
        labels = torch.tensor(y[i, 1:])
        if (labels == -100).all():
            assert seq[i] == 0.0
            continue
        want = F.cross_entropy(torch.tensor(z[i, :-1]), labels, ignore_index=-100)
        np.testing.assert_allclose(seq[i], want.item(), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reference_gradient_matches_torch_autograd(reduction):
    z, y = _batch(seed=2)
    w = np.array([0.7, 0.1, 0.4])
    rng = np.random.default_rng(3)
    g = rng.normal(size=3) if reduction == "none" else np.array(1.7)
    zt = torch.tensor(z, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    token = F.cross_entropy(zt[:, :-1].reshape(-1, z.shape[2]), torch.tensor(y[:, 1:]).reshape(-1),
                            reduction="none").view(3, -1)
    n = torch.tensor((y[:, 1:] != -100).sum(1), dtype=torch.float64)
    seq = torch.where(n > 0, token.sum(1) / n.clamp(min=1), torch.zeros(3, dtype=torch.float64))
    terms = 2.0 * wt * seq
    out = {"none": terms, "sum": terms.sum(), "mean": terms.sum() / (n > 0).sum()}[reduction]
    gz, gw = torch.autograd.grad(out, [zt, wt], torch.tensor(g))
    ref = weighted_sequence_ce_grad(g, z, y, w, scale=2.0, reduction=reduction)
    np.testing.assert_allclose(ref["logits"], gz.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ref["weights"], gw.numpy(), rtol=1e-10, atol=1e-14)
    assert np.all(ref["logits"][:, -1] == 0.0)  # the shifted-out position
    assert set(weighted_sequence_ce_grad(g, z, y, scale=2.0, reduction=reduction)) == {"logits"}


def test_reference_ignored_logits_never_reach_the_result():
    z, y = _batch(seed=4)
    poisoned = z.copy()
    poisoned[1] = np.nan  # sequence 1 has no active token
    poisoned[:, -1] = np.inf  # never scored under the shift
    np.testing.assert_array_equal(weighted_sequence_ce(poisoned, y, reduction="none"),
                                  weighted_sequence_ce(z, y, reduction="none"))


def test_reference_label_errors_skip_the_unread_first_label():
    z, _ = _batch()
    y = np.zeros((3, 6), dtype=np.int64)
    y[:, 0] = 99  # never read under the shift
    weighted_sequence_ce(z, y)
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 99"):
        weighted_sequence_ce(z, y, shift=False)


E = math.e


@pytest.mark.parametrize("strategy, readme, expected", [
    ("linupper", False, np.array([1, E, E]) / (1 + 2 * E)),       # f = [0, 1, 1]
    ("quadratic", False, np.array([1, E, 1]) / (2 + E)),          # f = [0, 1, 0]
    ("extremes", False, np.array([E, 1, E]) / (1 + 2 * E)),       # f = [1, 0, 1]
    ("uniform", False, np.full(3, 1 / 3)),
    ("uniform", True, np.array([1 / E, 1, E]) / (1 / E + 1 + E)),  # f = normalised loss [-1, 0, 1]
])
def test_weights_by_hand(strategy, readme, expected):
    """losses 1, 2, 3 normalise to -1, 0, 1 (delta = 1); r = 1."""
    got = loss_reweight_weights([1.0, 2.0, 3.0], strategy=strategy, readme_uniform=readme)
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_weights_delta_and_temperature_by_hand():
    # delta 2: normalised -2, 0, 2; linupper f = [0, 2, 2]; r = 0.5 -> exp(f / r) = [1, e^4, e^4]
    got = loss_reweight_weights([0.0, 5.0, 10.0], delta=2.0, temperature=0.5)
    e4 = math.exp(4.0)
    np.testing.assert_allclose(got, np.array([1, e4, e4]) / (1 + 2 * e4), rtol=1e-14)


def test_weights_mask_invariances_and_limits():
    rng = np.random.default_rng(5)
    losses = 3 + rng.normal(size=12)
    active = rng.random(12) < 0.7
    for strategy in ("linupper", "quadratic", "extremes"):
        w = loss_reweight_weights(losses, active, strategy=strategy, temperature=0.3)
        assert np.all(w[~active] == 0) and math.isclose(w.sum(), 1.0, rel_tol=1e-12)
        # only the active entries matter
        np.testing.assert_allclose(w[active], loss_reweight_weights(losses[active], strategy=strategy,
                                                                    temperature=0.3), rtol=1e-13)
        # invariant to shifting and positively scaling the losses, equivariant to permutations
        np.testing.assert_allclose(loss_reweight_weights(7 * losses - 2, active, strategy=strategy, temperature=0.3),
                                   w, rtol=1e-10)
        perm = rng.permutation(12)
        np.testing.assert_allclose(loss_reweight_weights(losses[perm], active[perm], strategy=strategy,
                                                         temperature=0.3), w[perm], rtol=1e-13)
    flat = loss_reweight_weights(losses, strategy="extremes", temperature=1e6)
    np.testing.assert_allclose(flat, np.full(12, 1 / 12), rtol=1e-5)
    sharp = loss_reweight_weights(losses, strategy="quadratic", temperature=1e-3)
    assert sharp.max() > 0.99  # r -> 0 approaches the argmax of f


def test_weights_degenerate_inputs():
    assert loss_reweight_weights(np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(loss_reweight_weights([1.0, np.nan], np.array([False, False])), [0.0, 0.0])
    np.testing.assert_allclose(loss_reweight_weights([2.0, 2.0, 2.0, 2.0], strategy="quadratic"), 0.25)
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        loss_reweight_weights([1.0, np.nan, 2.0])


# ----------------------------------------------------------------------------------- accelerated


def _tensors(b=3, t=6, v=11, seed=0):
    z, y = _batch(b, t, v, seed)
    return torch.tensor(z, dtype=torch.float32), torch.tensor(y)


def test_module_and_functional_agree():
    z, y = _tensors()
    w = torch.tensor([0.2, 0.5, 0.3])
    module = acc.WeightedSequenceCE(scale=2.0, reduction="mean")
    torch.testing.assert_close(module(z, y, w), acc.weighted_sequence_ce(z, y, w, scale=2.0, reduction="mean"))
    losses = acc.weighted_sequence_ce(z, y, reduction="none")
    rule = acc.LossReweightWeights(strategy="quadratic", temperature=0.5)
    torch.testing.assert_close(rule(losses), acc.loss_reweight_weights(losses, strategy="quadratic", temperature=0.5))


def test_two_step_workflow_equals_weighted_call():
    """l from reduction='none', weights from the rule, then sum(w * l): same value and gradient as
    passing the weights to weighted_sequence_ce, and the same as the reference."""
    z, y = _tensors(seed=6)
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    losses = acc.weighted_sequence_ce(a, y, reduction="none")
    active = (y[:, 1:] != -100).any(1)
    w = acc.loss_reweight_weights(losses, active, strategy="linupper", temperature=0.5)
    assert not w.requires_grad and w[1] == 0
    two_step = (w * losses).sum()
    fused = acc.weighted_sequence_ce(b, y, w)
    torch.testing.assert_close(two_step, fused)
    (ga,) = torch.autograd.grad(two_step, a)
    (gb,) = torch.autograd.grad(fused, b)
    torch.testing.assert_close(ga, gb)
    ref_l = weighted_sequence_ce(z.double().numpy(), y.numpy(), reduction="none")
    ref_w = loss_reweight_weights(ref_l, active.numpy(), temperature=0.5)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5, atol=1e-7)


def test_weights_receive_scale_times_sequence_loss():
    z, y = _tensors(seed=7)
    w = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    (gw,) = torch.autograd.grad(acc.weighted_sequence_ce(z, y, w, scale=3.0), w)
    torch.testing.assert_close(gw, 3.0 * acc.weighted_sequence_ce(z, y, reduction="none"))


def test_no_backward_kernel_when_logits_need_no_gradient(monkeypatch):
    z, y = _tensors()
    w = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("backward kernel launched")

    monkeypatch.setattr(acc, "_token_ce_backward_kernel", Forbidden())
    acc.weighted_sequence_ce(z, y, w).backward()  # only the weights need a gradient
    assert w.grad is not None
    with torch.no_grad():
        out = acc.weighted_sequence_ce(z.requires_grad_(True), y, w)
    assert out.grad_fn is None


def test_inputs_are_not_written_and_views_need_no_copy():
    z, y = _tensors(b=2, t=5, v=9)
    wide = torch.zeros(2, 5, 18)
    wide[..., ::2] = z
    view = wide[..., ::2]
    before = wide.clone()
    torch.testing.assert_close(acc.weighted_sequence_ce(view, y, reduction="none"),
                               acc.weighted_sequence_ce(z, y, reduction="none"))
    assert torch.equal(wide, before)
    losses = torch.tensor([3.0, 1.0, 2.0, 5.0])
    active = torch.tensor([True, False, True, True])
    acc.loss_reweight_weights(losses, active)
    assert torch.equal(losses, torch.tensor([3.0, 1.0, 2.0, 5.0]))


def test_compiled_workflow_forward_and_backward():
    torch._dynamo.reset()

    def step(logits, labels):
        losses = acc.weighted_sequence_ce(logits, labels, reduction="none")
        w = acc.loss_reweight_weights(losses, (labels[:, 1:] != -100).any(1), strategy="extremes")
        return acc.weighted_sequence_ce(logits, labels, w, scale=2.0)

    z, y = _tensors(b=2, t=4, v=7, seed=8)
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(a, y), step(b, y)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_data_dependent_errors_become_nan():
    z, y = _tensors()
    y = y.clone()
    y[2, 3] = 11  # out of range: sequence 2 only
    out = acc.weighted_sequence_ce(z, y, reduction="none")
    assert torch.isnan(out[2]) and torch.isfinite(out[:2]).all()
    w = acc.loss_reweight_weights(torch.tensor([1.0, float("inf"), 2.0]))
    assert torch.isnan(w).all()
    # a NaN loss in an inactive entry is fine
    w = acc.loss_reweight_weights(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([True, False, True]))
    want = loss_reweight_weights([1.0, np.nan, 2.0], np.array([True, False, True]))
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)
    assert w[1] == 0


@pytest.mark.parametrize("call, error, match", [
    (lambda z, y: acc.weighted_sequence_ce(z[0], y), ValueError, "logits"),
    (lambda z, y: acc.weighted_sequence_ce(z.double(), y), TypeError, "logits"),
    (lambda z, y: acc.weighted_sequence_ce(z, y.float()), TypeError, "labels"),
    (lambda z, y: acc.weighted_sequence_ce(z, y[:, :3]), ValueError, "labels"),
    (lambda z, y: acc.weighted_sequence_ce(z, y, torch.ones(4)), ValueError, "weights"),
    (lambda z, y: acc.weighted_sequence_ce(z, y, scale=float("inf")), ValueError, "scale"),
    (lambda z, y: acc.weighted_sequence_ce(z, y, reduction="avg"), ValueError, "reduction"),
    (lambda z, y: acc.loss_reweight_weights(torch.ones(3), torch.ones(3)), TypeError, "active"),
    (lambda z, y: acc.loss_reweight_weights(torch.ones(3), temperature=0.0), ValueError, "temperature"),
    (lambda z, y: acc.loss_reweight_weights(torch.ones(3), strategy="linear"), ValueError, "strategy"),
    (lambda z, y: acc.loss_reweight_weights(torch.ones(3, 1)), ValueError, "losses"),
])
def test_errors_name_the_argument(call, error, match):
    z, y = _tensors()
    with pytest.raises(error, match=match):
        call(z, y)


def test_narrow_label_dtypes():
    z, y = _tensors(seed=9)
    want = acc.weighted_sequence_ce(z, y, reduction="none")
    torch.testing.assert_close(acc.weighted_sequence_ce(z, y.int(), reduction="none"), want)
    y8 = torch.where(y == -100, 255, y).to(torch.uint8)
    torch.testing.assert_close(acc.weighted_sequence_ce(z, y8, ignore_index=255, reduction="none"), want)


@pytest.mark.gpu
def test_gpu_weighted_sequence_ce_offsets_beyond_2_to_the_31():
    """(4, 64, 1000) logits as a view whose token rows are 2**23 + 2**16 elements apart: offsets reach
    ~2.16e9 elements, and the view must give what its contiguous copy gives."""
    b, t, v, row = 4, 64, 1000, 2**23 + 2**16
    try:
        buf = torch.zeros(b, t, row, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4.3 GB buffer")
    buf[:, :, :v] = torch.randn(b, t, v, device="cuda").to(torch.bfloat16)
    view = buf[:, :, :v]
    assert (b * t - 1) * view.stride(1) > 2**31
    labels = torch.randint(0, v, (b, t), device="cuda")
    labels[:, :5] = -100
    weights = torch.rand(b, device="cuda")
    results = []
    for x in (view, view.contiguous()):
        x = x.detach().requires_grad_(True)
        loss = acc.weighted_sequence_ce(x, labels, weights)
        (g,) = torch.autograd.grad(loss, x)
        results.append((loss, g))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
