"""Spec of the weighted cross-entropy with per-sample statistics (P55, ``weighted_ce_with_stats``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample
from ...strategies import row_loss_edge_cases, row_loss_samples, upstream_grad
from ._rowloss import ROW_LOSS_TOLERANCE, ROW_LOSS_WRONG_PORTS, row_bad_inputs, row_loss_spec

REDUCTIONS = ("mean", "normalized", "sum", "none")
WEIGHT_MODES = ("uniform", "uniform", "some zero", "all zero", "signed")


def _weights(rng, mode: str, n: int) -> np.ndarray:
    if mode == "all zero":
        return np.zeros(n)
    if mode == "signed":  # any real weight is allowed; keep the normalizer away from 0
        return rng.uniform(-0.5, 2.0, n)
    w = rng.uniform(0.05, 2.0, n)
    return np.where(rng.random(n) < 0.4, 0.0, w) if mode == "some zero" else w


def _with_weights(sample: Sample, w: np.ndarray, reduction: str, rng, layout=None) -> Sample:
    n = len(w)
    layouts = dict(sample.layouts, sample_weight=layout) if layout else sample.layouts
    return replace(sample, arrays={**sample.arrays, "sample_weight": w},
                   kwargs={**sample.kwargs, "reduction": reduction},
                   float_inputs=tuple(sample.float_inputs) + ("sample_weight",), layouts=layouts,
                   grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()))


@st.composite
def _samples(draw, profile: str, dtype: str):
    """``row_loss_samples`` (sizes across the chunk boundaries, every logit scale, ignored rows,
    views) plus per-sample weights in every mode and the four reductions."""
    sample = draw(row_loss_samples(profile, dtype, lambda draw, scale: {}))
    n = len(sample.arrays["target"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(WEIGHT_MODES))
    reduction = draw(st.sampled_from(REDUCTIONS))
    layout = draw(st.sampled_from((None, "strided")))
    out = _with_weights(sample, _weights(rng, mode, n), reduction, rng, layout)
    return replace(out, note=f"{out.note}, weights={mode}")


def _examples() -> list[Sample]:
    rng = np.random.default_rng(1)
    out = []
    for reduction in REDUCTIONS:
        for sample in row_loss_edge_cases({}, reductions=(reduction,)) if reduction != "sum" else ():
            n = len(sample.arrays["target"])
            out.append(_with_weights(sample, rng.uniform(0.1, 2.0, n), reduction, rng))
        ties = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.5, 0.0, 0.5, -1.0]])
        out.append(_with_weights(Sample({"logits": ties, "target": np.array([1, 2, 3])}, {}, ("logits",),
                                        note="label tied with the best other class"),
                                 np.array([1.0, 0.5, 2.0]), reduction, rng))
    zero = Sample({"logits": rng.normal(size=(3, 5)), "target": np.array([0, 4, -100])}, {}, ("logits",),
                  note="all weights zero")
    out.append(_with_weights(zero, np.zeros(3), "normalized", rng))
    nan_ignored = Sample({"logits": rng.normal(size=(3, 5)), "target": np.array([0, -100, 2])}, {}, ("logits",),
                         note="NaN weight on an ignored row")
    out.append(_with_weights(nan_ignored, np.array([1.0, np.nan, 0.5]), "normalized", rng))
    return out


def _fd_skip(sample: Sample) -> str | None:
    if sample.kwargs["reduction"] != "normalized":
        return None
    active = sample.arrays["target"] != sample.kwargs.get("ignore_index", -100)
    total = np.where(active, sample.arrays["sample_weight"], 0.0).sum()
    if abs(total) < 1e-3:
        return "normalized loss with total weight ~0 (0 by definition, not differentiable there)"
    return None


def _weight_ones(n):
    return {"sample_weight": np.ones(n)}


def _bench_cases():
    def inputs(n, c):
        def make(rng):
            return {"logits": rng.standard_normal((n, c), dtype=np.float32), "target": rng.integers(0, c, n),
                    "sample_weight": rng.uniform(0.0, 1.0, n).astype(np.float32)}, {}

        return make

    return tuple(BenchCase(f"{n}x{c}", inputs(n, c), ("logits", "sample_weight"), smoke=inputs(4, 40))
                 for n, c in ((8192, 32000), (4096, 128256)))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the logits once, the int64 label and the weight, and writes five fp32 values and
    (m, s) a row; backward reads the logits once and writes their gradient, reading the label, (m, s)
    and the row's fp32 gradient."""
    n, c = np.shape(arrays["logits"])
    per_row = {"fwd": 36 + itemsize, "bwd": 20, "fwd+bwd": 56 + itemsize}[direction]
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * n * c * itemsize + per_row * n)


def _normalized_by_batch(fn):
    """``"normalized"`` computed as the mean (divides by the number of rows, not the total weight)."""
    def port(*, reduction="mean", **kw):
        return fn(reduction="mean" if reduction == "normalized" else reduction, **kw)

    return port


def _margin_in_logits(fn):
    """The margin as logit difference z_y - max_{k != y} z_k instead of a probability difference."""
    import torch

    def port(*, logits, target, ignore_index=-100, **kw):
        out = fn(logits=logits, target=target, ignore_index=ignore_index, **kw)
        active = target != ignore_index
        safe = torch.where(active, target, 0).long()
        z = logits.detach().float()
        zy = z.gather(1, safe[:, None])[:, 0]
        other = z.scatter(1, safe[:, None], float("-inf")).max(1).values
        margin = torch.where(active, zy - other, 0.0).to(out[4].dtype)
        return (*out[:4], margin)

    return port


WEIGHTED_CE = row_loss_spec(
    "weighted_ce_with_stats", 55,
    "Per-sample weighted cross-entropy that also returns each row's entropy, max prob, label prob and margin "
    "from the same pass (the primitive under STORM's loss rescaling).",
    module="weighted_ce_with_stats",
    samples=_samples,
    examples=_examples,
    grad_inputs=("logits", "sample_weight"),
    grad_output_index=0,
    output_dtypes=("input",) * 5,
    tolerance=replace(ROW_LOSS_TOLERANCE, reasons=ROW_LOSS_TOLERANCE.reasons + (
        "The statistics share the loss's tolerance: each is a reduction over the row's C logits.",)),
    bad_inputs=row_bad_inputs({}, extra=_weight_ones) + (
        BadInput("sample_weight of the wrong length", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "sample_weight": np.ones(3)}, {}),
            ValueError, "sample_weight"),
        BadInput("2-D sample_weight", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "sample_weight": np.ones((2, 1))}, {}),
            ValueError, "sample_weight"),
        BadInput("boolean sample_weight", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "sample_weight": np.array([True, False])},
            {}), TypeError, "sample_weight"),
    ),
    bench_cases=_bench_cases(),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=(
        "The four statistics are returned without gradient; ignored rows have loss and statistics 0.",
        "An empty average (no active row for 'mean', total weight 0 for 'normalized') is 0.",
    ),
    wrong_ports={
        **ROW_LOSS_WRONG_PORTS,
        "normalized divides by the batch size": _normalized_by_batch,
        "sample weights ignored": wrong_ports.replaces_argument("sample_weight", lambda w, kw: w * 0 + 1),
        "margin in logits": _margin_in_logits,
    },
)

register(WEIGHTED_CE)
