"""Spec of PYRA token merging (P20): ToMe's bipartite soft matching with PYRA's re-activation."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ... import wrong_ports
from ...numerics import round_to_dtype
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

REF = "twinops.reference.layers.pyra_token_merge"
ACC = "twinops.accelerated.layers.pyra_token_merge"
BASE = "twinops.conformance.baselines.layers.pyra_token_merge"

FLOATS = ("x", "size", "metric", "a", "b", "ln_weight", "ln_bias")
GRADS = ("x", "a", "b", "ln_weight", "ln_bias")

# Interpreter shapes: token counts around the 16-wide tiles (A and B hold T/2 tokens each, so 33 gives
# 17 and 16 per set), channel counts around the 16-wide chunks, key widths around BLOCK_K = 16.
TOKENS = {"ci": (33, 9, 33, 5, 3, 2), "dev": (2, 3, 4, 5, 8, 9, 16, 17, 31, 33, 37, 65),
          "gpu": (3, 17, 65, 129, 197, 257)}
CHANNELS = {"ci": (17, 16, 3, 1), "dev": (1, 2, 8, 15, 16, 17, 33, 64), "gpu": (3, 64, 129, 768)}
KEY_DIMS = {"ci": (2, 3, 17), "dev": (2, 3, 8, 16, 17, 33), "gpu": (3, 64, 65)}
BATCH = {"ci": (2, 1), "dev": (1, 2, 3, 5), "gpu": (1, 3, 17)}

# Distinct scores closer than this are redrawn: the matching is piecewise constant, and a float64
# reference and an fp32 kernel may order a near-tie differently (exact ties, from duplicated tokens,
# are kept: both sides compute them identically and break them by the lowest index).
TIE_GAP = 1e-5

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 2e-5, "bfloat16": 1e-3},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(max(C, N r)): LayerNorm and the gate v_k sum over C channels, the channel "
        "gate u_c and the gradients of a, b, gamma, beta over the N r merge pairs.",
        "atol scales with the row's largest entry: the LayerNorm backward's dP is a difference of "
        "terms as large as the row's largest gradient.",
        "16-bit: outputs also pass when no worse than 2x the eager baseline + atol (the baseline "
        "rounds every intermediate to the input dtype; the kernels keep fp32 inside).",
    ),
)


def _scores_ok(metric: np.ndarray, class_token: bool, distill_token: bool) -> bool:
    """No near-tie (distinct values closer than TIE_GAP) among a row's best scores or the ranking."""
    with np.errstate(invalid="ignore"):  # -inf - (-inf) below: masked rows, never a near-tie
        return _gaps_ok(metric, class_token, distill_token)


