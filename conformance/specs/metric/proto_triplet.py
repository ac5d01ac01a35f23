"""Specs of the Proto-Triplet and ICNN losses (P25).

Both losses select (the nearest other prototype; the nearest neighbours, the nearest other-class
neighbour, a row max and a global max), so an input whose selection is a near-tie would let fp32
and float64 pick different items and disagree by a jump. The strategies therefore draw inputs whose
decisions are separated by a relative gap of at least ``GAP`` on the values the dtype under test
holds (exact ties from duplicated points are kept: both sides break them by index), and finite
differences skip the exact ties, where the loss has a kink.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, strategies as st

from ...numerics import round_to_dtype
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

REF = "twinops.reference.metric.proto_triplet"
ACC = "twinops.accelerated.metric.proto_triplet"
BASE = "twinops.conformance.baselines.metric.proto_triplet"

GAP = 1e-4  # relative separation of every decision the strategies allow (fp32 distance error ~1e-7)

QUERIES = {"ci": (1, 2, 3, 5, 8, 16, 17), "dev": (1, 2, 3, 5, 8, 15, 16, 17, 33), "gpu": (2, 75, 129, 600)}
WAYS = {"ci": (1, 2, 3, 5, 17), "dev": (1, 2, 3, 5, 15, 16, 17, 20), "gpu": (2, 5, 20, 65)}
DIMS = {"ci": (1, 3, 8, 17, 40), "dev": (1, 2, 3, 8, 16, 17, 33, 64), "gpu": (3, 64, 127, 640)}
ICNN_POINTS = {"ci": (3, 4, 5, 8, 17), "dev": (3, 4, 5, 8, 15, 16, 17, 20), "gpu": (3, 25, 100, 129)}

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(rows x D): every output sums per-row terms, each built from distances "
        "that are sums over D squared differences rounded in fp32.",
        "atol scales with the largest gradient entry of the row: a gradient entry is a difference of "
        "unit vectors (q - p)/d, whose cancellation leaves an fp32 error relative to the row's scale.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: results are "
        "rounded to the input dtype.",
    ),
)


def _distances(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2) + 1e-6)


def _separated(values, exact_ok=True) -> bool:
    """Sorted ``values`` (1-D) pairwise separated by GAP (relative), exact equalities allowed."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size < 2:
        return True
    gap = np.diff(v)
    scale = np.maximum(1.0, np.abs(v[1:]))
    ok = gap > GAP * scale
    if exact_ok:
        ok |= gap == 0
    return bool(ok.all())


# ---------------------------------------------------------------------------- proto_triplet_loss


def _proto_clean(q, y, p, margin, exact_ok=True) -> bool:
    """No near-tie in the negative choice nor at the hinge."""
    if p.shape[0] < 2 or q.shape[0] == 0:
        return True
    dist = _distances(q, p)
    for i in range(q.shape[0]):
        others = np.delete(dist[i], y[i])
        two = np.sort(others)[:2]
        if two.size == 2 and not _separated(two, exact_ok):
            return False
        hinge = dist[i, y[i]] - two[0] + margin
        if abs(hinge) <= GAP * max(1.0, abs(dist[i, y[i]])):
            return False
    return True


@st.composite
def _proto_samples(draw, profile, dtype):
    rng = seed(draw)
    n = draw(st.sampled_from(QUERIES[profile]))
    w = draw(st.sampled_from(WAYS[profile]))
    d = draw(st.sampled_from(DIMS[profile]))
    scale = draw(st.sampled_from((0.1, 1.0, 10.0)))
    spread = draw(st.sampled_from((0.3, 1.0, 3.0)))  # query spread around its prototype: inactive .. active
    margin = draw(st.sampled_from((0.5, 0.5, 0.0, 2.0)) | st.floats(0.0, 3.0))
    duplicate = w >= 3 and draw(st.booleans())
    for _ in range(50):
        p = rng.normal(size=(w, d)) * scale
        if duplicate:
            p[2] = p[1]  # two identical prototypes: an exact tie, broken by index on both sides
        y = rng.integers(0, w, size=n)
        q = p[y] + rng.normal(size=(n, d)) * scale * spread
        qr, pr = round_to_dtype(q, dtype), round_to_dtype(p, dtype)
        if _proto_clean(qr, y, pr, margin * scale):
            break
    assume(_proto_clean(qr, y, pr, margin * scale))  # coarse dtypes (bf16) may need another draw
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    layouts = {"queries": draw(st.sampled_from(LAYOUTS)), "prototypes": draw(st.sampled_from(LAYOUTS))}
    return Sample({"queries": q, "query_labels": y.astype(np.int64), "prototypes": p},
                  {"margin": margin * scale, "reduction": reduction}, ("queries", "prototypes"), layouts=layouts,
                  grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
                  note=f"scale {scale:g}, spread {spread:g}" + (", duplicate prototypes" if duplicate else ""))


