"""Spec of LDR-KL and ALDR-KL (P42, ``ldr_kl_loss``, ``aldr_kl_loss``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, Sample, resolve
from ...strategies import row_loss_edge_cases, row_loss_samples
from ._rowloss import REF, bad_hyper, row_bad_inputs, row_bench_cases, row_loss_spec


LDR_MARGINS = (0.0, 0.1, 1.0)
LDR_LAMS = (0.1, 1.0, 10.0)


def _ldr_hyper(draw, scale):
    return {
        "margin": draw(st.sampled_from(LDR_MARGINS)),
        "lam": draw(st.sampled_from(LDR_LAMS) | st.floats(0.05, 20.0)),
    }


def _aldr_hyper(draw, scale):
    return {
        "margin": draw(st.sampled_from(LDR_MARGINS)),
        "lam0": draw(st.sampled_from(LDR_LAMS) | st.floats(0.05, 20.0)),
        "alpha": draw(st.sampled_from((2.0,)) | st.floats(1.1, 5.0)),
    }


def _add_lam_prev(sample: Sample, lam_prev: np.ndarray, layout: str | None = None) -> Sample:
    layouts = dict(sample.layouts, lam_prev=layout) if layout else sample.layouts
    return replace(sample, arrays={**sample.arrays, "lam_prev": lam_prev},
                   float_inputs=tuple(sample.float_inputs) + ("lam_prev",), layouts=layouts)


@st.composite
def _aldr_samples(draw, profile: str, dtype: str):
    """``row_loss_samples`` plus ``lam_prev``, the rows' stored temperatures: positive, in
    [lam0 / 2, lam0] (ALDR-KL's updates keep them in (lam0 (1 - 1/alpha), lam0]), sometimes strided."""
    sample = draw(row_loss_samples(profile, dtype, _aldr_hyper))
    n = len(sample.arrays["target"])
    fractions = draw(st.lists(st.floats(0.5, 1.0), min_size=n, max_size=n))
    layout = draw(st.sampled_from((None, "strided")))
    return _add_lam_prev(sample, sample.kwargs["lam0"] * np.array(fractions, dtype=np.float64), layout)


def _aldr_edge_cases() -> list[Sample]:
    out = []
    for hyper in ({"margin": 0.1, "lam0": 1.0, "alpha": 2.0}, {"margin": 1.0, "lam0": 0.1, "alpha": 1.5}):
        for sample in row_loss_edge_cases(hyper):
            n = len(sample.arrays["target"])
            out.append(_add_lam_prev(sample, hyper["lam0"] * np.linspace(1.0, 0.5, n)))
    return out


def _aldr_fixed_temperature_loss(values: dict, kwargs: dict):
    """What ALDR-KL's gradient differentiates: the loss with every row's ``lam_new`` held at its value
    for the unperturbed inputs (the reference detaches it). Each row is LDR-KL at its own ``lam_new``;
    the penalty term is then a constant and is left out."""
    aldr, ldr = resolve(f"{REF}.ldr_kl_loss:aldr_kl_loss"), resolve(f"{REF}.ldr_kl_loss:ldr_kl_loss")
    _, lam_new = aldr(**values, **kwargs)
    margin, ignore_index, reduction = kwargs["margin"], kwargs["ignore_index"], kwargs["reduction"]

    def loss(logits, target, lam_prev):
        active = target != ignore_index
        rows = np.zeros(len(target))
        for i in np.flatnonzero(active):
            lam = float(lam_new[i])
            rows[i] = ldr(logits[i:i + 1], target[i:i + 1], margin=margin, lam=lam, ignore_index=ignore_index,
                          reduction="none")[0] if np.isfinite(lam) else np.nan
        if reduction == "none":
            return rows
        with np.errstate(invalid="ignore", divide="ignore"):
            return rows.sum() if reduction == "sum" else rows.sum() / active.sum()

    return loss


def _aldr_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the logits three times (softmax normaliser at lam_prev, KL, loss at lam_new);
    backward reads them once and writes the gradient once. Per row: the label, and lam_prev read
    and lam_new written as float32."""
    n, c = np.shape(arrays["logits"])
    passes = {"fwd": 3, "bwd": 2, "fwd+bwd": 5}[direction]
    return float(passes * n * c * itemsize + 16 * n)


def _lam_prev_bench(rng, n):
    return {"lam_prev": rng.uniform(0.5, 1.0, n).astype(np.float32)}  # lam0 = 1 (the default)


def _lam_prev_ones(n):
    return {"lam_prev": np.ones(n)}


LDR_KL = row_loss_spec(
    "ldr_kl_loss", 42,
    "LDR-KL: the worst-case margin loss over label distributions with a KL penalty, lam log mean exp(d / lam).",
    module="ldr_kl_loss",
    hyper=_ldr_hyper,
    edge_hypers=[{"margin": 0.1, "lam": 1.0}, {"margin": 1.0, "lam": 0.1}, {"margin": 0.0, "lam": 10.0}],
    bad_inputs=row_bad_inputs({"margin": 0.1, "lam": 1.0}) + (
        bad_hyper("lam", 0.0, "> 0"),
        bad_hyper("lam", -1.0, "> 0"),
        bad_hyper("margin", -0.1, ">= 0"),
    ),
)

ALDR_KL = row_loss_spec(
    "aldr_kl_loss", 42,
    "ALDR-KL: LDR-KL with a per-sample temperature set from its own prediction; returns the new temperatures.",
    module="ldr_kl_loss",
    samples=_aldr_samples,
    examples=_aldr_edge_cases,
    bad_inputs=row_bad_inputs({"margin": 0.1, "lam0": 1.0, "alpha": 2.0}, extra=_lam_prev_ones) + (
        bad_hyper("lam0", 0.0, "> 0", _lam_prev_ones),
        bad_hyper("lam0", -1.0, "> 0", _lam_prev_ones),
        bad_hyper("margin", -0.1, ">= 0", _lam_prev_ones),
        bad_hyper("alpha", 1.0, "> 1", _lam_prev_ones),
        bad_hyper("alpha", 0.5, "> 1", _lam_prev_ones),
        BadInput("lam_prev of the wrong length", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "lam_prev": np.ones(3)}, {}),
            ValueError, "lam_prev"),
        BadInput("lam_prev of shape (N, 1)", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "lam_prev": np.ones((2, 1))}, {}),
            ValueError, "lam_prev"),
        BadInput("lam_prev <= 0", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "lam_prev": np.array([1.0, -1.0])}, {}),
            ValueError, "lam_prev", data_dependent=True),
    ),
    bench_cases=row_bench_cases(_lam_prev_bench),
    bytes_moved=_aldr_bytes,
    fd_function=_aldr_fixed_temperature_loss,
    output_dtypes=("input", "float32"),
    grad_output_index=0,
)

register(LDR_KL, ALDR_KL)