def _gaps_ok(metric, class_token, distill_token) -> bool:
    k = metric / np.maximum(np.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
    scores = k[:, 0::2] @ np.swapaxes(k[:, 1::2], 1, 2)
    if class_token:
        scores[:, 0, :] = -np.inf
    if distill_token:
        scores[:, :, 0] = -np.inf
    if scores.shape[2] == 0:
        return True
    top = np.sort(scores, axis=2)
    best = top[..., -1]
    if top.shape[2] > 1:
        gap = best - top[..., -2]
        if np.any((gap > 0) & (gap < TIE_GAP)):
            return False
    ranked = np.sort(best, axis=1)
    diff = np.diff(ranked[:, ::-1], axis=1)
    diff = diff[np.isfinite(diff)]
    return not np.any((diff < 0) & (diff > -TIE_GAP))


def _draw_metric(rng, n, t, ck, dup: str, class_token, distill_token, dtype) -> np.ndarray:
    for attempt in range(60):
        # Best scores crowd near 1 with narrow keys; later attempts widen the keys to spread them.
        m = rng.normal(size=(n, t, ck if attempt < 20 else ck + 2 * t))
        if dup == "A" and t >= 5:
            m[:, 4] = m[:, 2]  # two identical A tokens: tied best scores, ranked by index
        elif dup == "B" and t >= 4:
            m[:, 3] = m[:, 1]  # two identical B tokens: tied partners, the lower index wins
        m = round_to_dtype(m, dtype)
        if _scores_ok(m, class_token, distill_token):
            return m
    return None


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(BATCH[profile]))
    t = draw(st.sampled_from(TOKENS[profile]))
    c = draw(st.sampled_from(CHANNELS[profile]))
    ck = draw(st.sampled_from(KEY_DIMS[profile]))
    class_token = draw(st.sampled_from((True, False)))
    distill_token = draw(st.sampled_from((False, False, True)))
    limit = (t - int(class_token) - int(distill_token)) // 2
    # Mostly merging (the largest r first, the choice Hypothesis favours); r = 0 (the identity) now and then.
    r = draw(st.sampled_from((limit, 1, max(1, limit // 2)) * 2 + (0,))) if limit > 0 else 0
    dup = draw(st.sampled_from(("none", "none", "A", "B")))
    metric = _draw_metric(rng, n, t, ck, dup, class_token, distill_token, dtype)
    assume(metric is not None)
    sizes = draw(st.sampled_from(("ones", "counts", "counts")))
    size = np.ones((n, t)) if sizes == "ones" else rng.integers(1, 5, (n, t)).astype(np.float64)
    modulation = draw(st.sampled_from(("init", "trained", "trained")))
    b = np.zeros(c) if modulation == "init" else rng.normal(size=c) * 0.5
    affine = draw(st.booleans())
    arrays = {
        "x": rng.normal(size=(n, t, c)),
        "size": size,
        "metric": metric,
        "a": rng.uniform(-1.0, 1.0, r),
        "b": b,
        "ln_weight": 1.0 + 0.3 * rng.normal(size=c) if affine else np.ones(c),
        "ln_bias": 0.2 * rng.normal(size=c) if affine else np.zeros(c),
    }
    kwargs = {"r": r, "class_token": class_token, "distill_token": distill_token}
    if draw(st.booleans()):
        kwargs["eps"] = draw(st.sampled_from((1e-5, 1e-6, 1e-3)))
    layouts = {k: draw(st.sampled_from(LAYOUTS)) for k in ("x", "size", "metric", "b")}
    return Sample(arrays=arrays, kwargs=kwargs, float_inputs=FLOATS, layouts=layouts,
                  grad_out=upstream_grad(rng, (n, t - r, c)),
                  note=f"duplicates={dup}, sizes={sizes}, modulation={modulation}")


def _examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    n, t, c = 2, 9, 6

    def sample(note, x=None, metric=None, size=None, r=3, b=None, **kw):
        arrays = {
            "x": rng.normal(size=(n, t, c)) if x is None else x,
            "size": np.ones((n, t)) if size is None else size,
            "metric": _draw_metric(rng, n, t, 4, "none", kw.get("class_token", False),
                                   kw.get("distill_token", False), "float16") if metric is None else metric,
            "a": rng.uniform(-1.0, 1.0, r), "b": rng.normal(size=c) if b is None else b,
            "ln_weight": np.ones(c), "ln_bias": np.zeros(c),
        }
        return Sample(arrays, {"r": r, **kw}, FLOATS, grad_out=upstream_grad(rng, (n, t - r, c)), note=note)

    # Every A token points at the same B token: one destination receives all r sources.
    same = np.tile(np.array([1.0, 0.0, 0.0, 0.0]), (n, t, 1)) + 0.01 * np.arange(t)[None, :, None] * \
        np.array([0.0, 1.0, 0.0, 0.0])
    same[:, 1::2] = [0.0, 0.0, 1.0, 0.0]
    same[:, 3] = [1.0, 0.0, 0.0, 0.0]
    nan_x = rng.normal(size=(n, t, c))
    nan_x[1, 5, 2] = np.nan
    return [
        sample("r = 0: the identity", r=0),
        sample("largest r with a class token (every A token but the class token merges)", r=4, class_token=True),
        sample("class and distillation tokens", r=3, class_token=True, distill_token=True),
        sample("b = 0 (PYRA's initialisation): ToMe's size-weighted merge", b=np.zeros(c)),
        sample("one destination receives every source", metric=same),
        sample("zero keys score 0 against everything", metric=np.concatenate(
            [np.zeros((n, 2, 4)), rng.normal(size=(n, t - 2, 4))], axis=1)),
        sample("NaN in a token of image 1", x=nan_x),
        sample("large sizes", size=rng.integers(1, 60, (n, t)).astype(np.float64)),
    ]


def _bad_inputs() -> tuple[BadInput, ...]:
    rng = np.random.default_rng(0)
    n, t, c = 2, 7, 4
    base = {"x": rng.normal(size=(n, t, c)), "size": np.ones((n, t)), "metric": rng.normal(size=(n, t, 3)),
            "a": rng.uniform(-1, 1, 2), "b": rng.normal(size=c), "ln_weight": np.ones(c), "ln_bias": np.zeros(c)}

    def call(r=2, **changes):
        kw = {"r": r}
        for k in ("class_token", "distill_token", "eps"):
            if k in changes:
                kw[k] = changes.pop(k)
        return lambda: (dict(base, **changes), kw)

    zero_size = np.ones((n, t))
    zero_size[1, 3] = 0.0
    nan_metric = base["metric"].copy()
    nan_metric[0, 2, 1] = np.nan
    return (
        BadInput("r larger than the A tokens allow", call(r=4, a=np.zeros(4)), ValueError, "r"),
        BadInput("r past the limit once the class token is protected", call(r=3, a=np.zeros(3), class_token=True,
                                                                           distill_token=True),
                 ValueError, "r"),
        BadInput("negative r", call(r=-1), ValueError, "r"),
        BadInput("r not an int", call(r=2.0), TypeError, "r"),
        BadInput("a does not have r entries", call(a=np.zeros(3)), ValueError, "a"),
        BadInput("b of the wrong width", call(b=np.zeros(c + 1)), ValueError, "b"),
        BadInput("ln_weight of the wrong width", call(ln_weight=np.ones(c - 1)), ValueError, "ln_weight"),
        BadInput("ln_bias of the wrong width", call(ln_bias=np.ones(2 * c)), ValueError, "ln_bias"),
        BadInput("size for another token count", call(size=np.ones((n, t - 1))), ValueError, "size"),
        BadInput("metric for another batch", call(metric=base["metric"][:1]), ValueError, "metric"),
        BadInput("2-D x", call(x=base["x"][0]), ValueError, "x"),
        BadInput("eps = 0", call(eps=0.0), ValueError, "eps"),
        BadInput("a token of size 0", call(size=zero_size), ValueError, "size", data_dependent=True),
        BadInput("NaN in metric", call(metric=nan_metric), ValueError, "metric", data_dependent=True),
    )


def _fd_skip(sample: Sample) -> str | None:
    """Finite differences perturb x and the parameters, never the metric, so the matching stays fixed;
    a sample whose metric holds a near-tie (none is drawn, but a port's own examples may) is skipped."""
    kw = sample.kwargs
    if int(kw["r"]) > 0 and not _scores_ok(np.asarray(sample.arrays["metric"], dtype=np.float64),
                                           bool(kw.get("class_token", False)), bool(kw.get("distill_token", False))):
        return "near-tie in the matching scores: the selection is piecewise constant there"
    return None


def _reduction_length(sample: Sample) -> int:
    n, _, c = np.shape(sample.arrays["x"])
    return max(c, n * int(sample.kwargs["r"]), 1)


# ---------------------------------------------------------------------------- benchmarks


def _bench_arrays(rng, n, t, c, ck, r):
    x = rng.standard_normal((n, t, c), dtype=np.float32)
    return {
        "x": x, "size": np.ones((n, t), np.float32),
        "metric": rng.standard_normal((n, t, ck), dtype=np.float32),
        "a": rng.uniform(-1, 1, r).astype(np.float32), "b": (0.1 * rng.standard_normal(c)).astype(np.float32),
        "ln_weight": np.ones(c, np.float32), "ln_bias": np.zeros(c, np.float32),
    }, {"r": r, "class_token": True}


BENCH = (
    BenchCase("ViT-B/16 block: N=64 T=197 C=768 keys 64 r=16",
              lambda rng: _bench_arrays(rng, 64, 197, 768, 64, 16), FLOATS,
              smoke=lambda rng: _bench_arrays(rng, 2, 17, 24, 8, 4)),
)


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: read x, size and the keys once, write (N, T - r, C) and the sizes. Backward: read the
    upstream gradient, x and size, write (N, T, C). The re-reads of the 2r pair rows (statistics,
    merge, two backward passes) are not counted (about 2 x 16 of 197 rows per read at ViT-B)."""
    n, t, c = np.shape(arrays["x"])
    ck = np.shape(arrays["metric"])[2]
    r = int(np.shape(arrays["a"])[0])
    fwd = (n * t * c + n * t * ck + n * (t - r) * c) * itemsize + 2 * n * t * itemsize
    bwd = (n * (t - r) * c + 2 * n * t * c) * itemsize + n * t * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _flat_sizes(v, kw):
    import torch

    return torch.ones_like(v)


def _flip(v, kw):
    return v.flip(0)


def _zero(v, kw):
    return v * 0


PYRA_TOKEN_MERGE = Spec(
    name="pyra_token_merge",
    paper=20,
    family="layers",
    summary="ToMe bipartite soft matching of r token pairs with PYRA's channel and pair gates on the merged "
            "sources, size-weighted merge; sizes tracked as explicit state.",
    reference=f"{REF}:pyra_token_merge",
    reference_grad=f"{REF}:pyra_token_merge_grad",
    accelerated=f"{ACC}:pyra_token_merge",
    baseline=f"{BASE}:pyra_token_merge",
    samples=_samples,
    grad_inputs=GRADS,
    tolerance=TOLERANCE,
    reduction_length=_reduction_length,
    bad_inputs=_bad_inputs(),
    examples=_examples,
    bench_cases=BENCH,
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    output_dtypes=("input", "input"),
    grad_output_index=0,
    properties=(
        "size_out is exact: sums of the integer sizes (exact in every float dtype up to 2048).",
        "Ties: the argmax over B takes the lowest index; equal best scores rank by ascending index.",
    ),
    wrong_ports={
        "ignores the modulation (plain ToMe)": wrong_ports.replaces_argument("b", _zero),
        "plain mean instead of the size-weighted one": wrong_ports.replaces_argument("size", _flat_sizes),
        "rank weights a in reverse order": wrong_ports.replaces_argument("a", _flip),
    },
)

register(PYRA_TOKEN_MERGE)