def _proto_examples():
    rng = np.random.default_rng(7)
    p = rng.normal(size=(4, 6))
    y = np.array([0, 1, 2, 3, 1])
    q = p[y] + 0.8 * rng.normal(size=(5, 6))
    nan_q, inf_p = q.copy(), p.copy()
    nan_q[2, 1] = np.nan
    inf_p[3, 0] = np.inf
    cases = (
        (q, y, p, 0.5, "none", "ordinary episode, per-query losses"),
        (q, np.zeros(5, np.int64), p[:1], 0.5, "mean", "one class: no negative, loss 0"),
        (p[y], y, p, 0.0, "sum", "queries on their prototypes, margin 0: inactive"),
        (q, y, p, 100.0, "mean", "every query active"),
        (nan_q, y, p, 0.5, "none", "NaN in a query: NaN for that query only"),
        (q, y, inf_p, 0.5, "none", "inf in a prototype: NaN for every query"),
        (q[:0], y[:0], p, 0.5, "sum", "empty batch"),
    )
    out = []
    for a, b, c, margin, reduction, note in cases:
        finite = np.isfinite(a).all() and np.isfinite(c).all()
        grad = upstream_grad(rng, (len(b),) if reduction == "none" else ()) if finite else None
        out.append(Sample({"queries": a, "query_labels": b, "prototypes": c},
                          {"margin": margin, "reduction": reduction},
                          ("queries", "prototypes"), grad_out=grad, note=note))
    return out


def _proto_fd_skip(sample: Sample):
    a = sample.arrays
    if not _proto_clean(np.asarray(a["queries"], float), a["query_labels"], np.asarray(a["prototypes"], float),
                        sample.kwargs["margin"], exact_ok=False):
        return ("finite differences skip exact ties of the nearest other prototype and queries at the hinge "
                "(kinks: the gradient there is the documented one-sided choice)")
    return None


def _proto_length(sample: Sample) -> int:
    n, d = np.shape(sample.arrays["queries"])
    return max(1, n * d)


def _proto_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Unique traffic: read queries and prototypes (forward), also write their gradients (backward)."""
    n, d = np.shape(arrays["queries"])
    w = np.shape(arrays["prototypes"])[0]
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * (n + w) * d * itemsize + 20 * n)


def _proto_bench(way, queries_per_class, d):
    n = way * queries_per_class

    def build(rng, way, n, d):
        p = rng.standard_normal((way, d))
        y = np.repeat(np.arange(way), n // way)
        return {"queries": p[y] + rng.standard_normal((n, d)), "query_labels": y, "prototypes": p}, {}

    return BenchCase(f"{way}-way {n} queries D={d}", lambda rng: build(rng, way, n, d),
                     ("queries", "prototypes"), smoke=lambda rng: build(rng, 3, 6, 8))


def _own_prototype_as_negative(fn):
    """Forgets to exclude the query's own class from the negatives (every prototype appears twice, so
    the own prototype's copy competes for the nearest negative)."""

    def port(**kw):
        import torch

        return fn(**dict(kw, prototypes=torch.cat([kw["prototypes"], kw["prototypes"]])))

    return port


def _margin_ignored(fn):
    return lambda **kw: fn(**dict(kw, margin=0.0))


