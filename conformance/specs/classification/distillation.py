"""Specs of the MSE distillation losses: ``logit_mse_distillation`` (P45, N2N) and
``softmax_mse_distillation`` (P60, self-distillation with ground-truth targets)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec
from ...strategies import (
    BATCH_SIZES,
    CLASS_COUNTS,
    EXTREME_SCALE,
    LAYOUTS,
    LOGIT_SCALES,
    row_loss_edge_cases,
    row_loss_samples,
    seed,
    upstream_grad,
)
from ._rowloss import (
    ACC,
    BASE,
    REF,
    ROW_LOSS_TOLERANCE,
    ROW_LOSS_WRONG_PORTS,
    bad_hyper,
    row_bad_inputs,
    row_loss_spec,
)

TEACHER_GAPS = (0.0, 0.01, 0.3, None)  # teacher = student + gap * spread * noise; None: an unrelated teacher


def _teacher_for(draw, rng, z):
    """Teacher logits near the student's (as in self-distillation), equal to them, or unrelated."""
    gap = draw(st.sampled_from(TEACHER_GAPS))
    spread = max(float(np.std(z)), 1e-3) if z.size > 1 else 1.0
    if gap is None:
        return rng.normal(size=z.shape) * spread * draw(st.sampled_from((0.5, 1.0, 2.0)))
    return z + gap * spread * rng.normal(size=z.shape)


def _two_logit_bytes(arrays: dict, itemsize: int, direction: str, fwd_passes: int, per_row: dict) -> float:
    first = next(iter(arrays.values()))
    n, c = np.shape(first)
    passes = {"fwd": fwd_passes, "bwd": 3, "fwd+bwd": fwd_passes + 3}[direction]
    return float(passes * n * c * itemsize + per_row[direction] * n)


# --- P45: logit MSE ---------------------------------------------------------------------------------


@st.composite
def _logit_mse_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(BATCH_SIZES[profile]))
    k = draw(st.sampled_from(CLASS_COUNTS[profile]))
    scale = draw(st.sampled_from(LOGIT_SCALES + ((EXTREME_SCALE,) if dtype == "float32" else ())))
    student = rng.normal(size=(n, k)) * scale + rng.normal() * scale
    teacher = _teacher_for(draw, rng, student)
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    return Sample(
        arrays={"student_logits": student, "teacher_logits": teacher},
        kwargs={"reduction": reduction},
        float_inputs=("student_logits", "teacher_logits"),
        layouts={"student_logits": draw(st.sampled_from(LAYOUTS)), "teacher_logits": draw(st.sampled_from(LAYOUTS))},
        grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
        note=f"scale={scale:g}",
    )


def _logit_mse_edge_cases() -> list[Sample]:
    rng = np.random.default_rng(2)
    out = []
    for reduction in ("mean", "none"):
        s = rng.normal(size=(3, 5))
        t = s + 0.1 * rng.normal(size=s.shape)
        nan_s, inf_t, both_inf = s.copy(), t.copy(), t.copy()
        nan_s[1, 2], inf_t[0, 4] = np.nan, -np.inf
        s_inf = s.copy()
        s_inf[2, 0], both_inf[2, 0] = np.inf, np.inf
        cases = ((s, s.copy(), "teacher equals student"), (nan_s, t, "NaN in a student row"),
                 (s, inf_t, "-inf in a teacher row"), (s_inf, both_inf, "inf in the same place in both"),
                 (s[:, :1], t[:, :1], "one class"))
        grad = upstream_grad(rng, (3,) if reduction == "none" else ())
        out += [Sample({"student_logits": a, "teacher_logits": b}, {"reduction": reduction},
                       ("student_logits", "teacher_logits"), grad_out=grad, note=note) for a, b, note in cases]
    return out


def _pair_bad(s, t, **kw):
    return lambda: ({"student_logits": s, "teacher_logits": t}, kw)


def _sums_over_classes(fn):
    """sum_k (s - t)^2 per row: the class axis summed instead of averaged."""
    return lambda **kw: wrong_ports.map_first(fn(**kw), lambda out: out * kw["student_logits"].shape[1])


