"""Specs of the classification losses (family ``classification/``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from .. import wrong_ports
from ..registry import register
from ..spec import BadInput, BenchCase, Sample, Spec, Tolerance, resolve
from ..strategies import row_loss_edge_cases, row_loss_samples

REF = "twinops.reference.classification"
ACC = "twinops.accelerated.classification"
BASE = "twinops.conformance.baselines.classification"

ROW_LOSS_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with sqrt(C): every output is a reduction over a row of C logits (log-sum-exp, "
        "mean/variance), whose fp32 rounding error grows like sqrt(C).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the "
        "output itself is rounded to the input dtype.",
    ),
)


def _row_length(sample: Sample) -> int:
    return int(np.shape(sample.arrays["logits"])[1])


def _logits_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the logits once; backward reads them once and writes the gradient once."""
    n, c = np.shape(arrays["logits"])
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * n * c * itemsize + 8 * n)


def _bench_cases(extra=None):
    def inputs(n, c):
        def make(rng):
            arrays = {"logits": rng.standard_normal((n, c), dtype=np.float32), "target": rng.integers(0, c, n)}
            if extra is not None:
                arrays.update(extra(rng, n))
            return arrays, {}

        return make

    def case(n, c):
        return BenchCase(f"{n}x{c}", inputs(n, c), ("logits",), smoke=inputs(4, 40))

    return (case(8192, 32000), case(4096, 128256))


