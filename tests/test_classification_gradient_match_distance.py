"""Gradient-matching distance (P17): the reference against hand computations and PyTorch autograd in
float64; the accelerated path as DC uses it (synthetic gradients built with create_graph=True, the
distance differentiated back into the images), its list API, errors and compile behaviour."""

import math

import numpy as np
import pytest
import torch

from twinops.accelerated.classification.gradient_match_distance import GradientMatchDistance
from twinops.accelerated.classification.gradient_match_distance import gradient_match_distance as acc_gm
from twinops.accelerated.classification.gradient_match_distance import gradient_match_distance_named as acc_named
from twinops.conformance.baselines.classification.gradient_match_distance import gradient_match_distance as eager_gm
from twinops.reference.classification.gradient_match_distance import (
    gradient_match_distance,
    gradient_match_distance_grad,
)


def test_hand_computed_rows():
    a = np.array([[1.0, 0.0], [3.0, 4.0]])  # real
    b = np.array([[0.0, 2.0], [6.0, 8.0]])  # synthetic
    # row 0 orthogonal: d = 1; row 1 parallel: d = 1 - 50/(5*10 + eps)
    eps = 1e-6
    want = 1.0 + (1.0 - 50.0 / (50.0 + eps))
    assert gradient_match_distance([b], [a]) == pytest.approx(want, rel=1e-15)
    # 1-D tensors are skipped by "ours", compared by "mse" and "cos"
    bias_s, bias_r = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    assert gradient_match_distance([b, bias_s], [a, bias_r]) == pytest.approx(want, rel=1e-15)
    assert gradient_match_distance([b, bias_s], [a, bias_r], metric="mse") == pytest.approx((1 + 4 + 9 + 16) + (1 + 4))
    flat_a, flat_b = np.r_[a.ravel(), bias_r], np.r_[b.ravel(), bias_s]
    cos = flat_a @ flat_b / (np.linalg.norm(flat_a) * np.linalg.norm(flat_b) + eps)
    assert gradient_match_distance([b, bias_s], [a, bias_r], metric="cos") == pytest.approx(1 - cos, rel=1e-14)


def test_row_views_of_conv_and_3d_tensors():
    rng = np.random.default_rng(0)
    conv_s, conv_r = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
    ln_s, ln_r = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    loop = 0.0
    for s, r in ((conv_s, conv_r), (ln_s, ln_r)):
        for o in range(s.shape[0]):
            x, y = r[o].ravel(), s[o].ravel()
            loop += 1 - x @ y / (math.sqrt(x @ x) * math.sqrt(y @ y) + 1e-6)
    assert gradient_match_distance([conv_s, ln_s], [conv_r, ln_r]) == pytest.approx(loop, rel=1e-14)


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_reference_gradient_equals_autograd(metric):
    rng = np.random.default_rng(1)
    shapes = [(3, 2, 2, 2), (3,), (2, 5), (4, 2, 3)]
    syn = [rng.normal(size=s) for s in shapes]
    real = [rng.normal(size=s) for s in shapes]
    syn[2][1] = 0.0  # a zero synthetic row: the second term is 0 there, as torch's norm backward
    ts = [torch.tensor(x, requires_grad=True) for x in syn]
    out = eager_gm(ts, [torch.tensor(x) for x in real], metric=metric)
    want = torch.autograd.grad(out, ts, torch.tensor(1.3, dtype=torch.float64), allow_unused=True)
    got = gradient_match_distance_grad(1.3, syn, real, metric=metric)
    for g, w, s in zip(got, want, syn):
        np.testing.assert_allclose(g, np.zeros_like(s) if w is None else w.numpy(), rtol=1e-10, atol=1e-12)
    assert float(out.detach()) == pytest.approx(float(gradient_match_distance(syn, real, metric=metric)), rel=1e-12)


def test_empty_and_degenerate():
    assert gradient_match_distance([], []) == 0.0
    assert gradient_match_distance([], [], metric="cos") == pytest.approx(1.0)
    z = np.zeros((3, 4))
    assert gradient_match_distance([z], [z]) == pytest.approx(3.0)  # zero rows: d = 1 each
    assert np.isnan(gradient_match_distance([z], [z], eps=0.0))


