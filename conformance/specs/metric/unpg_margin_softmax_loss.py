"""Spec of UNPG (P50): ArcFace / CosFace margin softmax with the whisker-filtered in-batch negative
pairs as shared extra logits."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, embeddings, seed, upstream_grad

REF = "twinops.reference.metric.unpg_margin_softmax_loss"
ACC = "twinops.accelerated.metric.unpg_margin_softmax_loss"
BASE = "twinops.conformance.baselines.metric.unpg_margin_softmax_loss"

FLOATS = ("embeddings", "weight")
CLASS_COUNTS = {
    "ci": (1, 2, 3, 7, 16, 17, 33),
    "dev": (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 65),
    "gpu": (2, 63, 64, 65, 1000, 4097, 10000),
}

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-5, "float16": 3e-4, "bfloat16": 1e-3},
    atol_scales_with_row=True,
    reasons=(
        "fp32 rtol 1e-4 / atol 1e-5: every logit is s * cos with s up to 64, so the fp32 rounding of a "
        "cosine (~1e-7 sqrt(D)) becomes ~1e-5 in the logits, and the loss -z_y + lse is a difference of "
        "two such terms.",
        "atol grows with sqrt(C + B + D): each row's log-sum-exp adds C class terms and up to B^2/2 pair "
        "terms, each gradient row sums C class and B pair contributions, each cosine D products.",
        "atol scales with the row's largest entry: a gradient row is a sum of terms s * p * w_hat / |x| "
        "whose fp32 error is relative to the largest of them, not to entries that nearly cancel.",
        "16-bit inputs: the backward multiplies the in-tile softmax weights rounded to the input dtype by "
        "the normalised class centres / embeddings, also rounded (as flash-attention does with P @ V): "
        "both operands carry a relative error of 2^-11 in fp16, so fp16 atol is 3e-4 of the gradient "
        "row's largest entry (the normalisation's projection then cancels most of an entry). The loss is "
        "returned in the input dtype. Outputs also pass when no worse than 2x the eager baseline + atol.",
        "bfloat16 (GPU lane only; the interpreter cannot run bf16 dots): the eager-baseline rule, the "
        "baseline itself rounding every cosine to bf16 before the scale of 64.",
    ),
)

MARGINS = {"arcface": (0.5, 0.3, 0.0), "cosface": (0.5, 0.35, 0.0)}


def _hyper(draw, scale_cap: float = 64.0) -> dict:
    margin_type = draw(st.sampled_from(("arcface", "cosface")))
    kw = {"margin_type": margin_type}
    kw["scale"] = min(scale_cap, draw(st.sampled_from((64.0, 30.0, 4.0, 1.0)) | st.floats(0.5, 64.0)))
    kw["margin"] = draw(st.sampled_from(MARGINS[margin_type]) | st.floats(0.0, 1.0))
    kw["whisker"] = draw(st.sampled_from((1.5, 1.0, 0.0, 0.3)) | st.floats(0.0, 3.0))
    kw["reduction"] = draw(st.sampled_from(("mean", "sum", "none")))
    return kw


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(EMBED_BATCH[profile]))
    # D = 1 is left out: every cosine is then +-1 and the whisker bounds tie at rounding level (see the
    # reference's Semantics on ties at the bounds).
    d = draw(st.sampled_from([n for n in EMBED_DIMS[profile] if n >= 2]))
    c = draw(st.sampled_from(CLASS_COUNTS[profile]))
    identities = draw(st.sampled_from(("one", "few", "many")))  # how many labels the batch holds
    n_ids = {"one": 1, "few": min(c, 3), "many": c}[identities]
    labels = rng.choice(rng.permutation(c)[:n_ids], size=b).astype(np.int64)
    x = embeddings(rng, b, d, scale=draw(st.sampled_from((1.0, 0.1, 10.0))))
    w = embeddings(rng, c, d, scale=draw(st.sampled_from((1.0, 0.05))))
    mode = draw(st.sampled_from(("plain", "plain", "duplicate embedding", "duplicate centre", "near target")))
    if mode == "duplicate embedding" and b > 2:
        x[1] = x[0]  # identical embeddings: a negative pair of cosine 1 when their labels differ
    elif mode == "duplicate centre" and c > 1:
        w[1] = w[0]
    elif mode == "near target":
        # Target cosine within ~1e-5 of 1: the ArcFace slope sin(theta + m) / sin(theta) is in the hundreds.
        x[0] = w[labels[0]] * 3.0 + 1e-3 * rng.normal(size=d)
    kwargs = _hyper(draw)
    layouts = {"embeddings": draw(st.sampled_from(LAYOUTS)), "weight": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["labels"] = "strided"
    grad_shape = (b,) if kwargs["reduction"] == "none" else ()
    return Sample({"embeddings": x, "labels": labels, "weight": w}, kwargs, FLOATS, layouts=layouts,
                  grad_out=upstream_grad(rng, grad_shape), note=f"identities={identities}, {mode}")


def _examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    b, d, c = 6, 5, 4
    x, w = rng.normal(size=(b, d)), rng.normal(size=(c, d))
    y = np.array([0, 1, 2, 3, 1, 0])

    def sample(x=x, y=y, w=w, note="", reduction="none", **kw):
        grad = upstream_grad(rng, (len(y),) if reduction == "none" else ())
        return Sample({"embeddings": x, "labels": np.asarray(y), "weight": w}, dict(kw, reduction=reduction),
                      FLOATS, grad_out=grad, note=note)

    nan_x, inf_x, zero_x = x.copy(), x.copy(), x.copy()
    nan_x[2, 1], inf_x[4, 0], zero_x[3] = np.nan, np.inf, 0.0
    one_id = np.zeros(b, dtype=np.int64)
    return [
        sample(note="authors' defaults: ArcFace s=64 m=0.5 w=1.5"),
        sample(note="CosFace, mean", margin_type="cosface", margin=0.35, reduction="mean"),
        sample(w=w[:1], y=one_id, note="one class, one identity: no negative pair, E = 0", reduction="sum"),
        sample(x=x[:1], y=y[:1], note="B = 1"),
        sample(x=np.concatenate([x[:3], w[:3] * 2.0]), y=np.array([0, 1, 2, 0, 1, 2]),
               note="embeddings parallel to their class centres (target cosine 1, beyond the clamp)"),
        sample(x=nan_x, note="NaN embedding with negative partners: every row NaN through E"),
        sample(x=nan_x, y=one_id, note="NaN embedding without a negative partner: only its row NaN"),
        sample(x=inf_x, note="inf embedding: NaN row, every row NaN through E", margin_type="cosface"),
        sample(x=zero_x, note="zero embedding row: x / eps", scale=4.0),
    ]


def _fd_skip(sample: Sample) -> str | None:
    x = np.asarray(sample.arrays["embeddings"])
    w = np.asarray(sample.arrays["weight"])
    if np.any(np.linalg.norm(x, axis=1) == 0) or np.any(np.linalg.norm(w, axis=1) == 0):
        return ("finite differences skip zero rows: x / max(|x|, eps) switches from the eps branch to the "
                "normalised branch within any step; the eps-branch gradient g / eps is pinned by the kernels' "
                "agreement with the reference")
    return None


def _bad_inputs() -> tuple[BadInput, ...]:
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    y = np.array([0, 1, 4])

    def call(x=x, y=y, w=w, **kw):
        return lambda: ({"embeddings": x, "labels": np.asarray(y), "weight": w}, kw)

    return (
        BadInput("label >= C", call(y=np.array([0, 5, 1])), ValueError, "labels", data_dependent=True),
        BadInput("negative label", call(y=np.array([0, -1, 1])), ValueError, "labels", data_dependent=True),
        BadInput("empty batch", call(x=x[:0], y=y[:0]), ValueError, "embeddings"),
        BadInput("no class centres", call(w=w[:0]), ValueError, "weight"),
        BadInput("zero-width embeddings", call(x=x[:, :0], w=w[:, :0]), ValueError, "embeddings"),
        BadInput("1-D embeddings", call(x=x[0]), ValueError, "embeddings"),
        BadInput("weight width differs from D", call(w=w[:, :3]), ValueError, "weight"),
        BadInput("labels length differs from B", call(y=np.array([0, 1])), ValueError, "labels"),
        BadInput("float labels", call(y=np.array([0.0, 1.0, 2.0])), TypeError, "labels"),
        BadInput("unknown margin_type", call(margin_type="sphereface"), ValueError, "margin_type"),
        BadInput("scale = 0", call(scale=0.0), ValueError, "scale"),
        BadInput("non-finite scale", call(scale=float("inf")), ValueError, "scale"),
        BadInput("negative margin", call(margin=-0.1), ValueError, "margin"),
        BadInput("NaN margin", call(margin=float("nan")), ValueError, "margin"),
        BadInput("negative whisker", call(whisker=-1.0), ValueError, "whisker"),
        BadInput("eps = 0", call(eps=0.0), ValueError, "eps"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
    )


def _reduction_length(sample: Sample) -> int:
    b, d = np.shape(sample.arrays["embeddings"])
    return int(np.shape(sample.arrays["weight"])[0] + b + d)


# ---------------------------------------------------------------------------- benchmarks

BENCH_SHAPES = ((512, 512, 85742), (1024, 512, 85742), (1024, 512, 10000))


def _bench_case(b: int, d: int, c: int) -> BenchCase:
    def arrays(rng, b, d, c):
        return {"embeddings": rng.standard_normal((b, d), dtype=np.float32),
                "labels": rng.integers(0, c, b).astype(np.int64),
                "weight": rng.standard_normal((c, d), dtype=np.float32)}, {}

    return BenchCase(f"B={b} D={d} C={c}", lambda rng: arrays(rng, b, d, c), FLOATS,
                     smoke=lambda rng: arrays(rng, 20, 24, 40))


def _flops(arrays: dict, direction: str) -> float:
    """FLOPs the kernels execute, recomputation included. Forward: the class logits once (2BCD) and
    the upper triangle of the pair cosines three times (two radix-select passes and the sum-exp pass,
    B^2 D each). Backward: the class logits twice (row pass and column pass, 2BCD each) plus the two
    gradient products (2BCD each); the pair tiles of both orientations recomputed and multiplied
    (4 B^2 D)."""
    b, d = np.shape(arrays["embeddings"])
    c = np.shape(arrays["weight"])[0]
    fwd = 2.0 * b * c * d + 3.0 * b * b * d
    bwd = 8.0 * b * c * d + 4.0 * b * b * d
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Compulsory traffic: the forward reads the class centres and embeddings once; the backward reads
    the class centres twice (row and column passes), writes their gradient, and reads and writes the
    embeddings; 16 bytes of statistics per row."""
    b, d = np.shape(arrays["embeddings"])
    c = np.shape(arrays["weight"])[0]
    fwd = (c * d + b * d) * itemsize + 16 * b
    bwd = (3 * c * d + 2 * b * d) * itemsize + 16 * b
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