def _row_bad_inputs(base_kwargs: dict, extra=None) -> tuple[BadInput, ...]:
    """Bad inputs every row-wise loss must reject. ``extra`` adds inputs the loss needs."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3))

    def call(target=np.array([0, 2]), lg=logits, **kw):
        arrays = {"logits": lg, "target": target}
        if extra is not None:
            arrays.update(extra(len(target)))
        return lambda: (arrays, {**base_kwargs, **kw})

    return (
        BadInput("label >= C", call(np.array([0, 3])), ValueError, "target", data_dependent=True),
        BadInput("negative label other than ignore_index", call(np.array([-5, 0])), ValueError, "target",
                 data_dependent=True),
        BadInput("1-D logits", call(lg=logits[0]), ValueError, "logits"),
        BadInput("float target", call(np.array([0.0, 1.0])), TypeError, "target"),
        BadInput("target length differs from N", call(np.array([0, 1, 2])), ValueError, "target"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
    )


def _ignores_labels(target, kw):
    """Treat ignored rows as class 0 (a port that forgets ``ignore_index``)."""
    import torch

    return torch.where(target == kw.get("ignore_index", -100), 0, target)


ROW_LOSS_WRONG_PORTS = {
    "ignores ignore_index": wrong_ports.replaces_argument("target", _ignores_labels),
    "mean over all rows": wrong_ports.mean_over_all_rows,
}


def _row_loss_spec(name: str, paper: int, summary: str, *, hyper=None, edge_hypers=(), **fields) -> Spec:
    """A row-wise loss over (N, C) logits: the four implementations are named after the technique,
    inputs come from ``row_loss_samples`` with the technique's ``hyper`` strategy and the shared edge
    cases at each of ``edge_hypers``; ``fields`` set or override anything else."""
    defaults = dict(
        family="classification",
        reference=f"{REF}:{name}",
        reference_grad=f"{REF}:{name}_grad",
        accelerated=f"{ACC}:{name}",
        baseline=f"{BASE}:{name}",
        samples=lambda profile, dtype: row_loss_samples(profile, dtype, hyper),
        examples=lambda: [s for h in edge_hypers for s in row_loss_edge_cases(h)],
        grad_inputs=("logits",),
        tolerance=ROW_LOSS_TOLERANCE,
        reduction_length=_row_length,
        bench_cases=_bench_cases(),
        bytes_moved=_logits_bytes,
        wrong_ports=ROW_LOSS_WRONG_PORTS,
    )
    return Spec(name=name, paper=paper, summary=summary, **{**defaults, **fields})


def _bad_hyper(name: str, value: float, rule: str, extra=None) -> BadInput:
    def make():
        arrays = {"logits": np.zeros((2, 3)), "target": np.array([0, 1])}
        if extra is not None:
            arrays.update(extra(2))
        return arrays, {name: value}

    return BadInput(f"{name} = {value:g} (must be {rule})", make, ValueError, name)


# ---------------------------------------------------------------------------- comp_sum_loss (P13)

TAUS = (0.0, 0.5, 1.0, 1.5, 2.0)


def _comp_sum_hyper(draw, scale):
    # tau < 1 makes the loss grow like p_y^(tau - 1); keep it to scales where that stays finite.
    tau = draw(st.sampled_from(TAUS) | st.floats(0.0, 3.0))
    return {"tau": max(tau, 1.0) if scale > 4.0 else tau}


COMP_SUM = _row_loss_spec(
    "comp_sum_loss", 13,
    "Comp-sum family: cross-entropy, generalized CE, MAE and sum-exponential losses in one kernel.",
    samples=lambda profile, dtype: row_loss_samples(profile, dtype, _comp_sum_hyper, class_weight=True),
    edge_hypers=[{"tau": tau} for tau in (0.0, 1.0, 1.5)],
    bad_inputs=_row_bad_inputs({"tau": 1.0}) + (
        _bad_hyper("tau", -0.5, ">= 0"),
        BadInput("weight of the wrong length", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "weight": np.ones(4)}, {}),
            ValueError, "weight"),
    ),
    properties=("tau=1 equals torch.nn.functional.cross_entropy (tested as an independent anchor)",),
)


# ---------------------------------------------------------------------------- spherical_z_loss (P5)


def _spherical_z_hyper(draw, scale):
    return {
        "a": draw(st.sampled_from((0.5, 1.0, 2.0)) | st.floats(0.1, 5.0)),
        "b": draw(st.floats(-2.0, 2.0)),
        "eps": draw(st.sampled_from((1e-6, 1e-3))),
    }


SPHERICAL_Z_TOLERANCE = replace(
    ROW_LOSS_TOLERANCE,
    atol_scales_with_row=True,
    reasons=ROW_LOSS_TOLERANCE.reasons + (
        "atol scales with the row's largest gradient entry: the gradient grows like 1/sigma, and an "
        "entry that nearly cancels keeps an fp32 error of ~1e-7 of the row's scale (one ulp of the "
        "inputs moves the exact gradient by as much).",
    ),
)


def _constant_rows(sample: Sample) -> str | None:
    """Finite differences cannot see the gradient where sigma = 0: the loss depends on
    h / (|h| sigma' + eps) there, so any step comparable to eps changes it at first order."""
    logits = np.asarray(sample.arrays["logits"])
    if np.any(np.ptp(logits, axis=1) == 0):
        return ("finite differences skip rows with sigma = 0 (constant rows, C = 1): the gradient there is "
                "the eps-regularised limit, pinned by a closed-form reference test")
    return None


SPHERICAL_Z = _row_loss_spec(
    "spherical_z_loss", 5,
    "Z-loss: softplus loss on the target's standardised logit, invariant to shifting and scaling the logits.",
    hyper=_spherical_z_hyper,
    edge_hypers=[{"a": 1.0, "b": 0.0, "eps": 1e-6}, {"a": 2.0, "b": 0.5, "eps": 1e-3}],
    tolerance=SPHERICAL_Z_TOLERANCE,
    fd_skip=_constant_rows,
    bad_inputs=_row_bad_inputs({"a": 1.0, "b": 0.0}) + (
        _bad_hyper("a", 0.0, "> 0"),
        _bad_hyper("a", -1.0, "> 0"),
        _bad_hyper("eps", 0.0, "> 0"),
    ),
)

register(COMP_SUM, SPHERICAL_Z)


# ---------------------------------------------------------------------------- ldr_kl_loss, aldr_kl_loss (P42)

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
    aldr, ldr = resolve(f"{REF}:aldr_kl_loss"), resolve(f"{REF}:ldr_kl_loss")
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


LDR_KL = _row_loss_spec(
    "ldr_kl_loss", 42,
    "LDR-KL: the worst-case margin loss over label distributions with a KL penalty, lam log mean exp(d / lam).",
    hyper=_ldr_hyper,
    edge_hypers=[{"margin": 0.1, "lam": 1.0}, {"margin": 1.0, "lam": 0.1}, {"margin": 0.0, "lam": 10.0}],
    bad_inputs=_row_bad_inputs({"margin": 0.1, "lam": 1.0}) + (
        _bad_hyper("lam", 0.0, "> 0"),
        _bad_hyper("lam", -1.0, "> 0"),
        _bad_hyper("margin", -0.1, ">= 0"),
    ),
)

ALDR_KL = _row_loss_spec(
    "aldr_kl_loss", 42,
    "ALDR-KL: LDR-KL with a per-sample temperature set from its own prediction; returns the new temperatures.",
    samples=_aldr_samples,
    examples=_aldr_edge_cases,
    bad_inputs=_row_bad_inputs({"margin": 0.1, "lam0": 1.0, "alpha": 2.0}, extra=_lam_prev_ones) + (
        _bad_hyper("lam0", 0.0, "> 0", _lam_prev_ones),
        _bad_hyper("lam0", -1.0, "> 0", _lam_prev_ones),
        _bad_hyper("margin", -0.1, ">= 0", _lam_prev_ones),
        _bad_hyper("alpha", 1.0, "> 1", _lam_prev_ones),
        _bad_hyper("alpha", 0.5, "> 1", _lam_prev_ones),
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
    bench_cases=_bench_cases(_lam_prev_bench),
    bytes_moved=_aldr_bytes,
    fd_function=_aldr_fixed_temperature_loss,
    output_dtypes=("input", "float32"),
    grad_output_index=0,
)

register(LDR_KL, ALDR_KL)
