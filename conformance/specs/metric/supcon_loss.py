"""Spec of the supervised contrastive loss (P58, ``supcon_loss``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, embeddings, seed, upstream_grad

REF = "twinops.reference.metric.supcon_loss"
ACC = "twinops.accelerated.metric.supcon_loss"
BASE = "twinops.conformance.baselines.metric.supcon_loss"

REDUCTIONS = ("mean", "sum", "none")
TEMPERATURES = (0.02, 0.05, 0.07, 0.1, 0.5, 1.0, 4.0)

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(N·D): every logit is a D-term dot product, and every loss and gradient "
        "row sums N terms of them.",
        "atol grows with 1 + L, L the largest |logit| of the input: an fp32 logit carries an absolute "
        "error of ~eps·L (for any fp32 implementation, eager PyTorch included), which the softmax turns "
        "into a relative error of the same size in q and in the gradient. Unit rows keep L <= 1/tau.",
        "atol scales with the largest entry of the output (the loss vector, or the gradient row): a "
        "gradient entry is a sum of N terms of either sign and keeps the fp32 rounding of those terms, "
        "which is relative to the row's scale, not to the entry after cancellation.",
        "16-bit outputs also pass when no worse than 2x the eager baseline + atol. bf16 (GPU lane only: "
        "the interpreter cannot run bf16 dots) keeps the default 1.6e-2: the logits are exact fp32 "
        "products of bf16 inputs, and the backward rounds H to bf16 before H z_J as flash-attention "
        "does, an error of the same order as the output's own rounding.",
    ),
)


def _length(sample: Sample) -> float:
    """N·D·(1 + L)^2 with L the largest finite |logit| of the sample (see the tolerance's reasons)."""
    z = np.asarray(sample.arrays["features"], dtype=np.float64)
    n, d = z.shape
    with np.errstate(invalid="ignore", over="ignore"):
        logits = np.abs(z @ z.T) / sample.kwargs.get("temperature", 0.07)
    finite = logits[np.isfinite(logits)]
    largest = float(finite.max()) if finite.size else 0.0
    return n * d * (1.0 + largest) ** 2


def _labels(rng: np.random.Generator, n: int, mode: str) -> np.ndarray:
    """``one``: a single class; ``few``: 3 classes; ``half``: ~n/2 classes, so several anchors
    have no positive; ``views``: SimCLR-style pairs (labels 0, 0, 1, 1, ...); ``distinct``: no positives."""
    classes = {"one": 1, "few": 3, "half": max(1, n // 2), "distinct": n}.get(mode)
    if mode == "views":
        return rng.permutation(np.arange(n) // 2).astype(np.int64)
    if mode == "distinct":
        return rng.permutation(n).astype(np.int64) - n // 2  # negative labels too
    return rng.integers(0, classes, size=n).astype(np.int64)


@st.composite
def _samples(draw, profile: str, dtype: str):
    """Unit rows (SupCon's use) or rows of norm ~``scale``; logits |l| <= scale^2 / tau stay below ~100
    so that fp32 logits keep a relative error the default tolerance can hold."""
    rng = seed(draw)
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    tau = draw(st.sampled_from(TEMPERATURES) | st.floats(0.02, 4.0))
    tau_b = draw(st.sampled_from((0.07, tau, 1.0)) | st.floats(0.02, 4.0))
    scale = draw(st.sampled_from((None, None, 0.3, 1.0, 2.0)))  # None: unit rows
    if scale is None:
        z = embeddings(rng, n, d, normalize=True)
    else:
        z = embeddings(rng, n, d, scale=min(scale, np.sqrt(100 * tau)) / np.sqrt(d))
    if n > 2 and draw(st.booleans()):
        z[rng.integers(0, n, size=2)] = z[0]  # duplicated rows: tied logits
    mode = draw(st.sampled_from(("few", "few", "half", "half", "views", "one", "distinct")))
    y = _labels(rng, n, mode)
    reduction = draw(st.sampled_from(REDUCTIONS))
    layouts = {"features": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["labels"] = "strided"
    return Sample(
        arrays={"features": z, "labels": y},
        kwargs={"temperature": tau, "base_temperature": tau_b, "reduction": reduction},
        float_inputs=("features",),
        layouts=layouts,
        grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
        note=f"labels={mode}, rows={'unit' if scale is None else f'scale {scale:g}'}",
    )


def _examples() -> list[Sample]:
    """Fixed edge cases, each at one reduction (cycling), so every run includes them."""
    rng = np.random.default_rng(0)
    z = embeddings(rng, 6, 5, normalize=True)
    y = np.array([0, 1, 0, 2, 1, 0])
    nan, inf, dup = z.copy(), z.copy(), z.copy()
    nan[2, 1], inf[4, 0] = np.nan, np.inf
    dup[3] = dup[5] = dup[0]
    cases = (
        (z[:1], [0], "one anchor (N = 1): no positive, loss 0"),
        (z[:2], [4, 4], "two anchors, one pair"),
        (z, [0] * 6, "one class: every other anchor is a positive"),
        (z, [0, 1, 2, 3, 4, 5], "no anchor has a positive: loss and gradient 0"),
        (z, [7, -1, 7, 3, -1, 7], "negative labels; anchor 3 has no positive"),
        (dup, y, "duplicated rows (tied logits)"),
        (z * 3.0, y, "rows of norm 3"),
        (nan, y, "NaN in row 2"),
        (inf, y, "+inf in row 4"),
    )
    out = []
    for k, (x, labels, note) in enumerate(cases):
        reduction = REDUCTIONS[k % 3]
        n = len(labels)
        out.append(Sample(
            {"features": x, "labels": np.array(labels, dtype=np.int64)},
            {"temperature": 0.1, "base_temperature": 0.07, "reduction": reduction}, ("features",),
            grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()), note=note,
        ))
    return out


def _bad(description, error, match, features=None, labels=None, **kwargs) -> BadInput:
    features = np.zeros((3, 4)) if features is None else features
    labels = np.array([0, 1, 0]) if labels is None else labels
    return BadInput(description, lambda: ({"features": features, "labels": labels}, kwargs), error, match)


BAD_INPUTS = (
    _bad("labels length differs from N", ValueError, "labels", labels=np.array([0, 1])),
    _bad("float labels", TypeError, "labels", labels=np.array([0.0, 1.0, 0.0])),
    _bad("1-D features", ValueError, "features", features=np.zeros(4)),
    _bad("SupContrast's (bsz, n_views, D) layout (flatten it first)", ValueError, "features",
         features=np.zeros((3, 2, 4))),
    _bad("empty batch (N = 0)", ValueError, "features", features=np.zeros((0, 4)), labels=np.zeros(0, np.int64)),
    _bad("no feature columns (D = 0)", ValueError, "features", features=np.zeros((3, 0))),
    _bad("temperature = 0", ValueError, "temperature", temperature=0.0),
    _bad("temperature < 0", ValueError, "temperature", temperature=-0.1),
    _bad("temperature = nan", ValueError, "temperature", temperature=float("nan")),
    _bad("temperature = inf", ValueError, "temperature", temperature=float("inf")),
    _bad("base_temperature = 0", ValueError, "base_temperature", base_temperature=0.0),
    _bad("base_temperature = nan", ValueError, "base_temperature", base_temperature=float("nan")),
    _bad("unknown reduction", ValueError, "reduction", reduction="avg"),
)


# ------------------------------------------------------------------------------------ benchmarks


def _bench_case(b: int, d: int, classes: int = 1000) -> BenchCase:
    """Unit rows, ``classes`` labels (so each anchor has ~b / classes positives)."""

    def make(rng):
        z = rng.standard_normal((b, d), dtype=np.float32)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return {"features": z, "labels": rng.integers(0, classes, b)}, {}

    def smoke(rng):
        z = rng.standard_normal((24, 40), dtype=np.float32)
        return {"features": z / np.linalg.norm(z, axis=1, keepdims=True), "labels": rng.integers(0, 5, 24)}, {}

    return BenchCase(f"B{b}xD{d}", make, ("features",), smoke=smoke, dtypes=("float32", "bfloat16"))


def _flops(arrays: dict, direction: str) -> float:
    """Tile products the kernels execute: the forward one N x N x D product (the logits); the backward
    recomputes the logits and multiplies H z (two). The eager baseline does the same three."""
    n, d = np.shape(arrays["features"])
    products = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(products * 2 * n * n * d)


# ------------------------------------------------------------------------------------ wrong ports


def _eager(features, labels, temperature, base_temperature, *, self_in_denominator=False):
    """Per-anchor losses in float64, optionally with the anchor's own logit left in its denominator."""
    import torch

    z = features.double()
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = z @ z.T / temperature
    if not self_in_denominator:
        logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positive.sum(dim=1)
    mean_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    return -(temperature / base_temperature) * mean_pos, positive, n_pos


def _reduced(loss, reduction, dtype):
    out = loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss
    return out.to(dtype)


def _self_in_denominator(fn):
    """A port that keeps exp(l_ii) in each anchor's denominator (forgets self-exclusion)."""

    def port(*, features, labels, temperature=0.07, base_temperature=0.07, reduction="mean"):
        loss, _, _ = _eager(features, labels, temperature, base_temperature, self_in_denominator=True)
        return _reduced(loss, reduction, features.dtype)

    return port


def _mean_over_anchors_with_positives(fn):
    """``"mean"`` over the anchors that have a positive only (pytorch-metric-learning's convention)."""

    def port(*, features, labels, reduction="mean", **kw):
        if reduction != "mean":
            return fn(features=features, labels=labels, reduction=reduction, **kw)
        import torch

        rows = fn(features=features, labels=labels, reduction="none", **kw)
        has_pos = (labels[:, None] == labels[None, :]).sum(dim=1) > 1
        return (rows.float().sum() / torch.clamp(has_pos.sum(), min=1)).to(rows.dtype)

    return port


def _row_term_only(fn):
    """The right loss, but a backward that keeps only G z, the gradient through each anchor's own
    loss, and drops G^T z (the column pass of a tiled backward)."""
    import torch

    class RowTermOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, features, labels, kw):
            ctx.save_for_backward(features, labels)
            ctx.kw = kw
            return fn(features=features, labels=labels, **kw)

        @staticmethod
        def backward(ctx, g):
            features, labels = ctx.saved_tensors
            t, tb, reduction = ctx.kw["temperature"], ctx.kw["base_temperature"], ctx.kw["reduction"]
            n = features.shape[0]
            g = g.double().expand(n) / (n if reduction == "mean" else 1)
            z = features.detach().double()
            logits = (z @ z.T / t).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
            q = torch.softmax(logits, dim=1)
            _, positive, n_pos = _eager(features.detach(), labels, t, tb)
            G = (g / tb)[:, None] * (q - positive / n_pos.clamp(min=1)[:, None])
            G = torch.where((n_pos > 0)[:, None], G, 0.0)
            return (G @ z).to(features.dtype), None, None

    def port(*, features, labels, temperature=0.07, base_temperature=0.07, reduction="mean"):
        kw = {"temperature": temperature, "base_temperature": base_temperature, "reduction": reduction}
        return RowTermOnly.apply(features, labels, kw)

    return port


def _distinct(labels, kw):
    import torch

    return torch.arange(len(labels), device=labels.device)


SUPCON = Spec(
    name="supcon_loss",
    paper=58,
    family="metric",
    summary="Supervised contrastive loss (SupCon): every same-label sample is a positive; tiled kernels that "
            "never store the N x N logits.",
    reference=f"{REF}:supcon_loss",
    reference_grad=f"{REF}:supcon_loss_grad",
    accelerated=f"{ACC}:supcon_loss",
    baseline=f"{BASE}:supcon_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("features",),
    tolerance=TOLERANCE,
    reduction_length=_length,
    bad_inputs=BAD_INPUTS,
    bench_cases=tuple(_bench_case(b, d) for b in (16384, 65536) for d in (256, 1024)),
    flops=_flops,
    properties=(
        "labels = sample index over two views is SimCLR's NT-Xent loss (tested as an independent anchor)",
        "extra memory O(N) forward, O(N) + O(N·D) backward: the N x N logits are never materialised",
    ),
    wrong_ports={
        "self in the denominator": _self_in_denominator,
        "mean over anchors with positives only": _mean_over_anchors_with_positives,
        "backward drops the column term": _row_term_only,
        "labels ignored (every anchor its own class)": wrong_ports.replaces_argument("labels", _distinct),
    },
)

register(SUPCON)