# ---------------------------------------------------------------------------- wrong ports


def _eager_variant(pairs: str):
    """A port built on the eager baseline with one part of the pair term changed."""

    def wrap(fn):
        from twinops.conformance.baselines.metric.unpg_margin_softmax_loss import _unpg

        return lambda **kw: _unpg(**kw, pairs=pairs)

    return wrap


def _every_target_class_zero(fn):
    """Labels dropped on the way to the kernel: every row's target column (and so its margin) is
    class 0, and every pair counts as a positive."""
    import torch

    def port(**kw):
        return fn(**dict(kw, labels=torch.zeros_like(kw["labels"])))

    return port


UNPG = Spec(
    name="unpg_margin_softmax_loss",
    paper=50,
    family="metric",
    summary="UNPG: ArcFace/CosFace margin softmax over the class centres with the whisker-filtered in-batch "
            "negative pairs as shared extra logits, fused so neither the B x C logits nor the B x B cosines "
            "are stored.",
    reference=f"{REF}:unpg_margin_softmax_loss",
    reference_grad=f"{REF}:unpg_margin_softmax_loss_grad",
    accelerated=f"{ACC}:unpg_margin_softmax_loss",
    baseline=f"{BASE}:unpg_margin_softmax_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("embeddings", "weight"),
    tolerance=TOLERANCE,
    reduction_length=_reduction_length,
    bad_inputs=_bad_inputs(),
    bench_cases=tuple(_bench_case(*shape) for shape in BENCH_SHAPES),
    flops=_flops,
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=(
        "the whisker bounds Q1 - w IQR and Q3 + w IQR carry no gradient; the kept pair cosines do",
        "with no negative pair in the batch (B = 1 or one identity) the loss is plain ArcFace / CosFace",
    ),
    wrong_ports={
        "no in-batch negatives (plain ArcFace/CosFace)": _eager_variant("none"),
        "no whisker filter": _eager_variant("all"),
        "positive pairs counted as negatives": _eager_variant("any label"),
        "labels ignored (every target is class 0)": _every_target_class_zero,
    },
)

register(UNPG)
