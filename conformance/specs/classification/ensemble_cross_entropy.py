"""Spec of the ensemble cross-entropy (P24, ``ensemble_cross_entropy``): stacked (K, N, V) member
logits, logit-mean or probability-mean combination."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec
from ...strategies import BATCH_SIZES, CLASS_COUNTS, EXTREME_SCALE, LOGIT_SCALES, seed, upstream_grad
from ._rowloss import ACC, BASE, REF, ROW_LOSS_TOLERANCE, ROW_LOSS_WRONG_PORTS

MODULE = "ensemble_cross_entropy"
MODES = ("logit_mean", "prob_mean")

# Members: one (plain cross-entropy), even and odd counts.
MEMBERS = {"ci": (1, 2, 3, 5), "dev": (1, 2, 3, 4, 5, 8), "gpu": (1, 2, 4, 5, 8)}
TEMPERATURES = (0.5, 1.0, 2.0)
# 3-D layouts the converter can present: "strided" spaces the classes, "row_strided" the members.
LOGIT_LAYOUTS = ("contiguous", "strided", "row_strided")
MAX_ELEMENTS = 1 << 21  # K * N * V cap for the float64 reference on the gpu profile's vocabulary-sized rows


@st.composite
def _samples(draw, profile: str, dtype: str):
    """Member logits that are identical, close (a shared part plus small member noise, as for members
    of one training recipe) or independent; every mode, temperature, reduction and mask pattern."""
    rng = seed(draw)
    k = draw(st.sampled_from(MEMBERS[profile]))
    n = draw(st.sampled_from(BATCH_SIZES[profile]))
    v = draw(st.sampled_from(CLASS_COUNTS[profile]))
    n = max(1, min(n, MAX_ELEMENTS // (k * v)))
    scale = draw(st.sampled_from(LOGIT_SCALES + ((EXTREME_SCALE,) if dtype == "float32" else ())))
    spread = draw(st.sampled_from(("identical", "close", "independent")))
    offset = rng.normal() * scale
    if spread == "independent":
        logits = rng.normal(size=(k, n, v)) * scale + offset
    else:
        shared = rng.normal(size=(n, v)) * scale + offset
        noise = 0.0 if spread == "identical" else 0.2 * scale
        logits = shared[None] + noise * rng.normal(size=(k, n, v))
    ignore_index = draw(st.sampled_from((-100, -1)))
    mask_mode = draw(st.sampled_from(("none", "some", "some", "all")))
    target = rng.integers(0, v, size=n)
    if mask_mode == "some":
        target = np.where(rng.random(n) < 0.3, ignore_index, target)
    elif mask_mode == "all":
        target = np.full(n, ignore_index)
    kwargs = {
        "mode": draw(st.sampled_from(MODES)),
        "temperature": draw(st.sampled_from(TEMPERATURES) | st.floats(0.25, 4.0)),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(("mean", "sum", "none"))),
    }
    layouts = {"logits": draw(st.sampled_from(LOGIT_LAYOUTS))}
    if draw(st.booleans()):
        layouts["target"] = "strided"
    return Sample(
        arrays={"logits": logits, "target": target.astype(np.int64)},
        kwargs=kwargs,
        float_inputs=("logits",),
        layouts=layouts,
        grad_out=upstream_grad(rng, (n,) if kwargs["reduction"] == "none" else ()),
        note=f"K={k}, scale={scale:g}, members={spread}, masked={mask_mode}",
    )


def _edge_cases() -> list[Sample]:
    """NaN, ±inf and probability-zero targets (in one member, in every member) in both modes; an
    all-ignored batch, a NaN in an ignored token, constant rows, one class and an empty batch once
    (alternating modes). K = 1 and identical members come from the strategy. Reductions rotate over the cases."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 3, 5)) * 2.0
    nan, ninf, pinf, zero_one, zero_all = (z.copy() for _ in range(5))
    nan[1, 1, 2] = np.nan
    ninf[:, :, 3] = -np.inf
    pinf[2, 2, 1] = np.inf
    zero_one[0, 1, 1] = -np.inf
    zero_all[:, 1, 1] = -np.inf
    both_modes = (
        (nan, [0, 1, 4], "NaN in member 1, token 1"),
        (ninf, [0, 1, 2], "a -inf (masked-out) class in every member"),
        (pinf, [0, 1, 2], "+inf in member 2, token 2"),
        (zero_one, [0, 1, 2], "target logit -inf in one member"),
        (zero_all, [0, 1, 2], "target logit -inf in every member"),
    )
    once = (
        (z, [-100, -100, -100], "all tokens ignored"),
        (nan, [0, -100, 4], "NaN in an ignored token"),
        (np.full((2, 3, 5), 2.5), [0, 3, 4], "constant rows"),
        (rng.normal(size=(3, 3, 1)), [0, 0, -100], "one class"),
        (np.zeros((2, 0, 5)), np.zeros(0, dtype=np.int64), "empty batch"),
    )
    reductions = ("none", "mean", "sum")
    calls = [(case, mode, reductions[i % 3]) for i, case in enumerate(both_modes) for mode in MODES]
    calls += [(case, MODES[i % 2], reductions[(i + 1) % 3]) for i, case in enumerate(once)]
    out = []
    for (logits, target, note), mode, reduction in calls:
        n = np.shape(logits)[1]
        kw = {"mode": mode, "temperature": 0.7, "ignore_index": -100, "reduction": reduction}
        out.append(Sample({"logits": logits, "target": np.asarray(target, dtype=np.int64)}, kw,
                          ("logits",), grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
                          note=f"{note}, {mode}"))
    return out


