"""Spec of masked mean pooling (P31): mean of the kept token states, optionally L2-normalised."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_DIMS, seed, upstream_grad

NAME = "masked_mean_pool"
REF = f"twinops.reference.metric.{NAME}"
ACC = f"twinops.accelerated.metric.{NAME}"
BASE = f"twinops.conformance.baselines.metric.{NAME}"

BATCH = {"ci": (1, 2, 3), "dev": (1, 2, 3, 5), "gpu": (1, 3, 8, 64)}
TOKENS = {"ci": (1, 2, 15, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 31, 32, 33, 64), "gpu": (1, 31, 32, 33, 512, 2049)}
LAYOUTS_3D = ("contiguous", "strided", "row_strided")  # "transposed" is a 2-D layout

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(T): each output is an fp32 sum over up to T token states.",
        "atol scales with the row's largest entry: a mean that nearly cancels keeps the rounding error "
        "of the sum's largest terms (with normalize=True, of the row's norm).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _masks(draw, rng, b: int, t: int) -> np.ndarray:
    mode = draw(st.sampled_from(("right-padded", "right-padded", "scattered", "all kept", "some rows empty")))
    if mode == "all kept":
        return np.ones((b, t), dtype=np.int64)
    if mode == "scattered":
        return (rng.random((b, t)) < 0.5).astype(np.int64)
    lengths = rng.integers(0 if mode == "some rows empty" else 1, t + 1, size=b)
    if mode == "some rows empty":
        lengths[0] = 0
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(BATCH[profile]))
    t = draw(st.sampled_from(TOKENS[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
    hidden = rng.normal(size=(b, t, d)) * scale + rng.normal() * scale
    mask = _masks(draw, rng, b, t)
    if draw(st.booleans()) and (mask == 0).any():
        hidden[mask == 0] = np.nan  # padding garbage must never be read
    if draw(st.booleans()):
        mask = mask.astype(bool)
    kwargs = {"normalize": draw(st.booleans()), "eps": draw(st.sampled_from((1e-12, 1e-6)))}
    layouts = {"hidden": draw(st.sampled_from(LAYOUTS_3D)), "mask": draw(st.sampled_from(("contiguous", "strided")))}
    return Sample(
        arrays={"hidden": hidden, "mask": mask},
        kwargs=kwargs,
        float_inputs=("hidden",),
        layouts=layouts,
        grad_out=upstream_grad(rng, (b, d)),
        note=f"scale={scale:g}, mask dtype={mask.dtype}",
    )


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3, 5, 4))
    m = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
    nan_kept, nan_pad, inf_kept = h.copy(), h.copy(), h.copy()
    nan_kept[0, 1, 2] = np.nan
    nan_pad[0, 4, :] = np.nan
    inf_kept[2, 2, 0] = np.inf
    cases = [
        (h, m, "an all-masked row (row 1): zero embedding, zero gradient"),
        (nan_kept, m, "NaN in a kept token: its row NaN"),
        (nan_pad, m, "NaN in padding: ignored"),
        (inf_kept, m, "inf in a kept token"),
        (np.zeros((3, 5, 4)), np.ones((3, 5), dtype=np.int64), "zero states: normalize keeps the zero vector"),
        (h[:, :0], m[:, :0], "T = 0: every row empty"),
        (h[:0], m[:0], "B = 0: empty result"),
        (h, np.where(m > 0, 7, 0), "mask entries other than 1 count as kept"),
    ]
    out = []
    for normalize in (False, True):
        for x, mask, note in cases:
            out.append(Sample({"hidden": x, "mask": mask}, {"normalize": normalize, "eps": 1e-12}, ("hidden",),
                              grad_out=upstream_grad(rng, (x.shape[0], x.shape[2])), note=note))
    return out


def _bad(description, error, match, h=(2, 3, 4), m=(2, 3), mask_dtype=np.int64, **kwargs):
    return BadInput(description, lambda: ({"hidden": np.ones(h), "mask": np.ones(m, dtype=mask_dtype)}, kwargs),
                    error, match)


BAD_INPUTS = (
    _bad("2-D hidden", ValueError, "hidden", h=(2, 4)),
    _bad("mask of the wrong shape", ValueError, "mask", m=(2, 4)),
    _bad("mask batch differs", ValueError, "mask", m=(3, 3)),
    _bad("float mask", TypeError, "mask", mask_dtype=np.float64),
    _bad("eps = 0", ValueError, "eps", eps=0.0),
    _bad("eps = NaN", ValueError, "eps", eps=float("nan")),
    _bad("normalize not a bool", TypeError, "normalize", normalize="yes"),
)


def _bench(b: int, t: int, d: int) -> BenchCase:
    """Right-padded sequences with lengths uniform in [T/2, T] (an int64 attention mask)."""

    def build(rng, b, t, d):
        lengths = rng.integers(t // 2, t + 1, size=b)
        mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
        return {"hidden": rng.standard_normal((b, t, d), dtype=np.float32), "mask": mask}, {}

    return BenchCase(f"B={b} T={t} D={d}", lambda rng: build(rng, b, t, d), ("hidden",),
                     smoke=lambda rng: build(rng, 2, 16, 8))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the kept token states (padding is never read), the mask, and writes (B, D);
    backward reads the mask and the (B, D) gradient and writes all (B, T, D) token gradients."""
    b, t, d = np.shape(arrays["hidden"])
    mask = np.asarray(arrays["mask"])
    kept = float(np.count_nonzero(mask))
    small = b * t * mask.itemsize + b * d * itemsize
    fwd = kept * d * itemsize + small
    bwd = b * t * d * itemsize + small
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _fd_skip(sample: Sample) -> str | None:
    """Finite differences cannot see the normalisation's clamp: a kept row whose mean is within a
    step of 0 jumps to a unit vector under any perturbation."""
    if not sample.kwargs["normalize"]:
        return None
    h, keep = np.asarray(sample.arrays["hidden"]), np.asarray(sample.arrays["mask"]) != 0
    with np.errstate(invalid="ignore"):
        norms = np.linalg.norm(np.where(keep[:, :, None], h, 0.0).sum(axis=1), axis=1)
    if np.any(keep.any(axis=1) & (norms < 1e-3)):
        return ("finite differences skip normalize=True samples with a kept row whose mean is ~0 (the eps "
                "clamp); that gradient, grad / eps, is pinned by a reference test")
    return None


def _ignores_mask(fn):
    import torch

    return lambda **kw: fn(**{**kw, "mask": torch.ones_like(kw["mask"])})


def _divides_by_length(fn):
    """Sum of the kept tokens over T instead of over the kept count."""

    def port(**kw):
        out = fn(**kw)
        count = (kw["mask"] != 0).sum(dim=1, keepdim=True).clamp(min=1).to(out.dtype)
        return out * count / max(kw["mask"].shape[1], 1)

    return port


MASKED_MEAN_POOL = Spec(
    name=NAME,
    paper=31,
    family="metric",
    summary="Mean of the kept token states per sequence (padding never read), optionally L2-normalised.",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("hidden",),
    tolerance=TOLERANCE,
    reduction_length=lambda sample: int(np.shape(sample.arrays["hidden"])[1]),
    fd_skip=_fd_skip,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(256, 512, 1024),),
    bytes_moved=_bytes,
    properties=("an all-masked row gives the zero vector and a zero gradient",
                "NaN in padding never reaches the output or the gradient"),
    wrong_ports={"ignores the mask": _ignores_mask, "divides by T instead of the kept count": _divides_by_length},
)

register(MASKED_MEAN_POOL)
