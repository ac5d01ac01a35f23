"""Metrix (P22): the reference against independent forms (a transcription of the authors' triple
loops, a pair-by-pair loop, a hand-computed case), and the accelerated function's behaviour."""

import itertools
import math

import numpy as np
import pytest
import torch

from twinops.reference.metric.metrix_loss import metrix_loss, metrix_loss_grad, metrix_triples

KW = dict(lam=0.37, mix_weight=0.4, pos_margin=0.1, neg_margin=0.9)


def authors_triples(labels, mode):
    """The authors' list building, transcribed loop for loop: all (a, p) and (a, n) pairs in row-major
    order (``get_all_pairs_indices``), then ``embed_posneg_pair_mixup_for_pos_anchor`` /
    ``embed_neg_pair_mixup_without_posanchor``."""
    b = len(labels)
    a1, pos = zip(*[(i, j) for i in range(b) for j in range(b) if i != j and labels[i] == labels[j]]) or ((), ())
    a2, neg = zip(*[(i, j) for i in range(b) for j in range(b) if labels[i] != labels[j]]) or ((), ())
    a1, pos, a2, neg = map(list, (a1, pos, a2, neg))
    if mode == "pos_neg":
        out = ([], [], [])
        for anchor in a1:
            idxs = [k for k, v in enumerate(a2) if v == anchor]
            first = pos[[k for k, v in enumerate(a1) if v == anchor][0]]
            out[0].extend(a2[k] for k in idxs)
            out[1].extend([first] * len(idxs))
            out[2].extend(neg[k] for k in idxs)
        return out
    for anchor in sorted(set(a1)):  # drop the (contiguous) negatives of anchors with positives
        idxs = [k for k, v in enumerate(a2) if v == anchor]
        if idxs:
            a2 = a2[: idxs[0]] + a2[idxs[-1] + 1:]
            neg = neg[: idxs[0]] + neg[idxs[-1] + 1:]
    return a2, list(a2), neg


@pytest.mark.parametrize("mode", ["pos_neg", "anc_neg"])
@pytest.mark.parametrize("seed", range(4))
def test_triples_follow_the_authors_loops(mode, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, [2, 4, 6, 12][seed], size=12)
    got = metrix_triples(labels, mode=mode)
    want = authors_triples(labels.tolist(), mode)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.array(w, dtype=np.int64))
    from twinops.accelerated.metric.metrix_loss import metrix_triples as torch_triples

    for g, t in zip(got, torch_triples(torch.tensor(labels), mode=mode)):
        np.testing.assert_array_equal(g, t.numpy())


def test_triples_reject_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        metrix_triples(np.array([0, 1]), mode="pos_pos")


def loop_loss(e, y, triples, lam, mix_weight, pos_margin, neg_margin):
    """Pair by pair and triple by triple, with plain Python floats."""
    unit = [row / max(math.sqrt(sum(v * v for v in row)), 1e-12) for row in e]
    pos, neg, mpos, mneg = [], [], [], []
    for a, b in itertools.product(range(len(y)), repeat=2):
        d = math.dist(unit[a], unit[b])
        if a != b and y[a] == y[b]:
            pos.append(max(d - pos_margin, 0.0))
        elif y[a] != y[b]:
            neg.append(max(neg_margin - d, 0.0))
    for a, i, j in zip(*triples):
        z = lam * e[i] + (1 - lam) * e[j]
        d = math.dist(unit[a], z / max(math.sqrt(sum(v * v for v in z)), 1e-12))
        mpos.append(lam * max(d - pos_margin, 0.0))
        mneg.append((1 - lam) * max(neg_margin - d, 0.0))

    def avg(xs):
        nz = [x for x in xs if x != 0]
        return sum(nz) / len(nz) if nz else 0.0

    return avg(pos) + avg(neg) + mix_weight * (avg(mpos) + avg(mneg))


