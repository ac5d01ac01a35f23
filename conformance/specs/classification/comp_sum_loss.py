"""Spec of the comp-sum losses (P13, ``comp_sum_loss``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput
from ...strategies import row_loss_samples
from ._rowloss import bad_hyper, row_bad_inputs, row_loss_spec


TAUS = (0.0, 0.5, 1.0, 1.5, 2.0)


def _comp_sum_hyper(draw, scale):
    # tau < 1 makes the loss grow like p_y^(tau - 1); keep it to scales where that stays finite.
    tau = draw(st.sampled_from(TAUS) | st.floats(0.0, 3.0))
    return {"tau": max(tau, 1.0) if scale > 4.0 else tau}


COMP_SUM = row_loss_spec(
    "comp_sum_loss", 13,
    "Comp-sum family: cross-entropy, generalized CE, MAE and sum-exponential losses in one kernel.",
    module="comp_sum_loss",
    samples=lambda profile, dtype: row_loss_samples(profile, dtype, _comp_sum_hyper, class_weight=True),
    edge_hypers=[{"tau": tau} for tau in (0.0, 1.0, 1.5)],
    bad_inputs=row_bad_inputs({"tau": 1.0}) + (
        bad_hyper("tau", -0.5, ">= 0"),
        BadInput("weight of the wrong length", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "weight": np.ones(4)}, {}),
            ValueError, "weight"),
    ),
    properties=("tau=1 equals torch.nn.functional.cross_entropy (tested as an independent anchor)",),
)



register(COMP_SUM)

