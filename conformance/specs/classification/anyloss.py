"""Spec of AnyLoss (P6, ``anyloss``): F-beta, G-mean, balanced accuracy and accuracy losses of a
soft confusion matrix, over (N,) or (N, K) probabilities."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

REF = "twinops.reference.classification.anyloss"
ACC = "twinops.accelerated.classification.anyloss"
BASE = "twinops.conformance.baselines.classification.anyloss"

METRICS = ("f_beta", "g_mean", "balanced_accuracy", "accuracy")

# Rows and columns around the 16 x 16 tiles the kernels use under the interpreter (the gpu profile
# adds the 4096-element tiles of the compiled kernels). No row count equals FIXED_BATCH.
ROWS = {"ci": (1, 2, 3, 15, 16, 17, 33, 40), "dev": (1, 2, 3, 7, 15, 16, 17, 31, 33, 48, 100),
        "gpu": (1, 17, 255, 4095, 4096, 4097, 70001)}
COLUMNS = {"ci": (1, 2, 3, 17), "dev": (1, 2, 5, 16, 17, 33), "gpu": (1, 3, 33, 100)}
MAX_ELEMENTS = {"ci": 300, "dev": 2_000, "gpu": 2_000_000}  # finite differences visit every entry
PROB_MODES = ("uniform", "near one half", "confident", "outside [0, 1]", "tied")
TARGET_MODES = ("balanced", "rare positives", "all negative", "all positive", "agrees with probs")
FIXED_BATCH = 32

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with sqrt(N): the loss and every gradient entry depend on sums over the N rows of a "
        "column, accumulated in fp32.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the loss and "
        "gradient are rounded to the input dtype (the kernels compute in fp32).",
    ),
)


def _rows(sample: Sample) -> int:
    return int(np.shape(sample.arrays["probs"])[0])


def _probs(rng, mode: str, shape: tuple, amplifier: float) -> np.ndarray:
    if mode == "uniform":
        return rng.uniform(0.0, 1.0, shape)
    if mode == "near one half":  # where the gradient is largest: |p - 1/2| ~ 1/L
        return 0.5 + rng.normal(size=shape) * 2.0 / amplifier
    if mode == "confident":
        return np.where(rng.random(shape) < 0.5, rng.uniform(0.0, 0.1, shape), rng.uniform(0.9, 1.0, shape))
    if mode == "outside [0, 1]":
        return rng.uniform(-0.5, 1.5, shape)
    return rng.choice([0.25, 0.5, 0.75], size=shape)  # tied values, exact in every dtype


def _targets(rng, mode: str, probs: np.ndarray) -> np.ndarray:
    shape = probs.shape
    if mode == "balanced":
        y = rng.random(shape) < 0.5
    elif mode == "rare positives":
        y = rng.random(shape) < 0.1
    elif mode == "all negative":
        y = np.zeros(shape, bool)
    elif mode == "all positive":
        y = np.ones(shape, bool)
    else:
        y = rng.random(shape) < np.clip(probs, 0.05, 0.95)
    return y


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(ROWS[profile]))
    k = draw(st.sampled_from((None,) + COLUMNS[profile]))  # None: 1-D probs
    if k is not None and n * k > MAX_ELEMENTS[profile]:
        k = max(1, MAX_ELEMENTS[profile] // n)
    shape = (n,) if k is None else (n, k)
    metric = draw(st.sampled_from(METRICS))
    amplifier = draw(st.sampled_from((73.0, 2.0, 10.0, 30.0)) | st.floats(1.0, 100.0))
    kwargs = {
        "metric": metric,
        "beta": draw(st.sampled_from((1.0, 0.5, 2.0, 0.0)) | st.floats(0.0, 3.0)),
        "amplifier": amplifier,
        "smoothing": draw(st.sampled_from((1e-5, 1e-3, 0.1))),
        "reduction": draw(st.sampled_from(("mean", "sum", "none"))),
    }
    prob_mode = draw(st.sampled_from(PROB_MODES))
    target_mode = draw(st.sampled_from(TARGET_MODES))
    probs = _probs(rng, prob_mode, shape, amplifier)
    y = _targets(rng, target_mode, probs)
    target_kind = draw(st.sampled_from(("int64", "bool", "float")))
    target = y.astype(np.int64) if target_kind == "int64" else (y if target_kind == "bool" else y.astype(np.float64))
    layouts = {"probs": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["target"] = draw(st.sampled_from(("strided", "row_strided", "transposed")))
    grad_shape = (k,) if kwargs["reduction"] == "none" and k is not None else ()
    return Sample(
        arrays={"probs": probs, "target": target},
        kwargs=kwargs,
        float_inputs=("probs", "target") if target_kind == "float" else ("probs",),
        layouts=layouts,
        grad_out=upstream_grad(rng, grad_shape),
        note=f"probs={prob_mode}, targets={target_mode} ({target_kind})",
    )


def _examples() -> list[Sample]:
    """Fixed cases: single-class batches for every metric, NaN and infinite probabilities, one row,
    probabilities exactly 1/2, no smoothing, and a multilabel batch with a single-class column."""
    rng = np.random.default_rng(6)
    p = rng.uniform(0.0, 1.0, 9)
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0])
    nan_p, inf_p = p.copy(), p.copy()
    nan_p[4] = np.nan
    inf_p[1], inf_p[3] = np.inf, -np.inf
    p2 = rng.uniform(0.0, 1.0, (20, 17))
    y2 = (rng.random((20, 17)) < 0.4).astype(np.int64)
    y2[:, 3], y2[:, 16] = 0, 1  # column 3 all negative, column 16 all positive
    nan_p2 = p2.copy()
    nan_p2[7, 5] = np.nan
    out = []

    def add(probs, target, note, reduction="mean", **kw):
        kwargs = {"metric": "f_beta", "beta": 1.0, "amplifier": 73.0, "smoothing": 1e-5, "reduction": reduction}
        kwargs.update(kw)
        k = None if np.ndim(probs) == 1 else np.shape(probs)[1]
        grad = upstream_grad(rng, (k,) if reduction == "none" and k is not None else ())
        out.append(Sample({"probs": probs, "target": np.asarray(target)}, kwargs, ("probs",), grad_out=grad, note=note))

    for metric in ("f_beta", "g_mean", "balanced_accuracy"):
        add(p, np.zeros(9, np.int64), "all negative (Y1 = 0)", metric=metric)
    for metric in ("g_mean", "balanced_accuracy", "accuracy"):
        add(p, np.ones(9, np.int64), "all positive (Y0 = 0)", metric=metric, reduction="sum")
    add(nan_p, y, "NaN probability", metric="g_mean")
    add(nan_p, y, "NaN probability (the gradient of accuracy does not involve the sums)", metric="accuracy")
    add(inf_p, y, "+inf and -inf probabilities", metric="f_beta")
    add(inf_p, y, "+inf and -inf probabilities", metric="balanced_accuracy", reduction="none")
    add(p2, y2, "multilabel, single-class columns", metric="g_mean", reduction="none")
    add(p2, y2, "multilabel, single-class columns", metric="balanced_accuracy", reduction="mean")
    add(nan_p2, y2, "multilabel, NaN in column 5", reduction="none", metric="g_mean")
    add(np.array([0.3]), np.array([1]), "one row", metric="g_mean")
    add(np.array([0.7]), np.array([0]), "one row", metric="accuracy", amplifier=5.0)
    add(np.full(9, 0.5), y, "every probability 1/2", metric="balanced_accuracy", amplifier=100.0)
    add(p, y, "no smoothing", metric="f_beta", smoothing=0.0, beta=2.0)
    add(p, y, "beta = 0 (soft precision)", metric="f_beta", beta=0.0)
    return out


def _bad_inputs() -> tuple[BadInput, ...]:
    p, y = np.array([0.2, 0.9, 0.6]), np.array([0, 1, 1])

    def call(probs=p, target=y, **kw):
        return lambda: ({"probs": probs, "target": target}, kw)

    return (
        BadInput("target 2", call(target=np.array([0, 2, 1])), ValueError, "target", data_dependent=True),
        BadInput("target 0.5", call(target=np.array([0.0, 0.5, 1.0])), ValueError, "target", data_dependent=True),
        BadInput("integer probs", call(probs=np.array([0, 1, 1])), TypeError, "probs"),
        BadInput("3-D probs", call(probs=np.zeros((3, 1, 1)), target=np.zeros((3, 1, 1), np.int64)), ValueError,
                 "probs"),
        BadInput("empty batch (N = 0)", call(probs=np.zeros(0), target=np.zeros(0, np.int64)), ValueError, "probs"),
        BadInput("no columns (K = 0)", call(probs=np.zeros((3, 0)), target=np.zeros((3, 0), np.int64)),
                 ValueError, "probs"),
        BadInput("target shape differs from probs", call(target=np.array([0, 1])), ValueError, "target"),
        BadInput("unknown metric", call(metric="f1"), ValueError, "metric"),
        BadInput("beta = -1 (must be >= 0)", call(beta=-1.0), ValueError, "beta"),
        BadInput("amplifier = 0 (must be > 0)", call(amplifier=0.0), ValueError, "amplifier"),
        BadInput("amplifier = inf (must be finite)", call(amplifier=float("inf")), ValueError, "amplifier"),
        BadInput("smoothing = -1e-5 (must be >= 0)", call(smoothing=-1e-5), ValueError, "smoothing"),
        BadInput("beta given as a string", call(beta="1"), TypeError, "beta"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
    )


BENCH_N = 16 * 512 * 512


def _bench_inputs(n: int):
    def make(rng):
        probs = rng.random(n, dtype=np.float32)
        target = (rng.random(n, dtype=np.float32) < probs).astype(np.float32)
        return {"probs": probs, "target": target}, {}

    return make


BENCH = BenchCase(f"16x512x512 pixels (N = {BENCH_N:,}), binary mask, F1", _bench_inputs(BENCH_N),
                  ("probs", "target"), smoke=_bench_inputs(40))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads probabilities and targets once; backward reads both again and writes the
    gradient (targets are in the probabilities' dtype in the benchmark)."""
    n = np.size(arrays["probs"])
    return float({"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction] * n * itemsize)


def _fixed_batch(fn):
    """The authors' Keras code: N is a global batch constant, wrong on any other batch size."""
    from twinops.conformance.baselines.classification.anyloss import _anyloss

    return lambda **kw: _anyloss(**kw, batch=FIXED_BATCH)


def _no_amplifier(fn):
    """a = sigmoid(p - 1/2): the approximation without its amplifying scale L."""
    return lambda **kw: fn(**{**kw, "amplifier": 1.0})


def _pooled_columns(fn):
    """Multilabel input scored as one binary task over all N K entries (one confusion matrix)."""

    def port(*, probs, target, reduction="mean", **kw):
        if probs.ndim == 1:
            return fn(probs=probs, target=target, reduction=reduction, **kw)
        loss = fn(probs=probs.reshape(-1), target=target.reshape(-1), reduction=reduction, **kw)
        return loss.expand(probs.shape[1]) if reduction == "none" else (
            loss * probs.shape[1] if reduction == "sum" else loss)

    return port


ANYLOSS = Spec(
    name="anyloss",
    paper=6,
    family="classification",
    summary="AnyLoss: 1 - (F-beta, G-mean², balanced accuracy or accuracy) of a soft confusion matrix "
            "built with an amplified sigmoid, one fused reduction per column.",
    reference=f"{REF}:anyloss",
    reference_grad=f"{REF}:anyloss_grad",
    accelerated=f"{ACC}:anyloss",
    baseline=f"{BASE}:anyloss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("probs",),
    tolerance=TOLERANCE,
    reduction_length=_rows,
    bad_inputs=_bad_inputs(),
    bench_cases=(BENCH,),
    bytes_moved=_bytes,
    properties=(
        "metric='f_beta', beta=1 is 1 - soft Dice of a (tested as an independent anchor).",
        "N is the batch's own row count (the authors' code uses a global batch constant).",
        "The kernels' forward is deterministic: block partial sums, then a fixed-order combine, no atomics.",
    ),
    wrong_ports={
        "uses a fixed batch size": _fixed_batch,
        "sigmoid without the amplifier": _no_amplifier,
        "one confusion matrix over all columns": _pooled_columns,
    },
)

register(ANYLOSS)
