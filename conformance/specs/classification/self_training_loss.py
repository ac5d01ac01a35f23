"""Spec of the self-training objective (P28, ``self_training_loss``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample
from ...strategies import BATCH_SIZES, LAYOUTS, row_loss_edge_cases, row_loss_samples, upstream_grad
from ._rowloss import ROW_LOSS_TOLERANCE, ROW_LOSS_WRONG_PORTS, bad_hyper, row_bad_inputs, row_loss_spec

LAMS = (0.0, 0.5, 1.0, 3.0)
UNLABELED_MODES = ("normal", "normal", "ties", "integers")


def _unlabeled(rng, mode: str, n: int, c: int, scale: float) -> np.ndarray:
    """Unlabelled logits; ``ties`` copies each row's maximum to another column (exact ties, so the
    lowest-index rule decides the gradient), ``integers`` draws from a few exact values."""
    if mode == "integers":
        return rng.integers(-2, 3, (n, c)).astype(np.float64)
    u = rng.normal(size=(n, c)) * scale + rng.normal() * scale
    if mode == "ties" and c > 1:
        rows = np.arange(n)
        u[rows, rng.integers(0, c, n)] = u.max(axis=1)
    return u


def _with_unlabeled(sample: Sample, u: np.ndarray, rng, layout=None) -> Sample:
    m, n = len(sample.arrays["target"]), len(u)
    layouts = dict(sample.layouts, logits_unlabeled=layout) if layout else sample.layouts
    reduction = sample.kwargs["reduction"]
    return replace(sample, arrays={**sample.arrays, "logits_unlabeled": u},
                   float_inputs=tuple(sample.float_inputs) + ("logits_unlabeled",), layouts=layouts,
                   grad_out=upstream_grad(rng, (m + n,) if reduction == "none" else ()))


@st.composite
def _samples(draw, profile: str, dtype: str):
    """``row_loss_samples`` for the labelled rows (sizes across the chunk boundaries, every logit
    scale, ignored rows, views, every reduction) plus an unlabelled batch of the same width with
    exact ties in some rows, and lam across its range."""
    sample = draw(row_loss_samples(profile, dtype, lambda draw, scale: {
        "lam": draw(st.sampled_from(LAMS) | st.floats(0.0, 5.0))}))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = sample.arrays["logits"].shape[1]
    n = draw(st.sampled_from(BATCH_SIZES[profile]))
    mode = draw(st.sampled_from(UNLABELED_MODES))
    scale = draw(st.sampled_from((1e-3, 1.0, 4.0, 30.0)))
    layout = draw(st.sampled_from(LAYOUTS))
    out = _with_unlabeled(sample, _unlabeled(rng, mode, n, c, scale), rng, layout)
    return replace(out, note=f"{out.note}, unlabeled={mode} x{scale:g}")


def _examples() -> list[Sample]:
    rng = np.random.default_rng(2)
    out = []
    for sample in row_loss_edge_cases({"lam": 1.0}, reductions=("mean", "none")):
        c = sample.arrays["logits"].shape[1]
        u = rng.normal(size=(4, c))
        if c > 2:
            u[0, [1, 2]] = u[0].max() + 1.0  # a tie at the maximum
            u[1] = 2.5                        # a constant row: every class ties
            u[2, 0] = -np.inf
        out.append(_with_unlabeled(sample, u, rng))
    base = {"ignore_index": -100}
    for reduction in ("sum", "none"):
        kw = dict(base, lam=0.5, reduction=reduction)
        u = rng.normal(size=(4, 5))
        u[0, 2], u[1, 0], u[2] = np.nan, np.inf, -np.inf
        labelled = Sample({"logits": rng.normal(size=(2, 5)), "target": np.array([1, 3])}, kw, ("logits",))
        out.append(replace(_with_unlabeled(labelled, u, rng), note="NaN, +inf and all -inf unlabelled rows"))
        empty_l = Sample({"logits": np.zeros((0, 5)), "target": np.zeros(0, np.int64)}, kw, ("logits",))
        out.append(replace(_with_unlabeled(empty_l, rng.normal(size=(3, 5)), rng), note="no labelled rows"))
        out.append(replace(_with_unlabeled(labelled, np.zeros((0, 5)), rng), note="no unlabelled rows"))
    return out


def _fd_skip(sample: Sample) -> str | None:
    u = np.sort(np.asarray(sample.arrays["logits_unlabeled"], dtype=np.float64), axis=1)
    with np.errstate(invalid="ignore"):
        tied = u.shape[0] > 0 and u.shape[1] > 1 and np.any(np.abs(u[:, -1] - u[:, -2]) < 1e-4)
    if tied:
        return "an unlabelled row with (near-)tied maxima: the pseudo-label term has a kink there"
    return None


def _bench_cases():
    def inputs(n, c):
        def make(rng):
            half = n // 2
            return {"logits": rng.standard_normal((half, c), dtype=np.float32), "target": rng.integers(0, c, half),
                    "logits_unlabeled": rng.standard_normal((n - half, c), dtype=np.float32)}, {}

        return make

    return tuple(BenchCase(f"{n}x{c} ({n // 2} labelled + {n - n // 2} unlabelled rows)", inputs(n, c),
                           ("logits", "logits_unlabeled"), smoke=inputs(4, 40))
                 for n, c in ((8192, 32000), (4096, 128256)))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Each logits matrix is read once forward, read once and written once (its gradient) backward;
    per row 8 bytes of label or pseudo-label and 8 of saved statistics."""
    m, c = np.shape(arrays["logits"])
    n = np.shape(arrays["logits_unlabeled"])[0]
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * (m + n) * c * itemsize + 16 * (m + n))


