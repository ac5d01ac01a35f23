"""Spec of DRM's entropy-weighted head ensemble (P32, ``drm_ensemble``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed

REF = "twinops.reference.classification.drm_ensemble"
ACC = "twinops.accelerated.classification.drm_ensemble"
BASE = "twinops.conformance.baselines.classification.drm_ensemble"

HEADS = {"ci": (2, 3, 4, 5), "dev": (2, 3, 4, 5, 7, 9), "gpu": (2, 4, 7, 17)}
BATCH = {"ci": (1, 2, 3, 5), "dev": (1, 2, 3, 5, 8), "gpu": (1, 8, 257)}
CLASSES = {"ci": (1, 2, 3, 7, 15, 16, 17, 33), "dev": (1, 2, 7, 15, 16, 17, 31, 32, 33, 65),
           "gpu": (2, 7, 345, 511, 512, 513, 1000)}
GAMMAS = (-1.0, 0.0, 0.5, 1.0, 5.0)
LAYOUTS_3D = ("contiguous", "strided", "row_strided")


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    heads, batch, c = (draw(st.sampled_from(HEADS[profile])), draw(st.sampled_from(BATCH[profile])),
                       draw(st.sampled_from(CLASSES[profile])))
    gamma = draw(st.sampled_from(GAMMAS) | st.floats(-3.0, 5.0))
    # Selection needs entropies fp32 can order: at scale 1e-3 every head sits at log C - O(1e-6).
    scale = draw(st.sampled_from((1.0, 4.0, 30.0) if gamma < 0 else (1e-3, 1.0, 4.0, 30.0)))
    # Heads of different sharpness, as trained heads are.
    logits = rng.normal(size=(heads, batch, c)) * scale * rng.uniform(0.3, 1.5, size=(heads, 1, 1))
    if draw(st.booleans()) and heads > 2:  # duplicate heads: exact entropy ties, lowest index wins
        logits[heads - 2] = logits[0]
    kwargs = {"gamma": gamma, "include_shared_head_in_sum": draw(st.booleans())}
    return Sample({"logits": logits}, kwargs, ("logits",), {"logits": draw(st.sampled_from(LAYOUTS_3D))},
                  note=f"scale={scale:g}")


def _edges() -> list[Sample]:
    rng = np.random.default_rng(32)
    base = rng.normal(size=(4, 3, 5)) * 2.0
    nan, pinf, ninf, allninf = base.copy(), base.copy(), base.copy(), base.copy()
    nan[1, 0, 2] = np.nan
    pinf[3, 1, 4] = np.inf
    ninf[:, 2, 1] = -np.inf
    allninf[2, 0, :] = -np.inf
    onehot = base.copy()
    onehot[1, :, 0] = 1e4  # a (numerically) one-hot head: entropy clamps to 1e-12
    clamped = base.copy()
    clamped[0, :, 3] = clamped[2, :, 1] = 1e4  # two one-hot heads on different classes: a tie at 1e-12
    single = rng.normal(size=(3, 2, 1))
    cases = [
        (nan, "NaN in head 1, sample 0"),
        (pinf, "+inf in the shared head, sample 1"),
        (ninf, "a -inf (masked-out) class in sample 2"),
        (allninf, "head 2 all -inf for sample 0"),
        (onehot, "a one-hot head"),
        (clamped, "two one-hot heads (clamped entropies tie)"),
        (single, "one class: every entropy clamps"),
        (base[:, :0], "empty batch"),
    ]
    out = []
    for x, note in cases:
        for gamma, include in ((-1.0, False), (1.0, False), (5.0, True), (0.0, False)):
            out.append(Sample({"logits": x}, {"gamma": gamma, "include_shared_head_in_sum": include},
                              ("logits",), note=note))
    return out


def _bad(description, error, match, x=None, **kwargs):
    return BadInput(description, lambda: ({"logits": np.zeros((3, 2, 4)) if x is None else x}, kwargs), error, match)


BAD_INPUTS = (
    _bad("2-D logits (no head axis)", ValueError, "logits", np.zeros((2, 4))),
    _bad("one head only", ValueError, "2 heads", np.zeros((1, 2, 4))),
    _bad("no classes", ValueError, "class", np.zeros((3, 2, 0))),
    _bad("boolean logits", TypeError, "logits", np.zeros((3, 2, 4), dtype=bool)),
    _bad("gamma NaN", ValueError, "gamma", gamma=float("nan")),
    _bad("gamma not a number", TypeError, "gamma", gamma="1"),
    _bad("include_shared_head_in_sum not a bool", TypeError, "include_shared_head_in_sum",
         include_shared_head_in_sum=1),
)


def _bench_inputs(heads, batch, c):
    def make(rng):
        logits = rng.standard_normal((heads, batch, c), dtype=np.float32) * 3.0
        return {"logits": logits}, {"gamma": 1.0}
    return make


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads the (D+1, B, C) logits once (the second pass hits L2) and writes (B, C)."""
    heads, batch, c = np.shape(arrays["logits"])
    return float((heads + 1) * batch * c * itemsize)


