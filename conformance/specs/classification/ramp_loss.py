"""Spec of the ramp loss (P28, ``ramp_loss``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad

REF = "twinops.reference.classification.ramp_loss"

# Element counts around the 16-wide tiles the kernels use under the interpreter (1024+ on the GPU).
SIZES = {
    "ci": (1, 2, 3, 15, 16, 17, 33, 40),
    "dev": (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 100),
    "gpu": (1, 17, 1000, 2047, 2048, 2049, 100_000),
}
KAPPAS = (0.5, 1.0, 2.0, 3.0)
LABELS = ("pm1", "01", "mixed")  # {-1, +1}, {0, 1}, or all three values

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=("atol grows with sqrt(N) for the mean and sum: a reduction of N losses accumulated in fp32.",),
)


def _length(sample: Sample) -> int:
    return 1 if sample.kwargs["reduction"] == "none" else max(1, len(sample.arrays["scores"]))


def _labels(rng, mode: str, n: int) -> np.ndarray:
    y = rng.choice([-1, 1], size=n)
    if mode == "01":
        return np.where(y == 1, 1, 0).astype(np.int64)
    if mode == "mixed":
        return np.where((y == -1) & (rng.random(n) < 0.5), 0, y).astype(np.int64)
    return y.astype(np.int64)


@st.composite
def _samples(draw, profile: str, dtype: str):
    """Scores placed so that kappa y f covers the three pieces (1, linear, 0), with larger and tiny
    magnitudes mixed in; every label convention; every reduction; strided scores and labels."""
    rng = seed(draw)
    n = draw(st.sampled_from(SIZES[profile]))
    kappa = draw(st.sampled_from(KAPPAS) | st.floats(0.1, 10.0))
    mode = draw(st.sampled_from(LABELS))
    target = _labels(rng, mode, n)
    sign = np.where(target == 1, 1.0, -1.0)
    margins = rng.uniform(-0.6, 1.6, n)
    spread = draw(st.sampled_from(("ramp", "ramp", "wide")))
    if spread == "wide":
        margins = np.where(rng.random(n) < 0.5, rng.normal(size=n) * 30.0, rng.normal(size=n) * 1e-2)
    scores = margins / (kappa * sign)
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    layouts = {"scores": draw(st.sampled_from(("contiguous", "strided")))}
    if draw(st.booleans()):
        layouts["target"] = "strided"
    return Sample(
        arrays={"scores": scores, "target": target},
        kwargs={"kappa": kappa, "reduction": reduction},
        float_inputs=("scores",),
        layouts=layouts,
        grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
        note=f"labels={mode}, margins={spread}",
    )


def _examples() -> list[Sample]:
    """NaN and ±inf scores, scores exactly on both corners, and an empty batch."""
    rng = np.random.default_rng(0)
    out = []
    for reduction in ("mean", "sum", "none"):
        for kappa in (1.0, 2.0):
            scores = np.array([0.3, np.nan, np.inf, -np.inf, 0.0, 1.0 / kappa, -1.0 / kappa, -0.2])
            target = np.array([1, -1, 1, 1, 0, 1, -1, 0])
            grad = upstream_grad(rng, (len(scores),) if reduction == "none" else ())
            out.append(Sample({"scores": scores, "target": target}, {"kappa": kappa, "reduction": reduction},
                              ("scores",), grad_out=grad, note="NaN, +-inf, corners"))
            finite = scores[[0, 2, 3, 4, 5, 6, 7]]
            t = target[[0, 2, 3, 4, 5, 6, 7]]
            grad = upstream_grad(rng, (len(finite),) if reduction == "none" else ())
            out.append(Sample({"scores": finite, "target": t}, {"kappa": kappa, "reduction": reduction},
                              ("scores",), grad_out=grad, note="+-inf and corners"))
        out.append(Sample({"scores": np.zeros(0), "target": np.zeros(0, np.int64)}, {"reduction": reduction},
                          ("scores",), grad_out=upstream_grad(rng, (0,) if reduction == "none" else ()),
                          note="empty batch"))
    return out


def _fd_skip(sample: Sample) -> str | None:
    f, t = np.asarray(sample.arrays["scores"], np.float64), sample.arrays["target"]
    m = sample.kwargs.get("kappa", 1.0) * np.where(t == 1, 1.0, -1.0) * f
    with np.errstate(invalid="ignore"):
        near = np.isfinite(m) & ((np.abs(m) < 1e-4) | (np.abs(m - 1.0) < 1e-4))
    return "a score within 1e-4 of a corner of the ramp (no derivative there)" if near.any() else None


def _bad_inputs() -> tuple[BadInput, ...]:
    def call(scores=np.array([0.5, -0.5]), target=np.array([1, -1]), **kw):
        return lambda: ({"scores": scores, "target": target}, kw)

    return (
        BadInput("label 2", call(target=np.array([1, 2])), ValueError, "target", data_dependent=True),
        BadInput("label -2", call(target=np.array([-2, 1])), ValueError, "target", data_dependent=True),
        BadInput("2-D scores", call(scores=np.zeros((2, 1))), ValueError, "scores"),
        BadInput("float target", call(target=np.array([1.0, -1.0])), TypeError, "target"),
        BadInput("target length differs from N", call(target=np.array([1, -1, 1])), ValueError, "target"),
        BadInput("kappa = 0 (must be > 0)", call(kappa=0.0), ValueError, "kappa"),
        BadInput("kappa = -1 (must be > 0)", call(kappa=-1.0), ValueError, "kappa"),
        BadInput("kappa = inf (must be finite)", call(kappa=float("inf")), ValueError, "kappa"),
        BadInput("kappa given as a string", call(kappa="1"), TypeError, "kappa"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
    )


def _bench_inputs(n):
    def make(rng):
        return {"scores": rng.standard_normal(n, dtype=np.float32),
                "target": rng.choice(np.array([-1, 1]), size=n)}, {}

    return make


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the scores and the int64 labels (the mean/sum write one float per 2048
    elements); backward reads both again and writes the gradient."""
    n = len(arrays["scores"])
    fwd, bwd = n * (itemsize + 8), n * (2 * itemsize + 8)
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _zeros_are_positive(target, kw):
    """Labels in {0, 1} read as if 0 were a positive (a port that only knows the +-1 convention
    and tests ``target >= 0``)."""
    import torch

    return torch.where(target == 0, 1, target)