def _bad_proto(description, error, match, q=(3, 4), p=(2, 4), y=(0, 1, 1), data_dependent=False, **kw):
    def make():
        return {"queries": np.zeros(q), "query_labels": np.array(y, dtype=np.int64), "prototypes": np.ones(p)}, kw

    return BadInput(description, make, error, match, data_dependent=data_dependent)


PROTO_TRIPLET = Spec(
    name="proto_triplet_loss",
    paper=25,
    family="metric",
    summary="Triplet loss of each query against its own prototype and the nearest other prototype.",
    reference=f"{REF}:proto_triplet_loss",
    reference_grad=f"{REF}:proto_triplet_loss_grad",
    accelerated=f"{ACC}:proto_triplet_loss",
    baseline=f"{BASE}:proto_triplet_loss",
    samples=_proto_samples,
    examples=_proto_examples,
    grad_inputs=("queries", "prototypes"),
    tolerance=TOLERANCE,
    reduction_length=_proto_length,
    fd_skip=_proto_fd_skip,
    bad_inputs=(
        _bad_proto("label >= W", ValueError, "query_labels", y=(0, 2, 1), data_dependent=True),
        _bad_proto("negative label", ValueError, "query_labels", y=(0, -1, 1), data_dependent=True),
        BadInput("float labels", lambda: ({"queries": np.zeros((2, 4)), "query_labels": np.array([0.0, 1.0]),
                                           "prototypes": np.ones((2, 4))}, {}), TypeError, "query_labels"),
        _bad_proto("label count differs from N", ValueError, "query_labels", y=(0, 1)),
        _bad_proto("prototype width differs from D", ValueError, "prototypes", p=(2, 5)),
        _bad_proto("no prototype", ValueError, "prototypes", p=(0, 4), y=()),
        _bad_proto("1-D queries", ValueError, "queries", q=(4,)),
        _bad_proto("margin NaN", ValueError, "margin", margin=float("nan")),
        _bad_proto("unknown reduction", ValueError, "reduction", reduction="avg"),
    ),
    bench_cases=(_proto_bench(5, 15, 640), _proto_bench(20, 30, 640)),
    bytes_moved=_proto_bytes,
    wrong_ports={
        "own prototype counted as a negative": _own_prototype_as_negative,
        "margin ignored": _margin_ignored,
    },
    properties=("W = 1 gives loss 0 (no negative)", "negative ties go to the lowest prototype index"),
)


# ------------------------------------------------------------------------------------ icnn_loss


def _icnn_decisions_clean(o, yo, t, yt, k, ipc, exact_ok=True) -> bool:
    """Every selection of the modified ICNN score is separated by GAP (exact ties allowed)."""
    m = t.shape[0]
    clamped = k + 2 >= m
    k = m - 2 if clamped else k
    ipc = k + 1 if ipc is None else ipc
    dist = _distances(o, t)
    maxima = []
    for i in range(o.shape[0]):
        row = np.sort(dist[i])[:ipc + 2]  # the neighbours and the first one left out
        if not _separated(row, exact_ok):
            return False
        order = np.argsort(dist[i], kind="stable")[1:ipc + 1]
        dd = dist[i, order]
        other = yt[order] != yo[i]
        if other.any():
            c = dd[other].min()
            u_max = (dd[:k] / (c + 1e-7)).max()
            if abs(u_max - 1.0) <= GAP:
                return False
        maxima += list(np.where(other[:k], dd[:k], 0.0))
    top = np.sort(maxima)[-2:]
    return _separated(top, exact_ok) or top[0] == 0


