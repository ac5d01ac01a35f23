"""Spec of nested dropout (P62): keep a per-row prefix of the features, zero the rest."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import DEFAULT_TOLERANCE, BadInput, BenchCase, Sample, Spec
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad
from ...wrong_ports import replaces_argument

NAME = "nested_dropout"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"


def _cutoffs(draw, rng, n: int, d: int) -> np.ndarray:
    mode = draw(st.sampled_from(("one per batch", "per row", "per row", "extremes")))
    if mode == "one per batch":  # the authors' draw: one k shared by every row
        return np.full(n, int(rng.integers(0, d + 1)), dtype=np.int64)
    if mode == "extremes":
        return rng.choice(np.array([0, d, min(1, d), max(d - 1, 0)]), size=n).astype(np.int64)
    return rng.integers(0, d + 1, size=n).astype(np.int64)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    x = rng.normal(size=(n, d)) * draw(st.sampled_from((1e-3, 1.0, 30.0)))
    k = _cutoffs(draw, rng, n, d)
    poisoned = draw(st.booleans())
    if poisoned:  # entries past the cut-off must never be read
        x[np.arange(d)[None, :] >= k[:, None]] = np.nan
    training = draw(st.sampled_from((True, True, True, False)))
    if not training and poisoned:
        x = np.nan_to_num(x, nan=0.5)
    if draw(st.booleans()):
        k = k.astype(np.int32)
    layouts = {"x": draw(st.sampled_from(LAYOUTS)), "k": draw(st.sampled_from(("contiguous", "strided")))}
    return Sample(arrays={"x": x, "k": k}, kwargs={"training": training}, float_inputs=("x",), layouts=layouts,
                  grad_out=upstream_grad(rng, (n, d)), note=f"k dtype={k.dtype}, poisoned={poisoned}")


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(62)
    x = rng.normal(size=(4, 6))
    k = np.array([0, 6, 3, 1])
    nan_in, inf_in = x.copy(), x.copy()
    nan_in[2, 1] = np.nan
    inf_in[3, 0] = -np.inf
    cases = [
        (x, k, True, "k = 0 zeroes a row, k = D keeps it whole"),
        (nan_in, k, True, "NaN inside a prefix propagates"),
        (np.where(np.arange(6)[None, :] >= k[:, None], np.inf, x), k, True, "inf past the cut-off is never read"),
        (inf_in, k, True, "-inf inside a prefix propagates"),
        (x, k, False, "evaluation mode: identity"),
        (x[:0], k[:0], True, "N = 0"),
        (x[:, :0], np.zeros(4, dtype=np.int64), True, "D = 0"),
    ]
    return [Sample({"x": a, "k": kk}, {"training": tr}, ("x",), grad_out=upstream_grad(rng, a.shape), note=note)
            for a, kk, tr, note in cases]


def _bad(description, error, match, x=(3, 4), k=(2, 4, 0), data_dependent=False, **kwargs):
    return BadInput(description, lambda: ({"x": np.ones(x), "k": np.asarray(k)}, kwargs), error, match,
                    data_dependent=data_dependent)


BAD_INPUTS = (
    _bad("1-D x", ValueError, "x", x=(4,)),
    _bad("k of the wrong length", ValueError, "k", k=(1, 2)),
    _bad("float k", TypeError, "k", k=(1.0, 2.0, 3.0)),
    _bad("training not a bool", TypeError, "training", training="yes"),
    _bad("k above D", ValueError, "k", k=(1, 5, 2), data_dependent=True),
    _bad("negative k", ValueError, "k", k=(1, -1, 2), data_dependent=True),
)


def _bench(n: int, d: int) -> BenchCase:
    """Per-row cut-offs uniform in [1, D] (int64)."""

    def build(rng, n, d):
        return {"x": rng.standard_normal((n, d), dtype=np.float32), "k": rng.integers(1, d + 1, size=n)}, {}

    return BenchCase(f"N={n} D={d}, k uniform", lambda rng: build(rng, n, d), ("x",),
                     smoke=lambda rng: build(rng, 4, 16))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the kept prefix of x (never the rest) and k, and writes all of y; backward the
    same with the upstream gradient in place of x."""
    n, d = np.shape(arrays["x"])
    k = np.clip(np.asarray(arrays["k"]), 0, d)
    one = float(k.sum()) * itemsize + n * d * itemsize + n * np.asarray(arrays["k"]).itemsize
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[direction]


def _rescales(fn):
    """The inverted-dropout habit: the kept prefix scaled by D / k."""

    def port(**kw):
        out = fn(**kw)
        d = kw["x"].shape[1]
        return out * (d / kw["k"].clamp(min=1).to(out.dtype))[:, None]

    return port


NESTED_DROPOUT = Spec(
    name=NAME,
    paper=62,
    family="layers",
    summary="Nested dropout: each row keeps its first k_i features (k an explicit input), the rest is zero.",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("x",),
    tolerance=DEFAULT_TOLERANCE,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(16384, 2048),),
    bytes_moved=_bytes,
    properties=("entries past the cut-off are exact zeros, in the output and the gradient",
                "NaN past the cut-off never reaches the output",
                "training=False is the identity"),
    wrong_ports={
        "keeps one feature too many (j <= k)":
            replaces_argument("k", lambda k, kw: (k + 1).clamp(max=kw["x"].shape[1])),
        "rescales the kept prefix by D / k": _rescales,
    },
)

register(NESTED_DROPOUT)
