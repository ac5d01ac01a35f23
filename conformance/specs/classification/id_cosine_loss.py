"""Spec of DreamID's identity loss (P4, ``id_cosine_loss``): 1 - cos(pred, source) per row."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad

REF = "twinops.reference.classification.id_cosine_loss"
ACC = "twinops.accelerated.classification.id_cosine_loss"
BASE = "twinops.conformance.baselines.classification.id_cosine_loss"

INPUTS = ("pred", "source")
REDUCTIONS = ("mean", "sum", "none")
NORMS = (None, 0.5, 5.0, 30.0)  # row norms: None = unit rows; ArcFace's raw embeddings have norms ~20-30

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D) (sqrt(B·D) for a mean or sum): each cosine is a D-term dot product and "
        "two D-term norms in fp32.",
        "atol grows with 1 + 1/r, r the smallest row norm of the input: a gradient entry is the difference "
        "of two terms of size 1/r (v / |u||v| and cos u / |u|^2), which nearly cancel for nearly parallel "
        "rows and keep the fp32 rounding of the terms.",
        "atol scales with the largest entry of each gradient row, for the same reason.",
    ),
)


def _rows(rng, b, d, norm):
    x = rng.normal(size=(b, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x * (1.0 if norm is None else norm)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(EMBED_BATCH[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    nu, nv = draw(st.sampled_from(NORMS)), draw(st.sampled_from(NORMS))
    u = _rows(rng, b, d, nu)
    relation = draw(st.sampled_from(("independent", "independent", "close", "opposite", "mixed")))
    v = _rows(rng, b, d, nv)
    scale_v = np.linalg.norm(v, axis=1, keepdims=True)
    if relation == "close":  # a well-trained swap: cos near 1 (loss near 0)
        v = (u / np.linalg.norm(u, axis=1, keepdims=True) + 0.05 * v / scale_v) * scale_v
    elif relation == "opposite":
        v = -u / np.linalg.norm(u, axis=1, keepdims=True) * scale_v + 0.1 * v
    elif relation == "mixed":
        v = np.where(rng.random((b, 1)) < 0.5, u * 1.5, v)
    reduction = draw(st.sampled_from(REDUCTIONS))
    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in INPUTS if draw(st.booleans())}
    return Sample(
        arrays={"pred": u, "source": v},
        kwargs={"eps": draw(st.sampled_from((1e-8, 1e-8, 1e-6, 1e-3))), "reduction": reduction},
        float_inputs=INPUTS, layouts=layouts,
        grad_out=upstream_grad(rng, (b,) if reduction == "none" else ()),
        note=f"rows {relation}, norms {nu or 1:g}/{nv or 1:g}",
    )


def _examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    u = _rows(rng, 5, 7, 3.0)
    v = _rows(rng, 5, 7, 2.0)
    zero_u, zero_v, zero_both, nan, inf = u.copy(), v.copy(), u.copy(), u.copy(), u.copy()
    zero_u[1] = 0.0
    zero_v[2] = 0.0
    zero_both[3] = 0.0
    nan[0, 3], inf[4, 1] = np.nan, np.inf
    v_both = v.copy()
    v_both[3] = 0.0
    cases = (
        (zero_u, v, "zero pred row: loss 1, gradient -v / eps"),
        (u, zero_v, "zero source row: loss 1, gradient -u / eps"),
        (zero_both, v_both, "zero pred and source rows: loss 1, gradient 0"),
        (u, 2.0 * u, "parallel rows: loss 0"),
        (u, -0.5 * u, "opposite rows: loss 2"),
        (u[:1], v[:1], "one row (B = 1)"),
        (u[:, :1], v[:, :1], "one feature (D = 1): cos = +-1, gradient 0"),
        (nan, v, "NaN in row 0"),
        (inf, v, "+inf in row 4"),
    )
    out = []
    for i, (a, b, note) in enumerate(cases):
        reduction = REDUCTIONS[i % 3]
        out.append(Sample({"pred": a, "source": b}, {"eps": 1e-8, "reduction": reduction}, INPUTS,
                          grad_out=upstream_grad(rng, (len(a),) if reduction == "none" else ()), note=note))
    return out


def _fd_skip(sample: Sample):
    if "zero" in sample.note:
        return "zero rows sit inside the eps clamp, closer to its edge than the finite-difference step"
    return None


def _length(sample: Sample) -> float:
    u, v = (np.asarray(sample.arrays[k], dtype=np.float64) for k in INPUTS)
    b, d = u.shape
    norms = np.concatenate([np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)])
    norms = norms[np.isfinite(norms) & (norms > 0)]
    smallest = float(norms.min()) if norms.size else 1.0
    rows = 1 if sample.kwargs.get("reduction", "mean") == "none" else b
    return rows * d * (1.0 + 1.0 / smallest) ** 2


def _bad(description, error, match, pred=None, source=None, **kwargs) -> BadInput:
    pred = np.ones((3, 4)) if pred is None else pred
    source = np.ones((3, 4)) if source is None else source
    return BadInput(description, lambda: ({"pred": pred, "source": source}, kwargs), error, match)


BAD_INPUTS = (
    _bad("source shape differs from pred", ValueError, "source", source=np.ones((3, 5))),
    _bad("source with fewer rows", ValueError, "source", source=np.ones((2, 4))),
    _bad("1-D pred", ValueError, "pred", pred=np.ones(4)),
    _bad("3-D pred", ValueError, "pred", pred=np.ones((3, 2, 2))),
    _bad("boolean source", TypeError, "source", source=np.ones((3, 4), dtype=bool)),
    _bad("empty batch (B = 0)", ValueError, "pred", pred=np.ones((0, 4)), source=np.ones((0, 4))),
    _bad("no features (D = 0)", ValueError, "pred", pred=np.ones((3, 0)), source=np.ones((3, 0))),
    _bad("eps = 0", ValueError, "eps", eps=0.0),
    _bad("eps < 0", ValueError, "eps", eps=-1e-8),
    _bad("eps = nan", ValueError, "eps", eps=float("nan")),
    _bad("unknown reduction", ValueError, "reduction", reduction="avg"),
)


def _bench(b: int, d: int) -> BenchCase:
    def make_inputs(rows, cols):
        def make(rng):
            u = rng.standard_normal((rows, cols), dtype=np.float32)
            return {"pred": u, "source": (u + rng.standard_normal((rows, cols), dtype=np.float32)) * 20}, {}

        return make

    return BenchCase(f"B{b}xD{d} (ArcFace embeddings; launch-bound)", make_inputs(b, d), INPUTS,
                     smoke=make_inputs(4, 40))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads both embeddings; backward reads both again and writes both gradients."""
    b, d = np.shape(arrays["pred"])
    return float({"fwd": 2, "bwd": 4, "fwd+bwd": 6}[direction] * b * d * itemsize + 12 * b)


