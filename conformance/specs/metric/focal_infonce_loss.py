"""Spec of focal InfoNCE (P31): in-batch and hard negatives, focal reweighting, temperature."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance, resolve
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, embeddings, seed, upstream_grad

NAME = "focal_infonce_loss"
REF = f"twinops.reference.metric.{NAME}"
ACC = f"twinops.accelerated.metric.{NAME}"
BASE = f"twinops.conformance.baselines.metric.{NAME}"
INPUTS = ("query", "positive", "negatives")

HARD_NEGATIVES = {"ci": (0, 1, 5, 16, 17), "dev": (0, 1, 3, 15, 16, 17, 33), "gpu": (0, 1, 63, 64, 65, 300)}
TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 1.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0)


def _scales(sample: Sample) -> tuple[float, float]:
    """L = max|q| max|c| / tau, the largest possible |S_ij|, and K = max(|q|, |c|) / tau, the size of
    one term dS_ij c_j / tau of a gradient entry (per unit of upstream gradient and coefficient)."""
    a = sample.arrays
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.linalg.norm(a["query"], axis=1).max(initial=0.0)
        c = max(np.linalg.norm(a["positive"], axis=1).max(initial=0.0),
                np.linalg.norm(a["negatives"], axis=1).max(initial=0.0))
        tau = sample.kwargs["temperature"]
        scales = (q * c / tau, max(q, c) / tau)
    return tuple(float(x) if np.isfinite(x) else 1.0 for x in scales)


def _reduction_length(sample: Sample) -> int:
    """D (B + H) (1 + L)^2 (1 + K)^2: atol * sqrt(n) is then the fp32 rounding error of a D-term
    score of size L (relative error eps L in every probability), carried by gradient terms of size
    K and summed over the B + H candidates."""
    b, d = np.shape(sample.arrays["query"])
    n = b + np.shape(sample.arrays["negatives"])[0]
    big_l, big_k = _scales(sample)
    return int(min(d * n * (1.0 + big_l) ** 2 * (1.0 + big_k) ** 2, 1e18))  # an int numpy can take the sqrt of


TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 2e-8, "float16": 1e-7, "bfloat16": 1e-6},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D (B + H)) (1 + L) (1 + K), L = max|q| max|c| / tau the largest possible "
        "logit and K = max(|q|, |c|) / tau: every score is a D-term dot product divided by tau, so its "
        "fp32 rounding error (and the relative error of every probability) is proportional to L; a "
        "gradient entry sums B + H terms of size K that can cancel far below their own size (at "
        "tau = 0.01 terms of ~60 cancel to 0.07). The base atol is 50x below the library default to "
        "compensate for these upper bounds.",
        "atol scales with the row's largest entry (loss or gradient row).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol (the eager "
        "baseline forms the logits in the input dtype).",
    ),
)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    # The ci profile stops at one tile boundary (17) to keep interpreter runs short.
    b = draw(st.sampled_from([x for x in EMBED_BATCH[profile] if profile != "ci" or x <= 17]))
    d = draw(st.sampled_from([x for x in EMBED_DIMS[profile] if profile != "ci" or x <= 17]))
    h = draw(st.sampled_from(HARD_NEGATIVES[profile]))
    normalize = draw(st.booleans())
    scale = 1.0 if normalize else draw(st.sampled_from((0.1, 1.0, 3.0)))
    query = embeddings(rng, b, d, scale=scale, normalize=normalize)
    # Positives near their queries (so p_i reaches both ~1 and ~0 across samples), or unrelated.
    noise = draw(st.sampled_from((0.0, 0.3, 1.0, None)))
    positive = embeddings(rng, b, d, scale=scale) if noise is None else query + noise * embeddings(rng, b, d, scale=scale)
    if normalize:
        positive /= np.maximum(np.linalg.norm(positive, axis=1, keepdims=True), 1e-12)
    negatives = embeddings(rng, h, d, scale=scale, normalize=normalize)
    duplicates = draw(st.sampled_from(("none", "none", "positives", "negatives")))
    if duplicates == "positives" and b > 1:
        positive[1] = positive[0]  # a false negative: query 1's positive is also query 0's
    elif duplicates == "negatives" and h > 0:
        negatives[0] = positive[-1]  # a hard negative equal to an in-batch positive (a tie)
    kwargs = {
        "temperature": draw(st.sampled_from(TEMPERATURES) | st.floats(0.01, 2.0)),
        "gamma": draw(st.sampled_from(GAMMAS) | st.floats(0.0, 3.0)),
        "detach_weight": draw(st.booleans()),
        "reduction": draw(st.sampled_from(("mean", "sum", "none"))),
    }
    layouts = {k: draw(st.sampled_from(LAYOUTS)) for k in INPUTS}
    return Sample(
        arrays={"query": query, "positive": positive, "negatives": negatives},
        kwargs=kwargs,
        float_inputs=INPUTS,
        layouts=layouts,
        grad_out=upstream_grad(rng, (b,) if kwargs["reduction"] == "none" else ()),
        note=f"normalized={normalize}, scale={scale:g}, positive noise={noise}, duplicates={duplicates}",
    )


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(7)
    b, d, h = 3, 4, 2
    q = embeddings(rng, b, d, normalize=True)
    p = q + 0.1 * embeddings(rng, b, d)
    n = embeddings(rng, h, d, normalize=True)
    nan_q, inf_n = q.copy(), n.copy()
    nan_q[1, 2] = np.nan
    inf_n[0, 0] = np.inf
    cases = [
        (q, p, n, {}, "an ordinary batch"),
        (nan_q, p, n, {}, "NaN in query 1: row 1 NaN, every candidate gradient NaN"),
        (q, p, inf_n, {}, "inf in a hard negative: every row NaN"),
        (q[:1], p[:1], n[:0], {}, "B = 1, no hard negatives: one candidate, loss 0"),
        (np.zeros((b, d)), np.zeros((b, d)), np.zeros((h, d)), {}, "all scores 0: p = 1/(B + H)"),
        (q, -q, n, {}, "positives opposite their queries: p ~ 0"),
        (q, q, n, {"temperature": 0.01}, "positives equal their queries at tau = 0.01: p ~ 1"),
        (q, q, n, {"temperature": 0.01, "gamma": 0.5}, "p ~ 1 with gamma < 1 (guarded coefficient)"),
        (q, np.repeat(p[:1], b, axis=0), n, {}, "every query has the same positive (ties)"),
        (q, p, n, {"gamma": 0.0}, "gamma = 0: InfoNCE"),
    ]
    out = []
    for i, (query, positive, negatives, kw, note) in enumerate(cases):
        reduction = ("none", "mean", "sum")[i % 3]
        kwargs = {"temperature": 0.05, "gamma": 1.0, "detach_weight": False, "reduction": reduction, **kw}
        grad = upstream_grad(rng, (len(query),) if reduction == "none" else ())
        out.append(Sample({"query": query, "positive": positive, "negatives": negatives}, kwargs, INPUTS,
                          grad_out=grad, note=note))
    out.append(Sample({"query": q, "positive": p, "negatives": n},
                      {"temperature": 0.05, "gamma": 2.0, "detach_weight": True, "reduction": "none"},
                      INPUTS, grad_out=upstream_grad(rng, (b,)), note="detached focal weight"))
    return out


def _bad(description, error, match, q=(2, 3), p=(2, 3), n=(1, 3), **kwargs):
    def make():
        arrays = {"query": np.ones(q) if q else np.ones(3), "positive": np.ones(p), "negatives": np.ones(n)}
        return arrays, kwargs

    return BadInput(description, make, error, match)


BAD_INPUTS = (
    _bad("1-D query", ValueError, "query", q=None),
    _bad("empty batch (B = 0)", ValueError, "query", q=(0, 3), p=(0, 3)),
    _bad("D = 0", ValueError, "query", q=(2, 0), p=(2, 0), n=(1, 0)),
    _bad("positive batch differs from query", ValueError, "positive", p=(3, 3)),
    _bad("positive width differs from query", ValueError, "positive", p=(2, 4)),
    _bad("negatives width differs from query", ValueError, "negatives", n=(1, 4)),
    _bad("3-D negatives", ValueError, "negatives", n=(1, 1, 3)),
    _bad("temperature = 0", ValueError, "temperature", temperature=0.0),
    _bad("temperature < 0", ValueError, "temperature", temperature=-0.05),
    _bad("temperature = inf", ValueError, "temperature", temperature=float("inf")),
    _bad("temperature = NaN", ValueError, "temperature", temperature=float("nan")),
    _bad("gamma < 0", ValueError, "gamma", gamma=-0.5),
    _bad("gamma = NaN", ValueError, "gamma", gamma=float("nan")),
    _bad("detach_weight not a bool", TypeError, "detach_weight", detach_weight="yes"),
    _bad("unknown reduction", ValueError, "reduction", reduction="avg"),
)


def _bench(b: int, d: int, *, h: int | None = None) -> BenchCase:
    """B queries, B positives and H = B hard negatives (one mined negative per query), unit rows."""
    h = b if h is None else h

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def build(rng, b, d, h):
        q = unit(rng.standard_normal((b, d), dtype=np.float32))
        p = unit(q + 0.5 * unit(rng.standard_normal((b, d), dtype=np.float32)))
        n = unit(rng.standard_normal((h, d), dtype=np.float32))
        return {"query": q, "positive": p, "negatives": n}, {"temperature": 0.02, "gamma": 1.0}

    return BenchCase(f"B={b} H={h} D={d}", lambda rng: build(rng, b, d, h), INPUTS,
                     smoke=lambda rng: build(rng, 8, 16, 8), dtypes=("bfloat16",))


def _flops(arrays: dict, direction: str) -> float:
    """The work the kernels do, recomputation included: the forward is one score GEMM (2 B N D,
    N = B + H candidates); the backward recomputes the scores twice (row pass and column pass) and
    does two gradient GEMMs (dQ = dS C, dC = dS^T Q): 4 more."""
    b, d = np.shape(arrays["query"])
    n = b + np.shape(arrays["negatives"])[0]
    gemm = 2.0 * b * n * d
    return {"fwd": 1, "bwd": 4, "fwd+bwd": 5}[direction] * gemm


def _fd_function(values: dict, kwargs: dict):
    """With ``detach_weight`` the gradient is that of sum_i w_i u_i with each focal weight
    w_i = (1 - p_i)^gamma held at its value for the unperturbed inputs; u_i = -log p_i is the
    gamma = 0 loss. Otherwise the loss itself (None)."""
    if not kwargs["detach_weight"]:
        return None
    loss = resolve(f"{REF}:{NAME}")
    plain = dict(kwargs, gamma=0.0, reduction="none")
    u0 = loss(**values, **plain)
    weight = np.power(-np.expm1(-u0), kwargs["gamma"])

    def fixed_weight_loss(**vals):
        rows = weight * loss(**vals, **plain)
        reduction = kwargs["reduction"]
        return rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())

    return fixed_weight_loss


def _drops_hard_negatives(fn):
    return lambda **kw: fn(**{**kw, "negatives": kw["negatives"][:0]})


def _no_focal_weight(fn):
    return lambda **kw: fn(**{**kw, "gamma": 0.0})


def _always_detached(fn):
    return lambda **kw: fn(**{**kw, "detach_weight": True})


FOCAL_INFONCE = Spec(
    name=NAME,
    paper=31,
    family="metric",
    summary="InfoNCE over in-batch and hard negatives with a focal weight (1 - p)^gamma on each query, "
            "without forming the (B, B + H) score matrix.",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=INPUTS,
    tolerance=TOLERANCE,
    reduction_length=_reduction_length,
    fd_function=_fd_function,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(16384, 256), _bench(16384, 1024), _bench(65536, 256), _bench(65536, 1024)),
    flops=_flops,
    properties=(
        "gamma = 0 equals torch cross-entropy over the concatenated logits (tested as an independent anchor)",
        "forward + backward allocate no tensor of score-matrix size (B, B + H) (tested by recording every "
        "allocation)",
    ),
    wrong_ports={
        "drops the hard negatives": _drops_hard_negatives,
        "forgets the focal weight (plain InfoNCE)": _no_focal_weight,
        "always detaches the focal weight": _always_detached,
    },
)

register(FOCAL_INFONCE)