LOGIT_MSE = Spec(
    name="logit_mse_distillation",
    paper=45,
    family="classification",
    summary="Logit-matching distillation (N2N's student training): mean squared error to the detached teacher's logits.",
    reference=f"{REF}.distillation:logit_mse_distillation",
    reference_grad=f"{REF}.distillation:logit_mse_distillation_grad",
    accelerated=f"{ACC}.distillation:logit_mse_distillation",
    baseline=f"{BASE}.distillation:logit_mse_distillation",
    samples=_logit_mse_samples,
    examples=_logit_mse_edge_cases,
    grad_inputs=("student_logits",),
    tolerance=ROW_LOSS_TOLERANCE,
    reduction_length=lambda sample: int(np.shape(sample.arrays["student_logits"])[1]),
    bad_inputs=(
        BadInput("1-D student_logits", _pair_bad(np.zeros(3), np.zeros(3)), ValueError, "student_logits"),
        BadInput("teacher_logits of another shape", _pair_bad(np.zeros((2, 3)), np.zeros((2, 4))),
                 ValueError, "teacher_logits"),
        BadInput("boolean teacher_logits", _pair_bad(np.zeros((2, 3)), np.zeros((2, 3), bool)),
                 TypeError, "teacher_logits"),
        BadInput("no classes", _pair_bad(np.zeros((2, 0)), np.zeros((2, 0))), ValueError, "student_logits"),
        BadInput("unknown reduction", _pair_bad(np.zeros((2, 3)), np.zeros((2, 3)), reduction="avg"),
                 ValueError, "reduction"),
    ),
    bench_cases=tuple(
        BenchCase(f"{n}x{c}", (lambda n, c: lambda rng: ({
            "student_logits": rng.standard_normal((n, c), dtype=np.float32),
            "teacher_logits": rng.standard_normal((n, c), dtype=np.float32)}, {}))(n, c),
            ("student_logits", "teacher_logits"),
            smoke=lambda rng: ({"student_logits": rng.standard_normal((4, 40)),
                                "teacher_logits": rng.standard_normal((4, 40))}, {}))
        for n, c in ((8192, 32000), (4096, 128256))
    ),
    bytes_moved=lambda arrays, itemsize, direction: _two_logit_bytes(
        arrays, itemsize, direction, 2, {"fwd": 4, "bwd": 4, "fwd+bwd": 8}),
    wrong_ports={"sums over classes instead of averaging": _sums_over_classes},
    properties=("reduction='mean' equals torch.nn.functional.mse_loss(student, teacher) (tested as an "
                "independent anchor); no gradient reaches teacher_logits",),
)


# --- P60: softmax MSE against ground truth and teacher ------------------------------------------------


def _alpha_hyper(draw, scale):
    return {"alpha": draw(st.sampled_from((0.0, 0.6, 1.0)) | st.floats(0.0, 1.0))}


def _with_teacher(sample: Sample, teacher: np.ndarray, layout: str | None = None) -> Sample:
    layouts = dict(sample.layouts, teacher_logits=layout) if layout else sample.layouts
    return replace(sample, arrays={**sample.arrays, "teacher_logits": teacher},
                   float_inputs=tuple(sample.float_inputs) + ("teacher_logits",), layouts=layouts)


@st.composite
def _softmax_mse_samples(draw, profile: str, dtype: str):
    """``row_loss_samples`` plus teacher logits near, equal to, or unrelated to the student's."""
    sample = draw(row_loss_samples(profile, dtype, _alpha_hyper))
    rng = seed(draw)
    return _with_teacher(sample, _teacher_for(draw, rng, sample.arrays["logits"]), draw(st.sampled_from(LAYOUTS)))


