"""Spec of the Metrix loss (P22): contrastive loss on clean pairs plus mixed (anchor, mix_a, mix_b) triples."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from twinops.reference.metric.metrix_loss import EPS, metrix_triples
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, embeddings, seed, upstream_grad

NAME = "metrix_loss"
REF = "twinops.reference.metric.metrix_loss"
ACC = "twinops.accelerated.metric.metrix_loss"
BASE = "twinops.conformance.baselines.metric.metrix_loss"

# Interpreter runs cost per kernel program: keep the mixed triples of a drawn sample to a few blocks.
MAX_TRIPLES = {"ci": 40, "dev": 200, "gpu": 5000}
INDEX_NAMES = ("anchors", "mix_a", "mix_b")


def _random_triples(rng, labels, m):
    """``m`` explicit triples: any anchor, any first row, a second row of another class (so the mixed
    vector is never parallel to its anchor by construction, except through lam = 1 and mix_a = anchor)."""
    out = ([], [], [])
    for _ in range(m):
        a = int(rng.integers(len(labels)))
        others = np.flatnonzero(labels != labels[a])
        if len(others) == 0:
            continue
        for lst, v in zip(out, (a, int(rng.integers(len(labels))), int(rng.choice(others)))):
            lst.append(v)
    return tuple(np.array(v, dtype=np.int64) for v in out)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    # ci: batches and widths up to 17 cross the 16-wide interpreter tiles; larger ones only cost time
    # (every drawn example runs the interpreter, and shrinking a caught wrong port runs it many times).
    cap = 17 if profile == "ci" else None
    b = draw(st.sampled_from([v for v in EMBED_BATCH[profile] if cap is None or v <= cap]))
    d = draw(st.sampled_from([v for v in EMBED_DIMS[profile] if cap is None or v <= cap]))
    classes = draw(st.sampled_from((1, 2, max(1, b // 3), max(1, b // 2), b)))
    labels = rng.integers(0, classes, size=b).astype(np.int64)
    scale = draw(st.sampled_from(("unit", 0.3, 1.0, 8.0)))
    x = embeddings(rng, b, d, normalize=True) if scale == "unit" else embeddings(rng, b, d, scale=scale)
    duplicates = draw(st.sampled_from((False, False, False, True)))
    if duplicates:  # ties: some rows repeat another row of their class exactly (distance 0)
        for r in range(b):
            same = np.flatnonzero(labels == labels[r])
            if same[0] != r and rng.random() < 0.5:
                x[r] = x[same[0]]
    mode = draw(st.sampled_from(("pos_neg", "anc_neg", "random")))
    if mode == "random":
        triples = _random_triples(rng, labels, draw(st.sampled_from((1, 15, 16, 17, 33, 70))))
    else:
        triples = metrix_triples(labels, mode=mode)
    if len(triples[0]) > MAX_TRIPLES[profile]:  # a subset, kept in order: still valid explicit triples
        keep = np.sort(rng.choice(len(triples[0]), MAX_TRIPLES[profile], replace=False))
        triples = tuple(t[keep] for t in triples)
    kwargs = {
        "lam": draw(st.sampled_from((0.0, 0.5, 1.0)) | st.floats(0.05, 0.95)),
        "mix_weight": draw(st.sampled_from((0.4, 0.3, 1.0, 0.0, 2.5))),
        "pos_margin": draw(st.sampled_from((0.0, 0.0, 0.1, 0.4))),
        "neg_margin": draw(st.sampled_from((0.5, 0.5, 1.0, 1.5, 0.0, 2.5))),
    }
    layouts = {"embeddings": draw(st.sampled_from(LAYOUTS))}
    for name in ("labels",) + INDEX_NAMES:
        if draw(st.booleans()):
            layouts[name] = "strided"
    arrays = {"embeddings": x, "labels": labels, **dict(zip(INDEX_NAMES, triples))}
    return Sample(arrays=arrays, kwargs=kwargs, float_inputs=("embeddings",), layouts=layouts,
                  grad_out=upstream_grad(rng, ()),
                  note=f"mode={mode}, classes={classes}, scale={scale}, duplicates={duplicates}")


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(0)
    kw = {"lam": 0.6, "mix_weight": 0.4, "pos_margin": 0.0, "neg_margin": 0.5}
    y = np.array([0, 1, 0, 2, 1, 3])
    x = embeddings(rng, 6, 5, normalize=True)
    nan, inf, dup, zero = x.copy(), x.copy(), x.copy(), x.copy()
    nan[2, 1], inf[4, 0], dup[2], zero[3] = np.nan, np.inf, x[0], 0.0
    empty = np.zeros(0, dtype=np.int64)

    def sample(x, y, mode, note, **extra):
        triples = metrix_triples(y, mode=mode) if mode else (empty, empty, empty)
        return Sample({"embeddings": x, "labels": np.asarray(y, dtype=np.int64), **dict(zip(INDEX_NAMES, triples))},
                      {**kw, **extra}, ("embeddings",), grad_out=np.array(1.5), note=note)

    return [
        sample(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), None, "empty batch: loss 0"),
        sample(x[:1], [7], "pos_neg", "one row: no pairs, no triples"),
        sample(x, [4] * 6, "pos_neg", "one class: no negatives, no triples"),
        sample(x, np.arange(6), "anc_neg", "all classes distinct: no positives"),
        sample(x, y, None, "no triples: clean part only"),
        sample(dup, y, "pos_neg", "a duplicated positive (distance 0)"),
        sample(nan, y, "pos_neg", "NaN in row 2"),
        sample(inf, y, "pos_neg", "+inf in row 4"),
        sample(zero, y, "pos_neg", "a zero row (a negative only: never parallel to its anchor)"),
        sample(x, y, "anc_neg", "lam = 1 (mixed vector = anchor)", lam=1.0),
    ]


def _fd_skip(sample: Sample) -> str | None:
    """Finite differences cannot differentiate across a hinge, through a distance of 0, or where a
    count of non-zero entries changes under the step (the counts are constants of the gradient)."""
    e = np.asarray(sample.arrays["embeddings"], dtype=np.float64)
    if e.size == 0 or not np.isfinite(e).all():
        return None
    kw = sample.kwargs
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    if np.any(norm < 1e-3):
        return "finite differences skip zero rows (the normalisation's floor eps is a kink)"
    ehat = e / norm
    y = np.asarray(sample.arrays["labels"])
    d = np.linalg.norm(ehat[:, None] - ehat[None], axis=-1)
    same = y[:, None] == y[None]
    pairs = d[same & ~np.eye(len(y), dtype=bool)]
    negatives = d[~same]
    a, i, j = (np.asarray(sample.arrays[k]) for k in INDEX_NAMES)
    z = kw["lam"] * e[i] + (1 - kw["lam"]) * e[j]
    zn = np.linalg.norm(z, axis=1, keepdims=True)
    dm = np.linalg.norm(ehat[a] - z / np.maximum(zn, EPS), axis=1) if len(a) else np.zeros(0)
    near = 1e-3
    kinks = [np.abs(pairs - kw["pos_margin"]), np.abs(negatives - kw["neg_margin"]), pairs, negatives]
    if 0.0 < kw["lam"]:
        kinks += [np.abs(dm - kw["pos_margin"]), dm]
    if kw["lam"] < 1.0:
        kinks += [np.abs(dm - kw["neg_margin"]), dm]
    if np.any(zn < 1e-3) or any(np.any(k < near) for k in kinks):
        return ("finite differences skip samples with a distance within 1e-3 of a hinge or of 0 (duplicates, "
                "lam = 1 with mix_a = anchor): the non-zero counts change there")
    return None


def _reduction_length(sample: Sample) -> int:
    b, d = np.shape(sample.arrays["embeddings"])
    return int(d + b + len(sample.arrays["anchors"]))


TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D + B + M): a distance sums D squares, and an embedding's gradient sums "
        "over its B pairs and its triples, each an fp32 rounding error.",
        "atol scales with the gradient row's largest entry: entries that nearly cancel keep an fp32 error "
        "relative to the row's scale (which grows like 1 / |e| for small embeddings).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the loss and "
        "the gradient are rounded to the input dtype (the kernels compute in fp32).",
    ),
)


def _bad(description, error, match, *, data_dependent=False, **changes):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 0, 2])
    a, i, j = metrix_triples(y, mode="pos_neg")
    arrays = {"embeddings": rng.normal(size=(4, 3)), "labels": y, "anchors": a, "mix_a": i, "mix_b": j}
    kwargs = {"lam": 0.5}
    for k, v in changes.items():
        (arrays if k in arrays else kwargs)[k] = v
    return BadInput(description, lambda: (arrays, kwargs), error, match, data_dependent=data_dependent)


BAD_INPUTS = (
    _bad("labels length differs from B", ValueError, "labels", labels=np.array([0, 1, 0])),
    _bad("float labels", TypeError, "labels", labels=np.array([0.0, 1.0, 0.0, 2.0])),
    _bad("1-D embeddings", ValueError, "embeddings", embeddings=np.zeros(4)),
    _bad("embeddings with D = 0", ValueError, "embeddings", embeddings=np.zeros((4, 0))),
    _bad("2-D anchors", ValueError, "anchors", anchors=np.zeros((2, 2), dtype=np.int64)),
    _bad("mix_a length differs from anchors", ValueError, "mix_a", mix_a=np.array([0, 1])),
    _bad("float mix_b", TypeError, "mix_b", mix_b=np.array([1.0, 3.0, 1.0, 3.0])),
    _bad("anchor index = B", ValueError, "anchors", data_dependent=True, anchors=np.array([0, 0, 4, 2])),
    _bad("negative mix_b index", ValueError, "mix_b", data_dependent=True, mix_b=np.array([1, 3, -1, 3])),
    _bad("lam = 1.5 (must be in [0, 1])", ValueError, "lam", lam=1.5),
    _bad("lam = NaN", ValueError, "lam", lam=float("nan")),
    _bad("lam = inf", ValueError, "lam", lam=float("inf")),
    _bad("mix_weight = -1 (must be >= 0)", ValueError, "mix_weight", mix_weight=-1.0),
    _bad("neg_margin = -0.5 (must be >= 0)", ValueError, "neg_margin", neg_margin=-0.5),
    _bad("pos_margin = NaN", ValueError, "pos_margin", pos_margin=float("nan")),
)


def _swaps_mixing_weights(fn):
    """Applies lam to mix_b and 1 - lam to mix_a (the mixed vector leans towards the wrong row)."""
    return lambda **kw: fn(**dict(kw, mix_a=kw["mix_b"], mix_b=kw["mix_a"]))


def _ignores_labels(fn):
    """Treats every clean pair as a negative (the label mask of the clean part is lost)."""
    import torch

    return lambda **kw: fn(**dict(kw, labels=torch.arange(len(kw["labels"]), device=kw["labels"].device)))


def _balanced_labels(b, per_class, rng):
    return rng.permutation(np.repeat(np.arange(b // per_class), per_class)).astype(np.int64)


def _bench(b, d, mode, make_labels, label):
    def make(rng):
        y = make_labels(rng)
        a, i, j = metrix_triples(y, mode=mode)
        x = embeddings(rng, b, d, normalize=True).astype(np.float32)
        return {"embeddings": x, "labels": y, "anchors": a, "mix_a": i, "mix_b": j}, {"lam": 0.6}

    def smoke(rng):
        y = np.array([0, 0, 1, 1, 2, 3, 4, 4])
        a, i, j = metrix_triples(y, mode=mode)
        return ({"embeddings": embeddings(rng, 8, 16, normalize=True), "labels": y, "anchors": a, "mix_a": i,
                 "mix_b": j}, {"lam": 0.6})

    return BenchCase(label, make, ("embeddings",), smoke=smoke)


BENCH_CASES = (
    # Balanced sampling, 128 classes of 4: M = 512 * 3 * 508 = 780,288 pos_neg triples.
    _bench(512, 512, "pos_neg", lambda rng: _balanced_labels(512, 4, rng), "B512xD512-K4-pos_neg"),
    # 256 singletons among 192 classes of 4: M = 256 * 1023 = 261,888 anc_neg triples.
    _bench(1024, 512, "anc_neg",
           lambda rng: rng.permutation(np.concatenate([np.repeat(np.arange(192), 4), 192 + np.arange(256)])),
           "B1024xD512-anc_neg"),
)


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Compulsory traffic: the embeddings and labels read once, the three index arrays (int64) read
    once per pass over the triples, the gradient written once. The kernels re-read rows many more
    times (tiles, gathered triples); those reads are served by the caches and are not counted, so
    the percentage is of an ideal that no gather-bound kernel reaches."""
    b, d = np.shape(arrays["embeddings"])
    m = len(arrays["anchors"])
    once = b * d * itemsize + 8 * b + 3 * 8 * m
    fwd, bwd = once, once + b * d * itemsize + 8 * b * d  # + the fp32 gradient buffer, written and read
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


SPEC = Spec(
    name=NAME,
    paper=22,
    family="metric",
    summary="Metrix: mixup for the contrastive loss; clean pairs in tiles, mixed (anchor, mix_a, mix_b) triples "
            "fused without the M x M distance matrix of the authors' code.",
    reference=f"{REF}:metrix_loss",
    reference_grad=f"{REF}:metrix_loss_grad",
    accelerated=f"{ACC}:metrix_loss",
    baseline=f"{BASE}:metrix_loss",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("embeddings",),
    tolerance=TOLERANCE,
    reduction_length=_reduction_length,
    bad_inputs=BAD_INPUTS,
    bench_cases=BENCH_CASES,
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=(
        "metrix_triples reproduces the authors' index lists (pos_neg: first positive, repeated per positive; "
        "anc_neg: anchors without positives), tested against a loop transcription",
        "a loss with no triples equals pytorch-metric-learning's ContrastiveLoss(neg_margin=0.5) with "
        "AvgNonZeroReducer (tested against an independent pair loop)",
    ),
    wrong_ports={
        "swaps the mixing weights": _swaps_mixing_weights,
        "ignores the labels (every clean pair a negative)": _ignores_labels,
    },
)

register(SPEC)