def test_reference_errors():
    with pytest.raises(TypeError, match="grads_syn"):
        gradient_match_distance(np.ones((2, 2)), [np.ones((2, 2))])
    with pytest.raises(ValueError, match="grads_real has 2"):
        gradient_match_distance([np.ones(2)], [np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match=r"grads_real\[0\]"):
        gradient_match_distance([np.ones((2, 3))], [np.ones((3, 2))])


# ------------------------------------------------------------------------------------- accelerated


def _convnet_grads(images, labels, create_graph):
    """Parameter gradients of the cross-entropy of a tiny conv + linear classifier (DC's setting)."""
    g = torch.Generator().manual_seed(0)
    conv_w = torch.randn(4, 3, 3, 3, generator=g) * 0.3
    conv_b = torch.zeros(4)
    fc_w = torch.randn(5, 4 * 4 * 4, generator=g) * 0.1
    fc_b = torch.zeros(5)
    params = [p.requires_grad_(True) for p in (conv_w, conv_b, fc_w, fc_b)]
    h = torch.relu(torch.nn.functional.conv2d(images, params[0], params[1], padding=1))
    h = torch.nn.functional.avg_pool2d(h, 2).flatten(1)
    loss = torch.nn.functional.cross_entropy(h @ params[2].t() + params[3], labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def test_dataset_condensation_step_matches_eager():
    """The synthetic images' gradient through the distance and the double backward, as DC computes it."""
    g = torch.Generator().manual_seed(1)
    real = [x.detach() for x in _convnet_grads(torch.randn(6, 3, 8, 8, generator=g), torch.arange(6) % 5, False)]
    images = torch.randn(5, 3, 8, 8, generator=g)
    labels = torch.arange(5)
    grads = []
    for fn in (acc_gm, eager_gm):
        syn_images = images.clone().requires_grad_(True)
        syn = _convnet_grads(syn_images, labels, create_graph=True)
        (gi,) = torch.autograd.grad(fn(syn, real), syn_images)
        grads.append(gi)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_list_named_and_module_forms_agree():
    shapes = [(3, 2, 3, 3), (3,), (2, 17), (4, 2, 5)]
    syn = [torch.randn(s) for s in shapes]
    real = [torch.randn(s) for s in shapes]
    named = {**{f"g_s_{i}": x for i, x in enumerate(syn)}, **{f"g_r_{i}": x for i, x in enumerate(real)}}
    a = acc_gm(syn, real, metric="cos")
    torch.testing.assert_close(a, acc_named(metric="cos", **named))
    torch.testing.assert_close(a, GradientMatchDistance(metric="cos")(syn, real))
    torch.testing.assert_close(acc_gm(tuple(syn), tuple(real)), torch.tensor(float(
        gradient_match_distance([x.double().numpy() for x in syn], [x.double().numpy() for x in real])),
        dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_permuted_conv_gradient_needs_no_copy():
    s = torch.randn(3, 3, 3, 4).permute(0, 3, 1, 2)  # (3, 4, 3, 3) with non-mergeable strides
    r = torch.randn(3, 4, 3, 3)
    assert not s.is_contiguous()
    s.requires_grad_(True)
    sc = s.detach().contiguous().requires_grad_(True)
    torch.testing.assert_close(acc_gm([s], [r]), acc_gm([sc], [r]))
    (g1,) = torch.autograd.grad(acc_gm([s], [r]), s)
    (g2,) = torch.autograd.grad(acc_gm([sc], [r]), sc)
    torch.testing.assert_close(g1, g2)


def test_no_gradient_work_when_nothing_requires_grad():
    out = acc_gm([torch.randn(2, 3)], [torch.randn(2, 3)])
    assert not out.requires_grad


def test_compiles_as_one_graph_with_lists():
    torch._dynamo.reset()
    fn = torch.compile(lambda s, r: acc_gm(s, r, metric="ours"), fullgraph=True, backend="aot_eager")
    syn = [torch.randn(3, 2, 2, 2, requires_grad=True), torch.randn(3, requires_grad=True)]
    real = [torch.randn(3, 2, 2, 2), torch.randn(3)]
    out = fn(syn, real)
    torch.testing.assert_close(out, acc_gm(syn, real))
    grads = torch.autograd.grad(out, syn)
    assert torch.equal(grads[1], torch.zeros(3))  # 1-D tensors: exactly zero under "ours"


def test_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"grads_real\[0\] requires grad"):
        acc_gm([x.clone().requires_grad_(True)], [x.clone().requires_grad_(True)])
    with pytest.raises(TypeError, match="one dtype"):
        acc_gm([x, x.half()], [x, x.half()])
    with pytest.raises(ValueError, match="dimensions"):
        acc_gm([torch.tensor(1.0)], [torch.tensor(1.0)])
    with pytest.raises(TypeError, match="grads_syn"):
        acc_gm(x, [x])
    with pytest.raises(ValueError, match="metric"):
        acc_gm([x], [x], metric="l1")


# ------------------------------------------------------------------------------------- GPU lane

CONVNET3 = ((128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
            (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,))


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_gpu_convnet3_gradients_against_float64(metric):
    """The benchmark's parameter list (fp32, realistic gradient scale) against the reference and autograd."""
    torch.manual_seed(0)
    real = [torch.randn(s, device="cuda") * 1e-2 for s in CONVNET3]
    syn = [(r + torch.randn_like(r) * 1e-2).requires_grad_(True) for r in real]
    out = acc_gm(syn, real, metric=metric)
    syn64 = [s.detach().double().cpu().numpy() for s in syn]
    real64 = [r.double().cpu().numpy() for r in real]
    want = float(gradient_match_distance(syn64, real64, metric=metric))
    assert float(out) == pytest.approx(want, rel=1e-5, abs=1e-4)
    grads = torch.autograd.grad(out, syn)
    for g, w in zip(grads, gradient_match_distance_grad(1.0, syn64, real64, metric=metric)):
        np.testing.assert_allclose(g.double().cpu().numpy(), w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))


@pytest.mark.gpu
def test_gpu_inductor_compile_and_strided_views():
    syn = [torch.randn(64, 3, 3, 4, device="cuda").permute(0, 3, 1, 2).requires_grad_(True),
           torch.randn(64, device="cuda", requires_grad=True), torch.randn(10, 300, device="cuda")[:, ::2]]
    syn[2].requires_grad_(True)
    real = [torch.randn(s.shape, device="cuda") for s in syn]
    fn = torch.compile(lambda s, r: acc_gm(s, r), fullgraph=True)
    torch.testing.assert_close(fn(syn, real), acc_gm(syn, real))
    contiguous = [s.detach().contiguous().requires_grad_(True) for s in syn]
    g1 = torch.autograd.grad(acc_gm(syn, real), syn)
    g2 = torch.autograd.grad(acc_gm(contiguous, real), contiguous)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """A (256, 1152) synthetic gradient stored as a view whose rows are 2**23 + 2**16 elements apart
    (offsets reach ~2.16e9 elements) must give what its contiguous copy gives, with a contiguous
    conv gradient and a bias beside it."""
    o, i, row = 256, 1152, 2**23 + 2**16
    try:
        buf = torch.zeros(o, row, device="cuda", dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for an 8.6 GB buffer")
    buf[:, :i] = torch.randn(o, i, device="cuda")
    view = buf[:, :i]
    assert (o - 1) * view.stride(0) > 2**31
    real = [torch.randn(o, i, device="cuda"), torch.randn(128, 3, 3, 3, device="cuda"), torch.randn(128, device="cuda")]
    conv, bias = torch.randn(128, 3, 3, 3, device="cuda"), torch.randn(128, device="cuda")
    results = []
    for s in (view, view.contiguous()):
        syn = [t.detach().requires_grad_(True) for t in (s, conv, bias)]
        dist = acc_gm(syn, real)
        grads = torch.autograd.grad(dist, syn)
        results.append((dist, grads))
    del buf, view
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
