"""Spec of the smooth adversarial comp-sum losses (P13, ``smooth_adv_comp_sum_loss``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample
from ...strategies import LAYOUTS, row_loss_edge_cases, row_loss_samples
from ._rowloss import ROW_LOSS_WRONG_PORTS, bad_hyper, row_bad_inputs, row_loss_spec

TAUS = (0.0, 0.5, 1.0, 1.5, 2.0)
NUS = (0.0, 0.5, 1.0, 3.0)
ADV_STEPS = (0.01, 0.3, 1.0)  # size of z_adv - z relative to the logits' scale


def _hyper(draw, scale):
    # tau < 1 makes the loss grow like p_y^(tau - 1); keep it to scales where that stays finite.
    tau = draw(st.sampled_from(TAUS) | st.floats(0.0, 3.0))
    return {"tau": max(tau, 1.0) if scale > 4.0 else tau, "nu": draw(st.sampled_from(NUS) | st.floats(0.0, 5.0))}


def _with_adv(sample: Sample, adv: np.ndarray, layout: str | None = None) -> Sample:
    layouts = dict(sample.layouts, adv_logits=layout) if layout else sample.layouts
    return replace(sample, arrays={**sample.arrays, "adv_logits": adv},
                   float_inputs=tuple(sample.float_inputs) + ("adv_logits",), layouts=layouts)


@st.composite
def _samples(draw, profile: str, dtype: str):
    """``row_loss_samples`` plus adversarial logits: the clean logits moved by noise of a drawn size
    (relative to the logits' spread, at least 1), sometimes not at all (the norm's kink), in any
    layout. No per-row constant shifts: the margins would move by rounding noise only, and the
    gradient's direction d / ||d|| would be that noise's."""
    sample = draw(row_loss_samples(profile, dtype, _hyper))
    z = sample.arrays["logits"]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # At least 1: a norm of r ~ 1e-3 would put its curvature 1/r in the way of finite differences.
    spread = max(float(np.std(z)), 1.0)
    step = draw(st.sampled_from(ADV_STEPS + (0.0,)))
    adv = z + step * spread * rng.normal(size=z.shape)
    return _with_adv(sample, adv, draw(st.sampled_from(LAYOUTS)))


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(1)
    out = []
    for hyper, reductions in (({"tau": 1.0, "nu": 1.0}, ("mean", "none")), ({"tau": 0.0, "nu": 0.5}, ("none",))):
        for sample in row_loss_edge_cases(hyper, reductions=reductions):
            z = sample.arrays["logits"]
            out.append(_with_adv(sample, z + 0.3 * rng.normal(size=z.shape)))
    for reduction in ("none",):
        z = rng.normal(size=(4, 6))
        kw = {"tau": 1.0, "nu": 1.0, "ignore_index": -100, "reduction": reduction}
        grad = rng.normal(size=4) if reduction == "none" else np.float64(1.3)
        nan_adv, inf_adv = z + 0.2 * rng.normal(size=z.shape), z + 0.2 * rng.normal(size=z.shape)
        nan_adv[1, 2], inf_adv[2, 4] = np.nan, np.inf
        for adv, note in ((z.copy(), "adversarial logits equal the clean ones (r = 0)"),
                          (nan_adv, "NaN in an adversarial row"), (inf_adv, "+inf in an adversarial row")):
            out.append(Sample({"logits": z, "target": np.array([0, 5, 2, 3]), "adv_logits": adv}, kw,
                              ("logits", "adv_logits"), grad_out=grad, note=note))
    return out


def _adv_zeros(n):
    return {"adv_logits": np.zeros((n, 3))}


def _full_vector_norm(fn):
    """nu * ||z_adv - z||_2 on the raw scores instead of the label-relative margins."""
    import torch

    def port(*, logits, target, adv_logits, nu=1.0, ignore_index=-100, reduction="mean", **kw):
        rows = fn(logits=logits, target=target, adv_logits=adv_logits, nu=0.0, ignore_index=ignore_index,
                  reduction="none", **kw)
        active = target != ignore_index
        norm = torch.linalg.vector_norm((adv_logits - logits).float(), dim=1)
        rows = rows + torch.where(active, nu * norm, torch.zeros_like(norm)).to(rows.dtype)
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / active.sum()

    return port


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the clean logits twice (statistics, then the norm with the adversarial logits)
    and the adversarial logits once; backward reads both once and writes both gradients. Per row:
    the label, loss and weight, and 16 bytes of saved statistics written and read back."""
    n, c = np.shape(arrays["logits"])
    passes = {"fwd": 3, "bwd": 4, "fwd+bwd": 7}[direction]
    per_row = {"fwd": 32, "bwd": 28, "fwd+bwd": 60}[direction]
    return float(passes * n * c * itemsize + per_row * n)


def _bench_cases():
    def inputs(n, c):
        def make(rng):
            z = rng.standard_normal((n, c), dtype=np.float32)
            adv = z + np.float32(0.1) * rng.standard_normal((n, c), dtype=np.float32)
            return {"logits": z, "adv_logits": adv, "target": rng.integers(0, c, n)}, {}

        return make

    return tuple(BenchCase(f"{n}x{c}", inputs(n, c), ("logits", "adv_logits"), smoke=inputs(4, 40))
                 for n, c in ((8192, 32000), (4096, 128256)))


SMOOTH_ADV_COMP_SUM = row_loss_spec(
    "smooth_adv_comp_sum_loss", 13,
    "Comp-sum loss plus nu times the l2 change of the label-relative margins under adversarial logits.",
    module="smooth_adv_comp_sum_loss",
    samples=_samples,
    examples=_edge_cases,
    grad_inputs=("logits", "adv_logits"),
    bad_inputs=row_bad_inputs({"tau": 1.0, "nu": 1.0}, extra=_adv_zeros) + (
        bad_hyper("tau", -0.5, ">= 0", _adv_zeros),
        bad_hyper("nu", -1.0, ">= 0", _adv_zeros),
        BadInput("adv_logits of another shape", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "adv_logits": np.zeros((2, 4))}, {}),
            ValueError, "adv_logits"),
        BadInput("1-D adv_logits", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "adv_logits": np.zeros(3)}, {}),
            ValueError, "adv_logits"),
        BadInput("boolean adv_logits", lambda: (
            {"logits": np.zeros((2, 3)), "target": np.array([0, 1]), "adv_logits": np.zeros((2, 3), bool)}, {}),
            TypeError, "adv_logits"),
    ),
    bench_cases=_bench_cases(),
    bytes_moved=_bytes,
    wrong_ports={
        **ROW_LOSS_WRONG_PORTS,
        "norm of the raw score change": _full_vector_norm,
        # As a TRADES-style port that detaches the adversarial branch: no gradient reaches adv_logits.
        "adversarial logits detached": wrong_ports.replaces_argument("adv_logits", lambda a, kw: a.detach() + 0.0 * a),
    },
    properties=("nu = 0 equals comp_sum_loss; adding a per-row constant to either logit row leaves the loss "
                "unchanged (tested)",),
)

register(SMOOTH_ADV_COMP_SUM)