def _norms_clamped_separately(fn):
    """``torch.nn.functional.cosine_similarity``: each norm clamped at eps, not their product (the
    gradient at a zero row is -v / (eps |v|) instead of -v / eps)."""

    def port(*, pred, source, eps=1e-8, reduction="mean"):
        import torch

        u, v = pred.double(), source.double()
        cos = (u * v).sum(1) / (torch.linalg.vector_norm(u, dim=1).clamp_min(eps)
                                * torch.linalg.vector_norm(v, dim=1).clamp_min(eps))
        loss = 1 - cos
        out = loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()
        return out.to(pred.dtype)

    return port


def _source_frozen(fn):
    """A port that treats the source embedding as a constant: its gradient comes back as zeros."""
    return lambda *, pred, source, **kw: fn(pred=pred, source=source.detach(), **kw) + 0.0 * source.sum()


ID_COSINE = Spec(
    name="id_cosine_loss",
    paper=4,
    family="classification",
    summary="DreamID's identity loss 1 - cos(E(x̂), E(x_src)) per row with the eps-clamped cosine; "
            "gradients for both embeddings from one saved triple (u·v, |u|², |v|²) per row.",
    reference=f"{REF}:id_cosine_loss",
    reference_grad=f"{REF}:id_cosine_loss_grad",
    accelerated=f"{ACC}:id_cosine_loss",
    baseline=f"{BASE}:id_cosine_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=INPUTS,
    tolerance=TOLERANCE,
    reduction_length=_length,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(4096, 512),),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=("equals 1 - torch.nn.functional.cosine_similarity whenever both norms exceed eps "
                "(tested as an independent anchor)",),
    wrong_ports={
        "norms clamped separately (F.cosine_similarity)": _norms_clamped_separately,
        "source embedding never differentiated": _source_frozen,
    },
)

register(ID_COSINE)