def _sum_for_mean(fn):
    def port(*, reduction="mean", **kw):
        return fn(reduction="sum" if reduction == "mean" else reduction, **kw)

    return port


RAMP = Spec(
    name="ramp_loss",
    paper=28,
    family="classification",
    summary="Ramp loss min(1, max(0, 1 - kappa y f)): the hinge clipped at 1, a bounded surrogate of the 0-1 loss.",
    reference=f"{REF}:ramp_loss",
    reference_grad=f"{REF}:ramp_loss_grad",
    accelerated="twinops.accelerated.classification.ramp_loss:ramp_loss",
    baseline="twinops.conformance.baselines.classification.ramp_loss:ramp_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("scores",),
    tolerance=TOLERANCE,
    reduction_length=_length,
    bad_inputs=_bad_inputs(),
    bench_cases=(BenchCase("1M scores (N = 1048576)", _bench_inputs(1 << 20), ("scores",), smoke=_bench_inputs(40)),),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=("Labels 0 and -1 both denote the negative class.",
                "Gradient 0 at both corners of the ramp (kappa y f = 0 and = 1)."),
    wrong_ports={
        "label 0 read as positive": wrong_ports.replaces_argument("target", _zeros_are_positive),
        "kappa ignored": wrong_ports.replaces_argument("kappa", lambda kappa, kw: 1.0),
        "sum instead of mean": _sum_for_mean,
    },
)

register(RAMP)