@pytest.mark.parametrize("mode", ["pos_neg", "anc_neg", None])
@pytest.mark.parametrize("seed", range(3))
def test_reference_equals_a_pair_loop(mode, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=9)
    e = rng.normal(size=(9, 5)) * rng.uniform(0.5, 2.0, size=(9, 1))
    empty = np.zeros(0, dtype=np.int64)
    triples = metrix_triples(y, mode=mode) if mode else (empty, empty, empty)
    want = loop_loss(e, y, triples, **KW)
    np.testing.assert_allclose(metrix_loss(e, y, *triples, **KW), want, rtol=1e-12)


def test_hand_computed_anc_neg():
    """Two orthogonal unit rows of different classes, lam = 1/2: no clean loss (distance sqrt 2 > 0.5);
    each mixed vector is (1, 1)/sqrt 2, at distance sqrt(2 - sqrt 2) from its anchor."""
    e, y = np.eye(2), np.array([0, 1])
    triples = metrix_triples(y, mode="anc_neg")
    np.testing.assert_array_equal(np.stack(triples), [[0, 1], [0, 1], [1, 0]])
    d = math.sqrt(2 - math.sqrt(2))
    got = metrix_loss(e, y, *triples, lam=0.5, mix_weight=0.4)
    np.testing.assert_allclose(got, 0.4 * 0.5 * d, rtol=1e-14)


def test_counts_exclude_zero_entries():
    """A duplicated positive (distance 0) is left out of the average rather than pulling it down."""
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = np.array([0, 0, 1, 1])
    empty = np.zeros(0, dtype=np.int64)
    d23 = math.dist(e[2], e[3])
    np.testing.assert_allclose(metrix_loss(e, y, empty, empty, empty, lam=0.5), d23, rtol=1e-14)  # no negative < 0.5


def fd(f, x, h=1e-6):
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[idx] = (f(xp) - f(xm)) / (2 * h)
    return out


@pytest.mark.parametrize("mode", ["pos_neg", "anc_neg"])
def test_reference_gradient_against_finite_differences(mode):
    rng = np.random.default_rng(5)
    y = np.array([0, 1, 0, 2, 1, 3, 0])
    e = rng.normal(size=(7, 4))
    triples = metrix_triples(y, mode=mode)
    g = metrix_loss_grad(1.7, e, y, *triples, **KW)
    np.testing.assert_allclose(g, 1.7 * fd(lambda x: metrix_loss(x, y, *triples, **KW), e), atol=1e-7)


def test_reference_errors_name_the_argument():
    e, y = np.zeros((3, 2)), np.array([0, 1, 0])
    a = np.array([0, 1])
    with pytest.raises(ValueError, match="mix_b"):
        metrix_loss(e, y, a, a, np.array([0, 3]), lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        metrix_loss(e, y, a, a, a, lam=-0.1)
    with pytest.raises(ValueError, match="grad"):
        metrix_loss_grad(np.ones(2), e, y, a, a, a, lam=0.5)


# --- accelerated ---------------------------------------------------------------------------------

acc = pytest.importorskip("twinops.accelerated.metric.metrix_loss")


def _batch(seed=0, b=10, d=6):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2, 5][:b])
    return torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1), y


def test_accelerated_matches_reference_on_the_authors_triples():
    x, y = _batch()
    for mode in ("pos_neg", "anc_neg"):
        triples = acc.metrix_triples(y, mode=mode)
        got = acc.metrix_loss(x, y, *triples, **KW)
        want = metrix_loss(x.double().numpy(), y.numpy(), *[t.numpy() for t in triples], **KW)
        np.testing.assert_allclose(got.item(), want, rtol=1e-5)


def test_module_matches_function_with_the_authors_weights():
    x, y = _batch()
    module = acc.MetrixLoss()
    for mode, w in (("pos_neg", 0.4), ("anc_neg", 0.3)):
        triples = acc.metrix_triples(y, mode=mode)
        torch.testing.assert_close(module(x, y, lam=0.7, mode=mode),
                                   acc.metrix_loss(x, y, *triples, lam=0.7, mix_weight=w))