def _softmax_mse_edge_cases() -> list[Sample]:
    rng = np.random.default_rng(3)
    out = []
    for hyper, reductions in (({"alpha": 0.6}, ("mean", "none")), ({"alpha": 0.0}, ("none",))):
        for sample in row_loss_edge_cases(hyper, reductions=reductions):
            z = sample.arrays["logits"]
            out.append(_with_teacher(sample, z + 0.3 * rng.normal(size=z.shape)))
    for reduction in ("none",):
        z = rng.normal(size=(3, 6))
        nan_t, ninf_t = z + 0.5 * rng.normal(size=z.shape), z + 0.5 * rng.normal(size=z.shape)
        nan_t[1, 3], ninf_t[:, 2] = np.nan, -np.inf
        kw = {"alpha": 0.6, "ignore_index": -100, "reduction": reduction}
        grad = upstream_grad(rng, (3,) if reduction == "none" else ())
        for t, target, note in ((z.copy(), [0, 5, 2], "teacher equals student"),
                                (nan_t, [0, 5, 2], "NaN in a teacher row"),
                                (nan_t, [0, -100, 2], "NaN in the teacher row of an ignored sample"),
                                (ninf_t, [0, 5, 2], "a -inf (masked-out) teacher class")):
            out.append(Sample({"logits": z, "target": np.array(target), "teacher_logits": t}, kw,
                              ("logits", "teacher_logits"), grad_out=grad, note=note))
    return out


def _teacher_zeros(n):
    return {"teacher_logits": np.zeros((n, 3))}


def _softmax_mse_bench_cases():
    def inputs(n, c):
        def make(rng):
            z = rng.standard_normal((n, c), dtype=np.float32)
            t = z + np.float32(0.5) * rng.standard_normal((n, c), dtype=np.float32)
            return {"logits": z, "teacher_logits": t, "target": rng.integers(0, c, n)}, {}

        return make

    return tuple(BenchCase(f"{n}x{c}", inputs(n, c), ("logits", "teacher_logits"), smoke=inputs(4, 40))
                 for n, c in ((8192, 32000), (4096, 128256)))


def _teacher_logits_as_probabilities(fn):
    """The teacher's raw logits used as its targets, without the softmax."""
    import torch

    def port(*, teacher_logits, **kw):
        # softmax(log t') = t' / sum t': feed logits whose softmax is the raw (shifted, normalised) teacher logits.
        shifted = teacher_logits - teacher_logits.amin(dim=1, keepdim=True) + 1e-3
        return fn(teacher_logits=torch.log(shifted), **kw)

    return port


SOFTMAX_MSE = row_loss_spec(
    "softmax_mse_distillation", 60,
    "Self-distillation with ground truth: alpha MSE(softmax(z), onehot(y)) + (1 - alpha) MSE(softmax(z), softmax(t)).",
    module="distillation",
    samples=_softmax_mse_samples,
    examples=_softmax_mse_edge_cases,
    bad_inputs=row_bad_inputs({"alpha": 0.6}, extra=_teacher_zeros) + (
        bad_hyper("alpha", -0.1, "in [0, 1]", _teacher_zeros),
        bad_hyper("alpha", 1.5, "in [0, 1]", _teacher_zeros),
        BadInput("teacher_logits of another shape", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "teacher_logits": np.zeros((2, 4))}, {}),
            ValueError, "teacher_logits"),
        BadInput("boolean teacher_logits", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "teacher_logits": np.zeros((2, 3), bool)}, {}),
            TypeError, "teacher_logits"),
    ),
    bench_cases=_softmax_mse_bench_cases(),
    bytes_moved=lambda arrays, itemsize, direction: _two_logit_bytes(
        arrays, itemsize, direction, 4, {"fwd": 36, "bwd": 32, "fwd+bwd": 68}),
    wrong_ports={
        **ROW_LOSS_WRONG_PORTS,
        "alpha weights the teacher instead of the labels": wrong_ports.replaces_argument(
            "alpha", lambda alpha, kw: 1.0 - alpha),
        "teacher logits not passed through a softmax": _teacher_logits_as_probabilities,
    },
    properties=("alpha = 1 is the Brier score against the labels / C; the teacher gets no gradient (tested)",),
)

register(LOGIT_MSE, SOFTMAX_MSE)
