"""Spec of the SNNK linear layer (P44): random-feature map (ReLU or URF/exp) then trainable weights."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad
from ...wrong_ports import replaces_argument

NAME = "snnk_linear"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"

FEATURE_COUNTS = {"ci": (1, 2, 15, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 31, 32, 33, 64),
                  "gpu": (1, 63, 64, 65, 128, 257)}
OUT_DIMS = {"ci": (1, 3, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 33, 64), "gpu": (1, 17, 127, 128, 129, 300)}
LAYOUTS_3D = ("contiguous", "strided", "row_strided")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 2e-6, "float16": 3e-4, "bfloat16": 3e-3},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(d + m + o + N): an output is a sum over m features of sums over d; the "
        "weight gradient sums over the N rows, the x gradient over o outputs then m features.",
        "atol scales with the row's largest entry: outputs and gradients are sums of terms of both "
        "signs (random projections), and exp features span a wide range (up to e^10 at |x| <= 2).",
        "fp32 atol 2e-6 (default 1e-6): the features pass through two fp32 tl.dot reductions.",
        "16-bit atol 3e-4 / 3e-3: the features (forward) and the x-gradient coefficients (backward) "
        "are rounded to the input dtype before the second matmul, as the eager baseline rounds its "
        "feature and gradient matrices; outputs also pass when no worse than 2x the eager PyTorch "
        "baseline + atol.",
    ),
)


def _rows(draw, rng, profile):
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    if draw(st.integers(0, 3)) == 0:  # (B, S, d) input
        b = draw(st.sampled_from((1, 2, 3)))
        return (b, max(1, n // b)), True
    return (n,), False


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    lead, three_d = _rows(draw, rng, profile)
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    m = draw(st.sampled_from(FEATURE_COUNTS[profile]))
    o = draw(st.sampled_from(OUT_DIMS[profile]))
    feature = draw(st.sampled_from(("relu", "exp")))
    arrays = {"projection": rng.normal(size=(m, d))}
    if feature == "relu":
        scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
        x = rng.normal(size=lead + (d,)) * scale
        floor = draw(st.sampled_from((0.0, 0.0, -0.3, 0.2))) * scale * math.sqrt(d)
        note = f"scale={scale:g}"
    else:
        x = rng.normal(size=lead + (d,))
        radius = rng.uniform(0.0, 2.0, size=lead + (1,))  # ||x|| <= 2 keeps the exponent below ~10
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * radius
        floor = 0.0
        if draw(st.booleans()):
            arrays["rate"] = rng.uniform(0.2, 1.2, size=m)
        if draw(st.booleans()):
            arrays["amplitude"] = rng.uniform(0.5, 2.0, size=m)
        note = "||x|| <= 2"
    arrays["x"] = x
    arrays["weight"] = rng.normal(size=(o, m)) / math.sqrt(m)
    arrays["bias"] = rng.normal(size=(o,))
    layouts = {"x": draw(st.sampled_from(LAYOUTS_3D if three_d else LAYOUTS)),
               "projection": draw(st.sampled_from(LAYOUTS)), "weight": draw(st.sampled_from(LAYOUTS))}
    return Sample(
        arrays=arrays,
        kwargs={"feature": feature, "floor": floor},
        float_inputs=tuple(arrays),
        layouts=layouts,
        grad_out=upstream_grad(rng, lead + (o,)),
        note=note,
    )


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(44)
    g, w, b = rng.normal(size=(17, 5)), rng.normal(size=(3, 17)) / 4, rng.normal(size=3)
    x = rng.normal(size=(6, 5)) * 0.4
    nan_x, inf_x, zero_x = x.copy(), x.copy(), x.copy()
    nan_x[1, 2] = np.nan
    inf_x[3, 0] = np.inf
    zero_x[2] = 0.0
    out = []
    for feature in ("relu", "exp"):
        for xs, note in ((nan_x, "NaN in row 1"), (inf_x, "inf in row 3"),
                         (zero_x, "a zero row: pre-activations exactly at the ReLU floor, subgradient 0"),
                         (x[:0], "N = 0: empty output, zero weight gradient"),
                         (x[:1], "one row")):
            out.append(Sample({"x": xs, "projection": g, "weight": w, "bias": b}, {"feature": feature, "floor": 0.0},
                              ("x", "projection", "weight", "bias"), grad_out=upstream_grad(rng, (xs.shape[0], 3)),
                              note=note))
    return out


def _bad(description, error, match, x=(4, 3), g=(5, 3), w=(2, 5), b=(2,), extra=None, **kwargs):
    def make():
        arrays = {"x": np.ones(x), "projection": np.ones(g), "weight": np.ones(w)}
        if b is not None:
            arrays["bias"] = np.ones(b)
        for k, shape in (extra or {}).items():
            arrays[k] = np.ones(shape)
        return arrays, kwargs

    return BadInput(description, make, error, match)


BAD_INPUTS = (
    _bad("no random features (m = 0)", ValueError, "projection", g=(0, 3), w=(2, 0)),
    _bad("projection width differs from x", ValueError, "projection", g=(5, 4)),
    _bad("weight of the wrong shape", ValueError, "weight", w=(2, 4)),
    _bad("1-D weight", ValueError, "weight", w=(5,)),
    _bad("bias of the wrong shape", ValueError, "bias", b=(3,)),
    _bad("1-D x", ValueError, "x", x=(3,)),
    _bad("rate of the wrong shape", ValueError, "rate", extra={"rate": (4,)}, feature="exp"),
    _bad("amplitude of the wrong shape", ValueError, "amplitude", extra={"amplitude": (5, 1)}, feature="exp"),
    _bad("rate with feature='relu'", ValueError, "rate", extra={"rate": (5,)}),
    _bad("unknown feature", ValueError, "feature", feature="sigmoid"),
    _bad("non-finite floor", ValueError, "floor", floor=float("inf")),
)


def _bench(n: int, d: int, m: int, o: int, feature: str) -> BenchCase:
    """Token rows of a transformer block (N = batch x sequence) through an SNNK replacement of a
    d -> o linear layer with m random features."""

    def build(rng, n, d, m, o):
        x = rng.standard_normal((n, d), dtype=np.float32) / np.float32(d ** 0.5)  # ||x|| ~ 1
        return ({"x": x, "projection": rng.standard_normal((m, d), dtype=np.float32),
                 "weight": rng.standard_normal((o, m), dtype=np.float32) / np.float32(m ** 0.5),
                 "bias": rng.standard_normal(o, dtype=np.float32)}, {"feature": feature})

    return BenchCase(f"{feature} N={n} d={d} m={m} o={o}", lambda rng: build(rng, n, d, m, o),
                     ("x", "projection", "weight", "bias"), smoke=lambda rng: build(rng, 4, 8, 16, 8))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x, G, Psi and writes y (the feature matrix stays on chip). Backward reads x, G,
    Psi, dY, writes and re-reads the two (N, m) matrices (features, x-gradient coefficients), writes
    dx and dPsi."""
    n, d = np.shape(arrays["x"])
    m, o = np.shape(arrays["projection"])[0], np.shape(arrays["weight"])[0]
    fwd = (n * d + m * d + o * m + n * o) * itemsize
    bwd = (2 * n * d + m * d + 2 * o * m + n * o + 4 * n * m) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _flops(arrays: dict, direction: str) -> float:
    """Model FLOPs of the two matmuls, 2Nm(d + o) forward and twice that backward (dx and dPsi).
    Convention: recomputation is not counted (the kernel recomputes x G^T once per BLOCK_O output
    tile forward and once backward; the eager baseline saves it)."""
    n, d = np.shape(arrays["x"])
    m, o = np.shape(arrays["projection"])[0], np.shape(arrays["weight"])[0]
    one = 2.0 * n * m * (d + o)
    return {"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[direction]


def _fd_skip(sample: Sample) -> str | None:
    """Central differences straddle the ReLU kink when a pre-activation lies within a step of the floor."""
    if sample.kwargs["feature"] != "relu":
        return None
    x = np.asarray(sample.arrays["x"], dtype=np.float64)
    s = x.reshape(-1, x.shape[-1]) @ np.asarray(sample.arrays["projection"], dtype=np.float64).T
    with np.errstate(invalid="ignore"):
        if np.any(np.abs(s - sample.kwargs["floor"]) < 1e-4):
            return ("finite differences skip ReLU samples with a pre-activation within 1e-4 of the floor "
                    "(the kink); the subgradient there, 0, is pinned by a reference test")
    return None


def _drops_norm_term(fn):
    """The exp map without the -a^2 ||x||^2 / 2 term of its exponent (plain exp(a g.x) features)."""
    import torch

    def port(**kw):
        if kw.get("feature") != "exp":
            return fn(**kw)
        x, g, w = kw["x"], kw["projection"], kw["weight"]
        m = g.shape[0]
        a = kw["rate"].to(x.dtype) if kw.get("rate") is not None else 1.0
        amp = kw["amplitude"].to(x.dtype) if kw.get("amplitude") is not None else 1.0
        y = amp / math.sqrt(m) * torch.exp(a * (x @ g.T)) @ w.T
        return y + kw["bias"] if kw.get("bias") is not None else y

    return port


SNNK_LINEAR = Spec(
    name=NAME,
    paper=44,
    family="layers",
    summary="Random-feature (ReLU or URF/exp) map of the input fused with trainable feature-space weights.",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("x", "weight", "bias"),
    tolerance=TOLERANCE,
    reduction_length=lambda s: int(np.shape(s.arrays["x"])[-1] + np.shape(s.arrays["projection"])[0]
                                   + np.shape(s.arrays["weight"])[0] + np.size(s.arrays["x"][..., 0])),
    bad_inputs=BAD_INPUTS,
    fd_skip=_fd_skip,
    bench_cases=(_bench(8192, 768, 256, 768, "relu"), _bench(8192, 768, 256, 768, "exp"),
                 _bench(8192, 768, 256, 64, "relu")),
    bytes_moved=_bytes,
    flops=_flops,
    properties=("projection, rate and amplitude are frozen: no gradient, an error if they require one",
                "the (N, m) feature matrix is never written in the forward"),
    wrong_ports={
        "ignores the ReLU floor": replaces_argument("floor", lambda v, kw: 0.0),
        "exp map without the -a^2 |x|^2 / 2 term": _drops_norm_term,
        "ignores the URF amplitudes": replaces_argument("amplitude", lambda v, kw: None),
    },
)

register(SNNK_LINEAR)
