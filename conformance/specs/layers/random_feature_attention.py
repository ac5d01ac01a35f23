"""Spec of the random-feature attention layer (P47): frozen random query–key matrices, trainable values."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

NAME = "random_feature_attention"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"

QUERIES = {"ci": (1, 2, 3, 17), "dev": (1, 2, 3, 5, 16, 17), "gpu": (1, 17, 64, 65, 257)}
KEYS = {"ci": (1, 2, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 31, 32, 33), "gpu": (1, 63, 64, 65, 500)}
DIMS = {"ci": (1, 3, 8, 16, 17), "dev": (1, 2, 3, 8, 15, 16, 17, 32), "gpu": (3, 16, 64, 65, 128)}
HEADS = {"ci": (1, 2, 16, 17), "dev": (1, 2, 3, 15, 16, 17, 33, 64), "gpu": (1, 63, 64, 65, 1024)}
OUTS = {"ci": (1, 3, 17), "dev": (1, 2, 3, 16, 17), "gpu": (1, 17, 64)}
LAYOUTS_3D = ("contiguous", "strided", "row_strided")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(N + M d + B): an output sums M d features, each a mean over N keys; the "
        "values' gradient sums over the B queries.",
        "atol scales with the row's largest entry: random values make outputs sums of terms of both signs.",
        "16-bit atol 1e-3 / 8e-3: the query projection and the activations are rounded to the input dtype "
        "before their tl.dot (as the eager baseline rounds its einsum results), and outputs and the values' "
        "gradient cancel heavily (terms of size |x0| |x_i|^2 |W| and of both signs summed over N keys, M d "
        "features and B queries), so their error is 16-bit rounding of the terms, not of the result; "
        "outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _sphere(rng, shape, radius=1.0):
    x = rng.normal(size=shape)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * radius


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b, n, d = (draw(st.sampled_from(t[profile])) for t in (QUERIES, KEYS, DIMS))
    m, out = draw(st.sampled_from(HEADS[profile])), draw(st.sampled_from(OUTS[profile]))
    activation = draw(st.sampled_from(ACTS))
    radius = 1.0 if activation == "exp" else draw(st.sampled_from((0.3, 1.0, 2.0)))
    mean = draw(st.sampled_from((0.0, 0.0, 0.5)))  # the paper's biased sampling: W = mean I + Z / sqrt(d)
    arrays = {
        "query": _sphere(rng, (b, d), radius),
        "keys": _sphere(rng, (b, n, d), radius),
        "weights": rng.normal(size=(m, d, d)) / np.sqrt(d) + mean * np.eye(d),
        "values": rng.normal(size=(m, d, out)) / np.sqrt(m * d),
    }
    layouts = {"query": draw(st.sampled_from(LAYOUTS)), "keys": draw(st.sampled_from(LAYOUTS_3D)),
               "weights": draw(st.sampled_from(LAYOUTS_3D)), "values": draw(st.sampled_from(LAYOUTS_3D))}
    return Sample(arrays, {"activation": activation}, tuple(arrays), layouts=layouts,
                  grad_out=upstream_grad(rng, (b, out)), note=f"token norm {radius:g}, W mean {mean:g}")


ACTS = ("relu", "exp")


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(47)
    q, k = _sphere(rng, (3, 4)), _sphere(rng, (3, 5, 4))
    w, v = rng.normal(size=(6, 4, 4)) / 2, rng.normal(size=(6, 4, 2))
    nan_k, inf_q = k.copy(), q.copy()
    nan_k[1, 2, 0] = np.nan
    inf_q[2, 1] = np.inf
    cases = [
        (q, k, "plain"),
        (q, nan_k, "NaN in a key of query 1"),
        (inf_q, k, "inf in query 2"),
        (q, k[:, :1], "N = 1"),
        (q[:0], k[:0], "B = 0: empty output, zero gradient"),
        (np.zeros_like(q), k, "zero queries: every score 0 (relu features 0, exp features the key mean)"),
    ]
    return [Sample({"query": qq, "keys": kk, "weights": w, "values": v}, {"activation": act},
                   ("query", "keys", "weights", "values"), grad_out=upstream_grad(rng, (qq.shape[0], 2)), note=note)
            for act in ACTS for qq, kk, note in cases]


def _bad(description, error, match, q=(2, 3), k=(2, 4, 3), w=(5, 3, 3), v=(5, 3, 2), **kwargs):
    return BadInput(description, lambda: ({"query": np.ones(q), "keys": np.ones(k), "weights": np.ones(w),
                                           "values": np.ones(v)}, kwargs), error, match)


BAD_INPUTS = (
    _bad("no key tokens (N = 0)", ValueError, "keys", k=(2, 0, 3)),
    _bad("no heads (M = 0)", ValueError, "weights", w=(0, 3, 3), v=(0, 3, 2)),
    _bad("keys batch differs from query", ValueError, "keys", k=(3, 4, 3)),
    _bad("keys width differs from query", ValueError, "keys", k=(2, 4, 2)),
    _bad("non-square weights", ValueError, "weights", w=(5, 3, 2)),
    _bad("values head count differs", ValueError, "values", v=(4, 3, 2)),
    _bad("2-D values", ValueError, "values", v=(5, 3)),
    _bad("1-D query", ValueError, "query", q=(3,)),
    _bad("unknown activation", ValueError, "activation", activation="softmax"),
)


def _bench(b, n, d, m, out, activation="relu") -> BenchCase:
    """Regression with the paper's layer: B examples of one query and N keys on the unit sphere,
    M heads (the random-feature count), D outputs."""

    def build(rng, b, n, d, m, out):
        q = rng.standard_normal((b, d)).astype(np.float32)
        k = rng.standard_normal((b, n, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
        w = (rng.standard_normal((m, d, d)) / np.sqrt(d)).astype(np.float32)
        v = (rng.standard_normal((m, d, out)) / np.sqrt(m * d)).astype(np.float32)
        return {"query": q, "keys": k, "weights": w, "values": v}, {"activation": activation}

    return BenchCase(f"{activation} B={b} N={n} d={d} M={m} D={out}", lambda rng: build(rng, b, n, d, m, out),
                     ("query", "keys", "weights", "values"), smoke=lambda rng: build(rng, 2, 17, 8, 16, 1))


def _shape(arrays):
    b, n, d = np.shape(arrays["keys"])
    m, _, out = np.shape(arrays["values"])
    return b, n, d, m, out


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads query, keys (once per head tile), W and V, writes f and two fp32 (B, M, d)
    buffers (Q, the saved features) and re-reads them; backward reads the features and g, writes dV."""
    b, n, d, m, out = _shape(arrays)
    head_tiles = -(-m // 64)
    fwd = (b * d + head_tiles * b * n * d + m * d * d + m * d * out + b * out) * itemsize + 4 * 4 * b * m * d
    bwd = 4 * b * m * d + (b * out + m * d * out) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _flops(arrays: dict, direction: str) -> float:
    """Q = x0 W (2 B M d^2), scores and features (2 x 2 B M N d), f = Phi V (2 B M d D); backward
    dV = Phi^T g (2 B M d D). Nothing is recomputed; the eager baseline does the same products."""
    b, n, d, m, out = _shape(arrays)
    fwd = 2.0 * b * m * d * (d + 2 * n + out)
    bwd = 2.0 * b * m * d * out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _sums_keys(fn):
    """Sums over the keys instead of averaging them (drops 1/N)."""
    return lambda **kw: fn(**kw) * kw["keys"].shape[1]


def _averages_heads(fn):
    """Averages the heads (an extra 1/M)."""
    return lambda **kw: fn(**kw) / kw["weights"].shape[0]


def _transposed_weights(fn):
    """Scores x_i^T W_m x_0 instead of x_0^T W_m x_i (W used transposed)."""
    return lambda **kw: fn(**{**kw, "weights": kw["weights"].transpose(1, 2)})


RANDOM_FEATURE_ATTENTION = Spec(
    name=NAME,
    paper=47,
    family="layers",
    summary="Many-head attention with frozen random query–key matrices and trainable values (no softmax).",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("values",),
    tolerance=TOLERANCE,
    reduction_length=lambda s: int(np.shape(s.arrays["keys"])[1] + np.size(s.arrays["values"][..., 0])
                                   + np.shape(s.arrays["query"])[0]),
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(1024, 64, 64, 1024, 1), _bench(256, 512, 64, 512, 16), _bench(1024, 64, 64, 1024, 1, "exp")),
    bytes_moved=_bytes,
    flops=_flops,
    properties=("only values carries a gradient; query, keys and weights raise if they require one",
                "the (B, M, N) score tensor is never materialised"),
    wrong_ports={"sums the keys instead of averaging them": _sums_keys, "averages the heads": _averages_heads,
                 "uses W transposed": _transposed_weights},
)

register(RANDOM_FEATURE_ATTENTION)
