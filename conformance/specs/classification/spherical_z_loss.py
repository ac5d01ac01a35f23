"""Spec of the spherical Z-loss (P5, ``spherical_z_loss``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import Sample
from ._rowloss import ROW_LOSS_TOLERANCE, bad_hyper, row_bad_inputs, row_loss_spec



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


SPHERICAL_Z = row_loss_spec(
    "spherical_z_loss", 5,
    "Z-loss: softplus loss on the target's standardised logit, invariant to shifting and scaling the logits.",
    module="spherical_z_loss",
    hyper=_spherical_z_hyper,
    edge_hypers=[{"a": 1.0, "b": 0.0, "eps": 1e-6}, {"a": 2.0, "b": 0.5, "eps": 1e-3}],
    tolerance=SPHERICAL_Z_TOLERANCE,
    fd_skip=_constant_rows,
    bad_inputs=row_bad_inputs({"a": 1.0, "b": 0.0}) + (
        bad_hyper("a", 0.0, "> 0"),
        bad_hyper("a", -1.0, "> 0"),
        bad_hyper("eps", 0.0, "> 0"),
    ),
)

register(SPHERICAL_Z)