def _ties_to_highest(fn):
    """Pseudo-labels broken towards the highest tied index: the gradient moves to another column."""
    import torch

    def port(*, logits_unlabeled, **kw):
        flipped = torch.flip(logits_unlabeled.detach(), dims=[1]).clone().requires_grad_(logits_unlabeled.requires_grad)
        out = fn(logits_unlabeled=flipped, **kw)
        return _FlipGrad.apply(out, logits_unlabeled, flipped) if logits_unlabeled.requires_grad else out

    class _FlipGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out, original, flipped):
            ctx.save_for_backward(out, flipped)
            return out.clone()

        @staticmethod
        def backward(ctx, g):
            out, flipped = ctx.saved_tensors
            with torch.enable_grad():
                (gf,) = torch.autograd.grad(out, flipped, g, retain_graph=True)
            return g, torch.flip(gf, dims=[1]), None

    return port


def _pseudo_labels_trained(fn):
    """The unlabelled term's gradient dropped (a port that detaches the whole pseudo-label term
    instead of only the pseudo-label)."""
    def port(*, logits_unlabeled, **kw):
        return fn(logits_unlabeled=logits_unlabeled.detach() + 0.0 * logits_unlabeled, **kw)

    return port


SELF_TRAINING = row_loss_spec(
    "self_training_loss", 28,
    "Self-training objective: cross-entropy on labelled rows plus lam times the cross-entropy of unlabelled "
    "rows against their own argmax (stop-gradient pseudo-labels), in one row kernel per batch.",
    module="self_training_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("logits", "logits_unlabeled"),
    tolerance=ROW_LOSS_TOLERANCE,
    bad_inputs=row_bad_inputs({"lam": 1.0}, extra=lambda n: {"logits_unlabeled": np.zeros((2, 3))}) + (
        bad_hyper("lam", -0.5, ">= 0", extra=lambda n: {"logits_unlabeled": np.zeros((2, 3))}),
        BadInput("logits_unlabeled with another class count", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "logits_unlabeled": np.zeros((2, 4))}, {}),
            ValueError, "logits_unlabeled"),
        BadInput("1-D logits_unlabeled", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "logits_unlabeled": np.zeros(3)}, {}),
            ValueError, "logits_unlabeled"),
    ),
    bench_cases=_bench_cases(),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=("Pseudo-labels break ties towards the lowest index (tested with exact ties).",
                "Each term of the mean averages over its own batch; an empty average is 0."),
    wrong_ports={
        **ROW_LOSS_WRONG_PORTS,
        "ties broken towards the highest index": _ties_to_highest,
        "unlabelled term not trained through": _pseudo_labels_trained,
    },
)

register(SELF_TRAINING)