@st.composite
def _icnn_samples(draw, profile, dtype):
    rng = seed(draw)
    d = draw(st.sampled_from(DIMS[profile]))
    classes = draw(st.sampled_from((1, 2, 3, 5)))
    mode = draw(st.sampled_from(("self", "self", "cross")))
    n = draw(st.sampled_from(ICNN_POINTS[profile]))
    m = n if mode == "self" else draw(st.sampled_from(ICNN_POINTS[profile]))
    k = draw(st.sampled_from((1, 2, 4, 4, 6)))
    k_eff = m - 2 if k + 2 >= m else k
    ipc = draw(st.none() | st.integers(k_eff, m - 1))
    scale = draw(st.sampled_from((0.1, 1.0, 10.0)))
    spread = draw(st.sampled_from((0.5, 2.0)))  # points around class centres: separated .. mixed classes
    for _ in range(50):
        centres = rng.normal(size=(classes, d)) * scale
        yo = rng.integers(0, classes, size=n)
        o = centres[yo] + rng.normal(size=(n, d)) * scale * spread
        if mode == "self":
            t, yt = o.copy(), yo.copy()
        else:
            yt = rng.integers(0, classes, size=m)
            t = centres[yt] + rng.normal(size=(m, d)) * scale * spread
        clean = _icnn_decisions_clean(round_to_dtype(o, dtype), yo, round_to_dtype(t, dtype), yt, k, ipc)
        if clean:
            break
    assume(clean)  # coarse dtypes (bf16) may need another draw
    layouts = {"origin": draw(st.sampled_from(LAYOUTS)), "target": draw(st.sampled_from(LAYOUTS))}
    arrays = {"origin": o, "origin_labels": yo.astype(np.int64), "target": t, "target_labels": yt.astype(np.int64)}
    return Sample(arrays,
                  {"k": k, "ipc": ipc}, ("origin", "target"), layouts=layouts, grad_out=upstream_grad(rng, ()),
                  note=f"{mode}, {classes} classes, scale {scale:g}, spread {spread:g}")


def _icnn_examples():
    rng = np.random.default_rng(11)
    o = rng.normal(size=(6, 4))
    y = np.array([0, 0, 1, 1, 2, 2])
    t = rng.normal(size=(5, 4))
    yt = np.array([0, 1, 2, 0, 1])
    grad = np.array(1.3)
    nan_o = o.copy()
    nan_o[1, 1] = np.nan
    inf_t = t.copy()
    inf_t[2, 0] = np.inf
    cases = (
        (o, y, o.copy(), y, {}, "support vs support (target = origin)", grad),
        (o, y, t, yt, {}, "cross: the truly nearest target is dropped (code quirk)", grad),
        (o, np.zeros(6, np.int64), o.copy(), np.zeros(6, np.int64), {}, "one class: lambda_dc = 1 via o = -1", grad),
        (o, np.arange(6), o.copy(), np.arange(6), {}, "every point its own class: no same-class neighbour", grad),
        (o, y, o.copy(), y, {"k": 10}, "k clamped to M - 2, gamma = 1", grad),
        (o[:1], y[:1], t[:3], yt[:3], {"k": 1, "ipc": 2}, "one origin row, three targets", grad),
        (nan_o, y, o.copy(), y, {}, "NaN in origin", None),
        (o, y, inf_t, yt, {}, "inf in target", None),
    )
    return [Sample({"origin": a, "origin_labels": b, "target": c, "target_labels": e}, kw, ("origin", "target"),
                   grad_out=g, note=note) for a, b, c, e, kw, note, g in cases]


def _icnn_fd_skip(sample: Sample):
    a = sample.arrays
    if not _icnn_decisions_clean(np.asarray(a["origin"], float), a["origin_labels"], np.asarray(a["target"], float),
                                 a["target_labels"], sample.kwargs.get("k", 4), sample.kwargs.get("ipc"),
                                 exact_ok=False):
        return ("finite differences skip exact ties (the symmetric d(o_i, t_j) = d(o_j, t_i) at the global max "
                "when target = origin, duplicated points): the loss has a kink there and the gradient is the "
                "documented first-position choice")
    return None


def _icnn_length(sample: Sample) -> int:
    return max(1, int(np.shape(sample.arrays["origin"])[0]))


ICNN_TOLERANCE = Tolerance(
    rtol=TOLERANCE.rtol,
    atol={"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(n): the score sums one term per origin row.",
        "fp32 atol 1e-5 (default 1e-6) relative to the row's largest gradient entry: the gradient "
        "sums terms of size ~1/c_i^2 (c_i the nearest other-class distance) that cancel; on dense "
        "draws (1-D points 0.01 apart) the fp32 result keeps ~1e-5 of its row's scale.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: results are "
        "rounded to the input dtype.",
    ),
)


