"""Hypothesis strategies shared by the specs.

Sizes come from lists that hit the awkward cases on purpose: batch 1, odd and prime sizes, and
sizes at Triton block boundaries ±1 (the accelerated kernels use 32-wide class blocks under the
interpreter, so 31/32/33 and 63/64/65 exercise the chunk loop; the ``gpu`` profile adds the 4096
blocks of the compiled kernels and vocabulary-sized rows).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .spec import Sample

BATCH_SIZES = {
    "ci": (1, 2, 3, 5, 8),
    "dev": (1, 2, 3, 5, 7, 8, 13, 16),
    "gpu": (1, 3, 8, 17, 64, 257),
}
CLASS_COUNTS = {
    "ci": (1, 2, 3, 7, 31, 32, 33, 65),
    "dev": (1, 2, 3, 5, 7, 31, 32, 33, 63, 64, 65, 97, 128, 129),
    "gpu": (2, 7, 33, 1000, 4095, 4096, 4097, 8193, 32000, 50257),
}
# Scale of the logits: tiny (near-uniform softmax), ordinary, large (saturated softmax).
LOGIT_SCALES = (1e-3, 1.0, 4.0, 30.0)
EXTREME_SCALE = 1e4  # fp32 only: extreme but finite logits
LAYOUTS = ("contiguous", "transposed", "strided", "row_strided")

# Metric learning: batch sizes and embedding widths around the 16-wide tiles the tiled kernels use
# under the interpreter (and the 64/128-wide tiles of the compiled kernels on the gpu profile).
EMBED_BATCH = {
    "ci": (1, 2, 3, 5, 8, 15, 16, 17, 33),
    "dev": (1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 48),
    "gpu": (2, 17, 63, 64, 65, 127, 128, 129, 257, 1000),
}
EMBED_DIMS = {
    "ci": (1, 3, 8, 16, 17, 40),
    "dev": (1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 64),
    "gpu": (3, 64, 127, 128, 129, 256, 1024),
}


def _seed(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def upstream_grad(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A random, non-uniform upstream gradient (never all ones)."""
    if shape == ():
        return np.array(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))
    return rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape)


def seed(draw) -> np.random.Generator:
    """A NumPy generator seeded by Hypothesis (so shrinking and replay work)."""
    return _seed(draw)


def embeddings(rng: np.random.Generator, b: int, d: int, *, scale: float = 1.0, normalize: bool = False) -> np.ndarray:
    """(b, d) float64 embeddings; unit rows when ``normalize`` (zero rows are left at zero)."""
    x = rng.normal(size=(b, d)) * scale
    if normalize:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1.0)
    return x


def class_labels(rng: np.random.Generator, b: int, classes: int) -> np.ndarray:
    """(b,) int64 labels in [0, classes); with ``classes`` << ``b`` most anchors have positives."""
    return rng.integers(0, max(1, classes), size=b).astype(np.int64)


@st.composite
def row_loss_samples(draw, profile: str, dtype: str, hyper, *, class_weight: bool = False, max_classes=None):
    """Inputs for a row-wise classification loss ``f(logits (N, C), target (N,), **kwargs)``.

    ``hyper(draw, scale)`` returns the technique's hyper-parameters for a given logit scale (so a
    spec can keep, e.g., ``tau < 1`` away from overflow at large scales).
    """
    rng = _seed(draw)
    n = draw(st.sampled_from(BATCH_SIZES[profile]))
    classes = [c for c in CLASS_COUNTS[profile] if max_classes is None or c <= max_classes]
    c = draw(st.sampled_from(classes))
    scales = LOGIT_SCALES + ((EXTREME_SCALE,) if dtype == "float32" else ())
    scale = draw(st.sampled_from(scales))
    logits = rng.normal(size=(n, c)) * scale + rng.normal() * scale
    ignore_index = draw(st.sampled_from((-100, -1)))
    mask_mode = draw(st.sampled_from(("none", "some", "some", "all")))
    target = rng.integers(0, c, size=n)
    if mask_mode == "some":
        target = np.where(rng.random(n) < 0.3, ignore_index, target)
    elif mask_mode == "all":
        target = np.full(n, ignore_index)
    kwargs = dict(hyper(draw, scale))
    kwargs["ignore_index"] = ignore_index
    kwargs["reduction"] = draw(st.sampled_from(("mean", "sum", "none")))
    arrays = {"logits": logits, "target": target.astype(np.int64)}
    if class_weight and draw(st.booleans()):
        arrays["weight"] = rng.uniform(0.1, 3.0, size=c)
    layouts = {"logits": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["target"] = "strided"
    grad_shape = (n,) if kwargs["reduction"] == "none" else ()
    return Sample(
        arrays=arrays,
        kwargs=kwargs,
        float_inputs=("logits", "weight") if "weight" in arrays else ("logits",),
        layouts=layouts,
        grad_out=upstream_grad(rng, grad_shape),
        note=f"scale={scale:g}, masked={mask_mode}",
    )


def row_loss_edge_cases(hyper_kwargs: dict, *, reductions=("mean", "sum", "none")) -> list[Sample]:
    """Fixed examples every run includes: an all-ignored batch, a NaN row, ±inf, constant rows,
    a one-class problem, and a -inf (masked-out) class."""
    rng = np.random.default_rng(0)
    out = []
    for reduction in reductions:
        grad = upstream_grad(rng, (3,) if reduction == "none" else ())
        logits = rng.normal(size=(3, 5))
        nan, ninf, pinf = logits.copy(), logits.copy(), logits.copy()
        nan[1, 2], ninf[:, 3], pinf[2, 1] = np.nan, -np.inf, np.inf
        cases = (
            (logits, [-100, -100, -100], "all rows ignored"),
            (nan, [0, 1, 4], "NaN in row 1"),
            (nan, [0, -100, 4], "NaN in an ignored row"),
            (ninf, [0, 1, 2], "a -inf (masked-out) class"),
            (pinf, [0, 1, 2], "+inf in row 2"),
            (np.full((3, 5), 2.5), [0, 3, 4], "constant rows"),
            (rng.normal(size=(3, 1)), [0, 0, -100], "one class"),
        )
        kw = dict(hyper_kwargs, ignore_index=-100, reduction=reduction)
        out += [Sample({"logits": x, "target": np.array(t)}, kw, ("logits",), grad_out=grad, note=note)
                for x, t, note in cases]
    return out