def _drops_shared_weight(fn):
    """Normalises the weights over the domain heads only (the shared head left out of the normaliser)."""
    def port(*, logits, gamma=1.0, include_shared_head_in_sum=False):
        if gamma < 0 or include_shared_head_in_sum:
            return fn(logits=logits, gamma=gamma, include_shared_head_in_sum=include_shared_head_in_sum)
        return fn(logits=logits[:-1], gamma=gamma, include_shared_head_in_sum=True)
    return port


def _selects_highest_index_on_ties(fn):
    """Breaks entropy ties towards the highest head index (heads reversed)."""
    def port(*, logits, gamma=1.0, include_shared_head_in_sum=False):
        if gamma >= 0:
            return fn(logits=logits, gamma=gamma, include_shared_head_in_sum=include_shared_head_in_sum)
        return fn(logits=logits.flip(0), gamma=gamma, include_shared_head_in_sum=include_shared_head_in_sum)
    return port


DRM_ENSEMBLE = Spec(
    name="drm_ensemble",
    paper=32,
    family="classification",
    summary="DRM's test-time combination of D domain heads and a shared head, weighted by prediction entropy "
            "(or the lowest-entropy head per sample).",
    reference=f"{REF}:drm_ensemble",
    reference_grad=None,
    accelerated=f"{ACC}:drm_ensemble",
    baseline=f"{BASE}:drm_ensemble",
    samples=lambda profile, dtype: _samples(profile, dtype),
    tolerance=Tolerance(
        rtol={"float64": 1e-10, "float32": 2e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
        atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
        reasons=("float32 rtol 2e-5: the weights are H^(-gamma), so an fp32 entropy's relative error "
                 "reaches the output multiplied by gamma (up to 5 in the samples).",
                 "atol grows with sqrt(C): each entropy is a reduction over the C classes."),
    ),
    reduction_length=lambda sample: int(np.shape(sample.arrays["logits"])[-1]),
    bad_inputs=BAD_INPUTS,
    examples=_edges,
    bench_cases=(BenchCase("D+1=4 heads x B=4096 x C=345 (DomainNet)", _bench_inputs(4, 4096, 345), ("logits",),
                           smoke=_bench_inputs(4, 3, 20)),),
    bytes_moved=_bytes,
    properties=("ties in the lowest entropy go to the lowest head index (duplicate heads in the samples)",
                "include_shared_head_in_sum=True rows sum to 1 (tested)",
                "not trained through: no gradient (the combination only yields pseudo-labels)"),
    wrong_ports={"normalises over the domain heads only": _drops_shared_weight,
                 "breaks entropy ties towards the highest head index": _selects_highest_index_on_ties},
)

register(DRM_ENSEMBLE)