def test_inputs_and_incoming_gradient_are_not_written():
    x, y = _batch()
    x.requires_grad_(True)
    triples = acc.metrix_triples(y, mode="pos_neg")
    saved = [x.detach().clone(), y.clone()] + [t.clone() for t in triples]
    g = torch.tensor(1.3)
    acc.metrix_loss(x, y, *triples, lam=0.3).backward(g)
    for before, after in zip(saved, [x.detach(), y, *triples]):
        assert torch.equal(before, after)
    assert g.item() == pytest.approx(1.3)


def test_no_graph_without_gradients():
    x, y = _batch()
    triples = acc.metrix_triples(y, mode="pos_neg")
    assert acc.metrix_loss(x, y, *triples, lam=0.3).grad_fn is None
    with torch.no_grad():
        assert acc.metrix_loss(x.requires_grad_(True), y, *triples, lam=0.3).grad_fn is None


def test_out_of_range_index_gives_nan():
    x, y = _batch()
    a = torch.tensor([0, 1, 2])
    assert torch.isnan(acc.metrix_loss(x, y, a, a, torch.tensor([3, 10, 4]), lam=0.5))


def test_traces_as_one_graph():
    torch._dynamo.reset()
    x, y = _batch()
    triples = acc.metrix_triples(y, mode="pos_neg")

    def loss(x, y, a, i, j):
        return acc.metrix_loss(x, y, a, i, j, lam=0.6, mix_weight=0.4)

    xc = x.clone().requires_grad_(True)
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(xc, y, *triples)
    out.backward()
    xe = x.clone().requires_grad_(True)
    want = loss(xe, y, *triples)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(embeddings=torch.zeros(10, 6, dtype=torch.float64)), "float32"),
    (dict(embeddings=torch.zeros(10)), "embeddings"),
    (dict(labels=torch.zeros(9, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(10)), "labels"),
    (dict(mix_a=torch.zeros(3, dtype=torch.long)), "mix_a"),
    (dict(anchors=torch.zeros(2, 2, dtype=torch.long)), "anchors"),
    (dict(lam=2.0), "lam"),
])
def test_bad_inputs_name_the_argument(bad, match):
    x, y = _batch()
    a = torch.tensor([0, 1])
    args = dict(embeddings=x, labels=y, anchors=a, mix_a=a, mix_b=a, lam=0.5) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc.metrix_loss(**args)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y = _batch()
    a = torch.tensor([0])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        acc.metrix_loss(x, y, a, a, a, lam=0.5)


@pytest.mark.parametrize("mode", ["pos_neg", "anc_neg"])
def test_triples_of_an_empty_or_single_batch_are_empty(mode):
    for labels in (torch.zeros(0, dtype=torch.long), torch.tensor([3])):
        assert all(t.numel() == 0 and t.dtype == torch.int64 for t in acc.metrix_triples(labels, mode=mode))
    with pytest.raises(ValueError, match="mode"):
        acc.metrix_triples(torch.tensor([0, 1]), mode="both")


def test_blocks_of_triples_sharing_anchor_and_mix_a_rows():
    """The backward adds a block's summed row once when all its triples share the anchor (and the
    mix_a row), as the authors' sorted triples do; the interpreter's blocks hold 32 triples."""
    rng = np.random.default_rng(3)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 4])
    x = rng.normal(size=(8, 5))
    anchors = np.repeat([0, 1, 5], 32)
    mix_a = np.concatenate([np.full(32, 1), np.full(32, 0), rng.integers(0, 8, 32)])
    mix_b = np.concatenate([rng.choice([2, 3, 4, 5, 6, 7], 32), rng.choice([2, 3, 6, 7], 32),
                            rng.choice([0, 1, 2, 3, 6, 7], 32)])
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    idx = [torch.tensor(v) for v in (anchors, mix_a, mix_b)]
    loss = acc.metrix_loss(xt, torch.tensor(y), *idx, **KW)
    (grad,) = torch.autograd.grad(loss, xt, torch.tensor(0.7))
    xr = xt.detach().double().numpy()
    np.testing.assert_allclose(loss.item(), metrix_loss(xr, y, anchors, mix_a, mix_b, **KW), rtol=1e-5)
    want = metrix_loss_grad(0.7, xr, y, anchors, mix_a, mix_b, **KW)
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-4, atol=1e-6)
