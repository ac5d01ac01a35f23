"""Specs of the Mann–Whitney loss and the exact AUC (P46)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

REF = "twinops.reference.metric.mann_whitney"
ACC = "twinops.accelerated.metric.mann_whitney"
BASE = "twinops.conformance.baselines.metric.mann_whitney"

# Queries, positives and negatives per query: around the 16-wide tiles of the interpreter (and the
# 64 x 128 tiles of the compiled kernels on the gpu profile). P = 65 under the interpreter (more than
# four positive tiles) takes the atomic column-sum path; it is one of the fixed examples.
QUERIES = {"ci": (1, 2, 3, 5), "dev": (1, 2, 3, 5, 8), "gpu": (1, 3, 17)}
POSITIVES = {"ci": (1, 2, 3, 15, 16, 17, 33), "dev": (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48),
             "gpu": (1, 2, 63, 64, 65, 127, 129, 300)}
NEGATIVES = {"ci": (1, 2, 5, 15, 16, 17, 33, 40), "dev": (1, 2, 5, 15, 16, 17, 31, 32, 33, 64, 97),
             "gpu": (1, 7, 127, 128, 129, 1000, 2049)}
MAX_PAIRS = {"ci": 2_000, "dev": 60_000, "gpu": 3_000_000}  # Q * P * N: the float64 reference forms them all

TAUS = (0.01, 0.05, 0.1, 1.0)
SCORE_MODES = ("normal", "cosine", "ties", "separated")
MASK_MODES = ("none", "some", "lengths", "empty query")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with sqrt(P N): each loss is a sum of up to P N pair losses, and each gradient entry a sum "
        "of N (or P) sigmoids, accumulated in fp32.",
        "The kernel takes log2 of products of up to 64 factors (1 + e) instead of log1p(e) pair by pair: an "
        "unbiased absolute error of about 6e-8 per pair in the loss (not the gradients), inside atol even "
        "where the loss is tiny (well-separated scores); exp2 is the GPU's approximation (about 2 ulp).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the loss and "
        "gradients are rounded to the input dtype. The AUC is returned in float32 whatever the input dtype.",
    ),
)


def _pairs_length(sample: Sample) -> int:
    q, p = np.shape(sample.arrays["pos"])
    return int(p * np.shape(sample.arrays["neg"])[1])


def _scores(rng, mode: str, q: int, p: int, n: int, scale: float):
    if mode == "normal":
        return rng.normal(size=(q, p)) * scale + 0.5 * scale, rng.normal(size=(q, n)) * scale
    if mode == "cosine":
        return rng.uniform(-1, 1, (q, p)), rng.uniform(-1, 1, (q, n))
    if mode == "ties":  # a few values shared by positives and negatives, exact in every dtype
        return rng.integers(-2, 3, (q, p)) / 4.0, rng.integers(-2, 3, (q, n)) / 4.0
    return rng.uniform(0.5, 1.0, (q, p)), rng.uniform(-1.0, 0.0, (q, n))  # separated: tiny losses


def _masks(rng, mode: str, q: int, p: int, n: int):
    if mode == "none":
        return None, None
    if mode == "lengths":
        lp, ln = rng.integers(0, p + 1, q), rng.integers(0, n + 1, q)
        return np.arange(p) < lp[:, None], np.arange(n) < ln[:, None]
    pm, nm = rng.random((q, p)) < 0.7, rng.random((q, n)) < 0.7
    if mode == "empty query":
        pm[rng.integers(0, q)] = False
        nm[rng.integers(0, q)] = False
    return pm, nm


@st.composite
def _samples(draw, profile: str, dtype: str, loss: bool):
    rng = seed(draw)
    q = draw(st.sampled_from(QUERIES[profile]))
    p = draw(st.sampled_from(POSITIVES[profile]))
    n = draw(st.sampled_from(NEGATIVES[profile]))
    if q * p * n > MAX_PAIRS[profile]:
        q = 1
    mode = draw(st.sampled_from(SCORE_MODES))
    scale = draw(st.sampled_from((0.01, 1.0, 10.0)))
    pos, neg = _scores(rng, mode, q, p, n, scale)
    mask_mode = draw(st.sampled_from(MASK_MODES))
    pm, nm = _masks(rng, mask_mode, q, p, n)
    arrays = {"pos": pos, "neg": neg}
    layouts = {"pos": draw(st.sampled_from(LAYOUTS)), "neg": draw(st.sampled_from(LAYOUTS))}
    for name, mask, scores in (("pos_mask", pm, pos), ("neg_mask", nm, neg)):
        if mask is not None:
            arrays[name] = mask
            scores[~mask] = np.nan  # masked entries must never be read
            if draw(st.booleans()):
                layouts[name] = draw(st.sampled_from(("transposed", "strided")))
    if loss:
        kwargs = {
            "tau": draw(st.sampled_from(TAUS) | st.floats(0.01, 10.0)),
            "normalization": draw(st.sampled_from(("pairs", "positives"))),
            "reduction": draw(st.sampled_from(("mean", "sum", "none"))),
        }
        grad = upstream_grad(rng, (q,) if kwargs["reduction"] == "none" else ())
    else:
        kwargs = {"reduction": draw(st.sampled_from(("mean", "none")))}
        grad = None
    return Sample(arrays, kwargs, ("pos", "neg"), layouts=layouts, grad_out=grad,
                  note=f"scores={mode}, scale={scale:g}, masks={mask_mode}")


def _edge_cases(loss: bool) -> list[Sample]:
    """Fixed examples: NaN in a valid and in a masked entry, infinite scores, queries without
    positives or negatives, every query empty, all ties, many positive tiles, a tiny loss."""
    rng = np.random.default_rng(46)
    pos, neg = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    nan_valid, nan_masked = pos.copy(), pos.copy()
    nan_valid[1, 2] = np.nan
    nan_masked[0, 3] = np.nan
    pm = np.ones((3, 4), bool)
    pm[0, 3] = False
    inf_pos, inf_neg = pos.copy(), neg.copy()
    inf_pos[0, 1], inf_pos[2, 0] = np.inf, -np.inf
    inf_neg[1, 4] = np.inf
    no_pos, no_neg = np.ones((3, 4), bool), np.ones((3, 5), bool)
    no_pos[0], no_neg[2] = False, False
    cases = [  # (arrays, note, reductions of the loss)
        ({"pos": nan_valid, "neg": neg}, "NaN in a valid positive of query 1", ("mean", "none")),
        ({"pos": nan_masked, "neg": neg, "pos_mask": pm}, "NaN in a masked positive", ("sum",)),
        ({"pos": inf_pos, "neg": inf_neg}, "+inf and -inf scores", ("none",)),
        ({"pos": pos, "neg": neg, "pos_mask": no_pos, "neg_mask": no_neg},
         "query 0 without positives, query 2 without negatives", ("mean", "none")),
        ({"pos": pos, "neg": neg, "pos_mask": np.zeros((3, 4), bool)}, "no query has a pair", ("mean", "sum")),
        ({"pos": np.full((3, 4), 0.25), "neg": np.full((3, 5), 0.25)}, "all scores tied", ("mean",)),
        ({"pos": rng.normal(size=(1, 70)), "neg": rng.normal(size=(1, 20))}, "70 positives: atomic column sums",
         ("none",)),
        ({"pos": rng.uniform(0.6, 1.0, (2, 5)), "neg": rng.uniform(-1.0, -0.6, (2, 6))}, "well separated",
         ("sum",)),
    ]
    out = []
    for arrays, note, reductions in cases:
        if not loss:
            reductions = sorted({"mean" if r == "sum" else r for r in reductions})
        for reduction in reductions:
            q = arrays["pos"].shape[0]
            grad = upstream_grad(rng, (q,) if reduction == "none" else ()) if loss else None
            kwargs = {"reduction": reduction}
            if loss:
                kwargs.update(tau=0.15 if "separated" in note else 0.1,
                              normalization="positives" if "atomic" in note else "pairs")
            out.append(Sample(arrays, kwargs, ("pos", "neg"), grad_out=grad, note=note))
    return out


def _bad_inputs(loss: bool) -> tuple[BadInput, ...]:
    pos, neg = np.zeros((2, 3)), np.zeros((2, 4))

    def call(note, error, match, **change):
        kwargs = {k: change.pop(k) for k in ("tau", "normalization", "reduction") if k in change}
        arrays = {"pos": pos, "neg": neg, **change}
        return BadInput(note, lambda: (arrays, kwargs), error, match)

    out = [
        call("1-D pos", ValueError, "pos", pos=np.zeros(3)),
        call("neg with another number of queries", ValueError, "neg", neg=np.zeros((3, 4))),
        call("no positives (P = 0)", ValueError, "empty", pos=np.zeros((2, 0))),
        call("no negatives (N = 0)", ValueError, "empty", neg=np.zeros((2, 0))),
        call("no queries (Q = 0)", ValueError, "empty", pos=np.zeros((0, 3)), neg=np.zeros((0, 4))),
        call("float pos_mask", TypeError, "pos_mask", pos_mask=np.ones((2, 3))),
        call("pos_mask of the wrong shape", ValueError, "pos_mask", pos_mask=np.ones((2, 4), bool)),
        call("neg_mask of the wrong shape", ValueError, "neg_mask", neg_mask=np.ones((2, 3), bool)),
        call("unknown reduction", ValueError, "reduction", reduction="avg"),
    ]
    if loss:
        out += [
            call("tau = 0 (must be > 0)", ValueError, "tau", tau=0.0),
            call("tau < 0", ValueError, "tau", tau=-0.1),
            call("tau = inf", ValueError, "tau", tau=float("inf")),
            call("tau = NaN", ValueError, "tau", tau=float("nan")),
            call("unknown normalization", ValueError, "normalization", normalization="eq3"),
        ]
    else:
        out.append(call("reduction='sum' (the AUC takes mean or none)", ValueError, "reduction", reduction="sum"))
    return tuple(out)


# ---------------------------------------------------------------------------------- benchmark


def _bench(q: int, p: int, n: int):
    """Cosine-like scores, positives a little higher, the paper's tau = 0.01."""
    def make(rng):
        return {"pos": rng.uniform(-0.8, 1.0, (q, p)).astype(np.float32),
                "neg": rng.uniform(-1.0, 0.8, (q, n)).astype(np.float32)}, {}

    def smoke(rng):
        return {"pos": rng.uniform(-0.8, 1.0, (2, 5)).astype(np.float32),
                "neg": rng.uniform(-1.0, 0.8, (2, 40)).astype(np.float32)}, {}

    return BenchCase(f"{q}x{p}x{n}", make, ("pos", "neg"), smoke=smoke, dtypes=("float32",))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the scores once (the negatives once per 64-wide tile of positives). With
    gradients the forward also writes the fp32 d/ds vectors, and the backward reads them and writes
    the gradients. The kernel is bound by the special-function units (2 to 3 per pair), not by
    these bytes: read GB/s as a lower bound of the work done."""
    q, p = np.shape(arrays["pos"])
    n = np.shape(arrays["neg"])[1]
    scores = q * (p + -(-p // 64) * n) * itemsize
    grads = q * (p + n) * (4 + 4 + itemsize)
    return float(scores if direction == "fwd" else scores + grads)


def _drops_masks(fn):
    """A port that ignores pos_mask and neg_mask (every entry valid)."""
    def port(**kw):
        kw.pop("pos_mask", None)
        kw.pop("neg_mask", None)
        return fn(**kw)

    return port


def _pooled_across_queries(fn):
    """A port that pairs every positive with every negative of the whole batch (the one-query form)."""
    def port(*, pos, neg, pos_mask=None, neg_mask=None, **kw):
        q = pos.shape[0]
        flat = lambda t: None if t is None else t.reshape(1, -1)
        out = fn(pos=flat(pos), neg=flat(neg), pos_mask=flat(pos_mask), neg_mask=flat(neg_mask), **kw)
        return out.expand(q) if kw.get("reduction") == "none" else out

    return port


def _ties_win(pos, kw):
    """Ties counted as wins: every positive nudged up by one ulp."""
    import torch

    return torch.nextafter(pos, torch.full_like(pos, float("inf")))


LOSS = Spec(
    name="mann_whitney_loss",
    paper=46,
    family="metric",
    summary="Mann–Whitney (MW) loss: logistic loss of every positive-minus-negative score margin of a query, "
            "an upper bound of the AUC's complement; no pair tensor.",
    reference=f"{REF}:mann_whitney_loss",
    reference_grad=f"{REF}:mann_whitney_loss_grad",
    accelerated=f"{ACC}:mann_whitney_loss",
    baseline=f"{BASE}:mann_whitney_loss",
    samples=lambda profile, dtype: _samples(profile, dtype, True),
    examples=lambda: _edge_cases(True),
    grad_inputs=("pos", "neg"),
    tolerance=TOLERANCE,
    reduction_length=_pairs_length,
    bad_inputs=_bad_inputs(True),
    bench_cases=(_bench(256, 64, 4096),),
    bytes_moved=_bytes,
    properties=(
        "queries without a positive or a negative contribute 0 and are left out of the mean",
        "masked entries are never read: NaN there changes nothing, their gradient is exactly 0",
        "equal scores give log 2 per pair; extra memory O(Q (P + N)), never (Q, P, N)",
    ),
    wrong_ports={
        "ignores the masks": _drops_masks,
        "mean over every query, pairless ones included": wrong_ports.mean_over_all_rows,
        "pairs across queries": _pooled_across_queries,
    },
)

AUC = Spec(
    name="mann_whitney_auc",
    paper=46,
    family="metric",
    summary="Exact AUC per query (Mann–Whitney U over P N, ties one half) from positive and negative scores.",
    reference=f"{REF}:mann_whitney_auc",
    reference_grad=None,
    accelerated=f"{ACC}:mann_whitney_auc",
    baseline=f"{BASE}:mann_whitney_auc",
    samples=lambda profile, dtype: _samples(profile, dtype, False),
    examples=lambda: _edge_cases(False),
    tolerance=TOLERANCE,
    bad_inputs=_bad_inputs(False),
    bench_cases=(_bench(256, 64, 4096),),
    bytes_moved=lambda arrays, itemsize, direction: _bytes(arrays, itemsize, "fwd"),
    output_dtypes=("float32",),
    properties=(
        "exact: the doubled count 2U is an int64 integer, divided once in float64",
        "NaN for a query without pairs or with NaN in a valid score; the mean skips pairless queries",
    ),
    wrong_ports={
        "ties count as wins": wrong_ports.replaces_argument("pos", _ties_win),
        "ignores the masks": _drops_masks,
        "mean over every query, pairless ones included": wrong_ports.mean_over_all_rows,
    },
)

register(LOSS, AUC)