def _icnn_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Unique traffic: origin and target read once (forward; the target tiles are re-read from cache by
    every origin row), read again and their gradients written (backward), plus the neighbour lists."""
    n, d = np.shape(arrays["origin"])
    m = np.shape(arrays["target"])[0]
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * (n + m) * d * itemsize + 64 * n)


def _icnn_bench(way, shot, query, d):
    def build(rng, way, shot, query, d):
        per = shot + query
        y = np.repeat(np.arange(way), per)
        centres = rng.standard_normal((way, d))
        x = centres[y] + rng.standard_normal((way * per, d))
        return {"origin": x, "origin_labels": y, "target": x.copy(), "target_labels": y.copy()}, {"ipc": per}

    label = f"{way}-way {shot}-shot {query}-query, support+query D={d}"
    return BenchCase(label, lambda rng: build(rng, way, shot, query, d), ("origin", "target"),
                     smoke=lambda rng: build(rng, 2, 2, 2, 4))


def _labels_ignored(fn):
    """All points treated as one class (a port that forgets the labels)."""
    return lambda **kw: fn(**dict(kw, origin_labels=kw["origin_labels"] * 0, target_labels=kw["target_labels"] * 0))


def _k_ignored(fn):
    """Uses the default k = 4 whatever is asked."""
    return lambda **kw: fn(**dict(kw, k=4, ipc=None))


def _bad_icnn(description, error, match, o=(4, 3), t=(5, 3), yo=None, yt=None, **kw):
    def make():
        arrays = {"origin": np.zeros(o), "origin_labels": np.zeros(o[0] if yo is None else yo, np.int64),
                  "target": np.ones(t), "target_labels": np.zeros(t[0] if yt is None else yt, np.int64)}
        return arrays, kw

    return BadInput(description, make, error, match)


ICNN = Spec(
    name="icnn_loss",
    paper=25,
    family="metric",
    summary="-log of the authors' modified inter/intra-class nearest-neighbour score of an episode's embeddings.",
    reference=f"{REF}:icnn_loss",
    reference_grad=f"{REF}:icnn_loss_grad",
    accelerated=f"{ACC}:icnn_loss",
    baseline=f"{BASE}:icnn_loss",
    samples=_icnn_samples,
    examples=_icnn_examples,
    grad_inputs=("origin", "target"),
    tolerance=ICNN_TOLERANCE,
    reduction_length=_icnn_length,
    fd_skip=_icnn_fd_skip,
    bad_inputs=(
        _bad_icnn("target with 2 rows", ValueError, "target", t=(2, 3)),
        _bad_icnn("target width differs from origin", ValueError, "target", t=(5, 4)),
        _bad_icnn("origin label count differs", ValueError, "origin_labels", yo=3),
        _bad_icnn("target label count differs", ValueError, "target_labels", yt=4),
        _bad_icnn("k = 0", ValueError, "k", k=0),
        _bad_icnn("ipc < k", ValueError, "ipc", k=2, ipc=1),
        _bad_icnn("ipc >= M", ValueError, "ipc", k=1, ipc=5),
        _bad_icnn("no origin row", ValueError, "origin", o=(0, 3)),
        BadInput("target without target_labels", lambda: ({"origin": np.zeros((4, 3)),
                                                           "origin_labels": np.zeros(4, np.int64),
                                                           "target": np.ones((5, 3))}, {}), ValueError, "target"),
        BadInput("float labels", lambda: ({"origin": np.zeros((4, 3)), "origin_labels": np.zeros(4)}, {}),
                 TypeError, "origin_labels"),
    ),
    bench_cases=(_icnn_bench(5, 5, 15, 640), _icnn_bench(20, 5, 30, 640)),
    bytes_moved=_icnn_bytes,
    wrong_ports={"labels ignored": _labels_ignored, "k ignored (always 4)": _k_ignored},
    properties=(
        "neighbours in the order (distance, index); the first is always dropped (code quirk)",
        "k clamped to M - 2 (then gamma = 1), as in the authors' code",
    ),
)

register(PROTO_TRIPLET, ICNN)