TOLERANCE = replace(ROW_LOSS_TOLERANCE, reasons=tuple(ROW_LOSS_TOLERANCE.reasons) + (
    "The reduction length is V, not K x V: logit_mean sums the members in fp64, and prob_mean's "
    "log-sum-exp over the K members adds K roundings of O(1) values, far below those of its class sums.",
))


def _row_length(sample: Sample) -> int:
    return int(np.shape(sample.arrays["logits"])[2])


def _bad_inputs() -> tuple[BadInput, ...]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3))

    def call(target=np.array([0, 2]), lg=logits, **kw):
        return lambda: ({"logits": lg, "target": target}, kw)

    return (
        BadInput("label >= V", call(np.array([0, 3])), ValueError, "target", data_dependent=True),
        BadInput("negative label other than ignore_index", call(np.array([-5, 0])), ValueError, "target",
                 data_dependent=True),
        BadInput("2-D logits (members not stacked)", call(lg=logits[0]), ValueError, "logits"),
        BadInput("no members (K = 0)", call(lg=np.zeros((0, 2, 3))), ValueError, "logits"),
        BadInput("no classes (V = 0)", call(lg=np.zeros((2, 2, 0))), ValueError, "logits"),
        BadInput("float target", call(np.array([0.0, 1.0])), TypeError, "target"),
        BadInput("target length differs from N", call(np.array([0, 1, 2])), ValueError, "target"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
        BadInput("unknown mode", call(mode="geometric"), ValueError, "mode"),
        BadInput("temperature = 0 (must be > 0)", call(temperature=0.0), ValueError, "temperature"),
        BadInput("temperature = -1 (must be > 0)", call(temperature=-1.0), ValueError, "temperature"),
        BadInput("temperature = inf", call(temperature=float("inf")), ValueError, "temperature"),
        BadInput("temperature is a string", call(temperature="1"), TypeError, "temperature"),
        BadInput("ignore_index is a float", call(ignore_index=-100.0), TypeError, "ignore_index"),
    )


def _bench_cases() -> tuple[BenchCase, ...]:
    def inputs(k, n, v, mode):
        def make(rng):
            logits = rng.standard_normal((k, n, v), dtype=np.float32)
            return {"logits": logits, "target": rng.integers(0, v, n)}, {"mode": mode}

        return make

    return tuple(
        BenchCase(f"K=4 x {n}x{v}, {mode}", inputs(4, n, v, mode), ("logits",), smoke=inputs(2, 4, 40, mode),
                  dtypes=("float32", "bfloat16"))
        for mode in MODES for n, v in ((8192, 32000), (4096, 128256))
    )


def _bytes_moved(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the K member logits once; backward reads them once and writes K gradients.
    Per token: 8 bytes of loss and mask and the saved fp64 (m, s), counted at prob_mean's 16 bytes
    per member (logit_mean saves 16 bytes per token; the difference is below 0.01% at the bench shapes)."""
    k, n, v = np.shape(arrays["logits"])
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * k * n * v * itemsize + (8 + 16 * k) * n)


def _other_mode(mode, kw):
    return "prob_mean" if mode == "logit_mean" else "logit_mean"


ENSEMBLE_CE = Spec(
    name="ensemble_cross_entropy",
    paper=24,
    family="classification",
    summary="Cross-entropy of a K-member ensemble (mean of logits or mixture of probabilities), fused over "
            "stacked member logits without materialising the averaged distribution.",
    reference=f"{REF}.{MODULE}:ensemble_cross_entropy",
    reference_grad=f"{REF}.{MODULE}:ensemble_cross_entropy_grad",
    accelerated=f"{ACC}.{MODULE}:ensemble_cross_entropy",
    baseline=f"{BASE}.{MODULE}:ensemble_cross_entropy",
    samples=_samples,
    examples=_edge_cases,
    grad_inputs=("logits",),
    tolerance=TOLERANCE,
    reduction_length=_row_length,
    bad_inputs=_bad_inputs(),
    bench_cases=_bench_cases(),
    bytes_moved=_bytes_moved,
    properties=(
        "K = 1 equals torch.nn.functional.cross_entropy of logits[0] / temperature in both modes "
        "(tested as an independent anchor)",
        "identical members give the single member's cross-entropy in both modes",
    ),
    wrong_ports={
        **ROW_LOSS_WRONG_PORTS,
        "averages in the other mode": wrong_ports.replaces_argument("mode", _other_mode),
        "ignores the temperature": wrong_ports.replaces_argument("temperature", lambda t, kw: 1.0),
        "uses the first member only": wrong_ports.replaces_argument("logits", lambda z, kw: z[:1]),
    },
)


register(ENSEMBLE_CE)
