"""Spec of the KD-Loss for facial landmarks (P14, ``kd_landmark_loss``).

Random inputs live on a grid of ``scale / 1024`` steps (exact in fp16, fp32 and float64, and so are
their differences and the reflected teachers T = g ± |u - g|), so every region test against T and
|g - o| decides the same way in any precision. Only the band edge b = g + beta sigma |u - g| is off
the grid: draws put p at least 0.05 grid steps from it (far beyond fp32 rounding and the finite
difference step). Exact ties (p = T, p = b, |g - p| = |g - o|) are fixed examples.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad

REF = "twinops.reference.classification.kd_landmark_loss"
ACC = "twinops.accelerated.classification.kd_landmark_loss"
BASE = "twinops.conformance.baselines.classification.kd_landmark_loss"

INPUTS = ("pred", "target", "tough", "tolerant")
REDUCTIONS = ("mean", "sum", "none")
SCALES = (1 / 8, 1.0, 4.0, 64.0)  # powers of two: grid values stay exact in every dtype
DEFAULTS = dict(alpha_tough=1.9, alpha_tough_neg=-0.45, alpha_tolerant=1.8, alpha_tolerant_neg=-0.4,
                main_weight=2.0, tough_weight=1.0, tolerant_weight=1.0, reflection=0.15)

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with (1 + L) sqrt(n), L the largest elementwise term |w m| + |w_u W_u (T_u - p)| + "
        "|w_o W_o (T_o - p)| of the input and n = N·2L for a mean or sum (1 elementwise): the main term "
        "and the negative-weight assistive terms can cancel, leaving the fp32 rounding of terms of size L "
        "(landmarks in pixels give L in the thousands), summed over n entries.",
    ),
)


def _units(rng, n, k, spread):
    """Integer grid positions of g, u, o and p - g with every kind of placement."""
    g = rng.integers(-512, 513, (n, k))
    u = g + rng.integers(-spread, spread + 1, (n, k))
    o = g + rng.integers(-spread, spread + 1, (n, k))
    dp = rng.integers(-3 * spread, 3 * spread + 1, (n, k))
    pick = rng.random((n, k))
    u = np.where(pick < 0.05, g, u)                            # a teacher exactly on the ground truth
    o = np.where((pick >= 0.05) & (pick < 0.1), g, o)
    dp = np.where((pick >= 0.1) & (pick < 0.15), 0, dp)         # the student exactly on the ground truth
    return g, u, o, dp


def _bad_entries(g, u, o, dp, reflection):
    """Entries where p sits on a region edge: p = T (p != g), |g - p| = |g - o| > 0, or p within 0.05
    grid steps of an off-grid band edge b."""
    side = np.sign(dp)
    bad = np.zeros(dp.shape, dtype=bool)
    for teacher in (u, o):
        spread = np.abs(teacher - g)
        edge = (side != 0) & (spread != 0)
        bad |= edge & (dp == side * spread)
        bad |= edge & (np.abs(dp - reflection * side * spread) < 0.05)
    bad |= (np.abs(dp) == np.abs(o - g)) & (dp != 0)
    return bad


def _hyper(draw):
    if draw(st.booleans()):
        hyper = dict(DEFAULTS)
    else:
        hyper = dict(
            alpha_tough=draw(st.floats(0.0, 3.0)), alpha_tough_neg=draw(st.floats(-1.0, 0.0)),
            alpha_tolerant=draw(st.floats(0.0, 3.0)), alpha_tolerant_neg=draw(st.floats(-1.0, 0.0)),
            main_weight=draw(st.sampled_from((0.0, 1.0, 2.0)) | st.floats(0.0, 3.0)),
            tough_weight=draw(st.floats(0.0, 2.0)), tolerant_weight=draw(st.floats(0.0, 2.0)),
        )
        hyper["reflection"] = draw(st.sampled_from((0.0, 0.15, 0.5, 1.0)) | st.floats(0.0, 1.0))
    return hyper


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    k = draw(st.sampled_from(EMBED_DIMS[profile]))
    scale = draw(st.sampled_from(SCALES))
    spread = draw(st.sampled_from((4, 50, 200)))
    hyper = _hyper(draw)
    g, u, o, dp = _units(rng, n, k, spread)
    for _ in range(20):
        bad = _bad_entries(g, u, o, dp, hyper["reflection"])
        if not bad.any():
            break
        dp = np.where(bad, rng.integers(-3 * spread, 3 * spread + 1, dp.shape), dp)
    dp = np.where(_bad_entries(g, u, o, dp, hyper["reflection"]), 0, dp)  # p = g is never an edge
    unit = scale / 1024
    arrays = {"pred": (g + dp) * unit, "target": g * unit, "tough": u * unit, "tolerant": o * unit}
    reduction = draw(st.sampled_from(REDUCTIONS))
    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in INPUTS if draw(st.booleans())}
    return Sample(
        arrays=arrays, kwargs={**hyper, "reduction": reduction}, float_inputs=INPUTS, layouts=layouts,
        grad_out=upstream_grad(rng, (n, k) if reduction == "none" else ()),
        note=f"scale={scale:g}, teacher spread={spread} grid steps",
    )


def _examples() -> list[Sample]:
    """Exact ties (representable in every dtype), NaN and inf, one entry each, cycling reductions."""
    rng = np.random.default_rng(0)
    g = np.array([[0.25, -0.5, 0.0, 0.125]])
    # each case: (pred, target, tough, tolerant, hyper, note); rows of 4 coordinates
    cases = [
        (g, g, g + 0.25, g - 0.125, {}, "exact tie: p = g (sign 0, reflected teachers collapse onto g)"),
        (g + 0.25, g, g - 0.25, g + 0.5, {}, "exact tie: p = T_u (reflected tough teacher)"),
        (g - 0.125, g, g + 0.5, g + 0.125, {}, "exact tie: p = T_o, and |g - p| = |g - o|"),
        (g + 0.375, g, g + 0.25, g - 0.5, {}, "p beyond T_u (pull), inside the tolerant band (push)"),
        (g + 0.5, g, g + 0.25, g, {}, "exact tie: o = g (threshold 0, L2 branch)"),
        (g + 0.25, g, g, g + 0.25, {}, "exact tie: u = g (W_u = 0), |g - p| = |g - o|"),
        (g + 0.25, g, g + 0.5, g - 0.5, {"reflection": 0.5}, "exact tie: p = b_u = b_o (inclusive >= 0)"),
        (g - 0.25, g, g + 0.5, g + 0.25, {"reflection": 0.5}, "exact tie: p = b_u, p = T_o, |g - p| = |g - o|"),
        (g + 0.5, g, g + 1.0, g - 0.75, {"reflection": 1.0}, "reflection 1: b = T, an empty push band"),
    ]
    nan_p, inf_p, nan_u = g + 0.25, g + 0.25, g + 0.5
    nan_p[0, 1], inf_p[0, 2], nan_u[0, 3] = np.nan, np.inf, np.nan
    cases += [
        (nan_p, g, g + 0.5, g - 0.125, {}, "NaN in pred"),
        (inf_p, g, g + 0.5, g - 0.125, {}, "+inf in pred"),
        (g + 0.25, g, nan_u, g - 0.125, {}, "NaN in the tough teacher"),
    ]
    out = []
    for i, (p, t, u, o, hyper, note) in enumerate(cases):
        reduction = REDUCTIONS[i % 3]
        arrays = {"pred": np.repeat(p, 2, 0), "target": np.repeat(t, 2, 0), "tough": np.repeat(u, 2, 0),
                  "tolerant": np.repeat(o, 2, 0)}
        out.append(Sample(arrays, {**DEFAULTS, **hyper, "reduction": reduction}, INPUTS,
                          grad_out=upstream_grad(rng, (2, 4) if reduction == "none" else ()), note=note))
    return out


def _fd_skip(sample: Sample):
    if "exact tie" in sample.note:
        return "exact region ties (p = T, p = b, |g - p| = |g - o|): the loss has a kink or a jump there"
    return None


def _length(sample: Sample) -> float:
    """n (1 elementwise, N·2L reduced) times (1 + L)^2, L the largest elementwise term (see the tolerance)."""
    a, kw = sample.arrays, sample.kwargs
    p, g, u, o = (np.asarray(a[name], dtype=np.float64) for name in INPUTS)
    with np.errstate(invalid="ignore", over="ignore"):
        e, d = np.abs(g - p), np.abs(g - o)
        main = abs(kw["main_weight"]) * (e * e + 3 * e + 3 * d + d * d)
        assist = sum(abs(w) * (abs(al) + abs(al_neg)) * (np.abs(t - g) + e) for w, al, al_neg, t in (
            (kw["tough_weight"], kw["alpha_tough"], kw["alpha_tough_neg"], u),
            (kw["tolerant_weight"], kw["alpha_tolerant"], kw["alpha_tolerant_neg"], o)))
        terms = main + assist
    finite = terms[np.isfinite(terms)]
    largest = float(finite.max()) if finite.size else 0.0
    n = 1 if kw.get("reduction", "mean") == "none" else p.size
    return n * (1.0 + largest) ** 2


# ------------------------------------------------------------------------------------ bad inputs


def _bad(description, error, match, **change):
    def make():
        rng = np.random.default_rng(1)
        arrays = {name: rng.normal(size=(3, 4)) for name in INPUTS}
        kwargs = {}
        for key, value in change.items():
            (arrays if key in INPUTS else kwargs)[key] = value
        return arrays, kwargs

    return BadInput(description, make, error, match)


BAD_INPUTS = (
    _bad("target shape differs from pred", ValueError, "target", target=np.zeros((3, 5))),
    _bad("tough teacher with fewer rows", ValueError, "tough", tough=np.zeros((2, 4))),
    _bad("tolerant teacher 1-D", ValueError, "tolerant", tolerant=np.zeros(12)),
    _bad("1-D pred", ValueError, "pred", pred=np.zeros(4)),
    _bad("(N, L, 2) pred (flatten the landmarks first)", ValueError, "pred", pred=np.zeros((3, 2, 2))),
    _bad("boolean pred", TypeError, "pred", pred=np.zeros((3, 4), dtype=bool)),
    _bad("empty batch (N = 0)", ValueError, "pred", pred=np.zeros((0, 4)), target=np.zeros((0, 4)),
         tough=np.zeros((0, 4)), tolerant=np.zeros((0, 4))),
    _bad("reflection > 1", ValueError, "reflection", reflection=1.5),
    _bad("reflection < 0", ValueError, "reflection", reflection=-0.15),
    _bad("alpha_tough = nan", ValueError, "alpha_tough", alpha_tough=float("nan")),
    _bad("alpha_tolerant_neg = inf", ValueError, "alpha_tolerant_neg", alpha_tolerant_neg=float("-inf")),
    _bad("main_weight = inf", ValueError, "main_weight", main_weight=float("inf")),
    _bad("tough_weight given as a string", TypeError, "tough_weight", tough_weight="1"),
    _bad("unknown reduction", ValueError, "reduction", reduction="avg"),
)


# ------------------------------------------------------------------------------------ benchmarks


def _bench(n: int, k: int) -> BenchCase:
    def make_inputs(rows, cols):
        def make(rng):
            g = rng.uniform(0.1, 0.9, (rows, cols)).astype(np.float32)
            noise = lambda s: (g + rng.normal(0, s, (rows, cols))).astype(np.float32)
            return {"pred": noise(0.05), "target": g, "tough": noise(0.01), "tolerant": noise(0.02)}, {}

        return make

    return BenchCase(f"N{n}x2L{k} (98 landmarks, WFLW; launch-bound)", make_inputs(n, k), INPUTS,
                     smoke=make_inputs(4, 40))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the four inputs; backward reads them again and writes d/d pred."""
    m = np.asarray(arrays["pred"]).size
    return float({"fwd": 4, "bwd": 5, "fwd+bwd": 9}[direction] * m * itemsize)


# ------------------------------------------------------------------------------------ wrong ports


def _eager(pred, target, tough, tolerant, kw, *, strict_push=False):
    """The loss in torch float64 with autograd; ``strict_push`` uses ``> 0`` for the negative map."""
    import torch

    p, g, u, o = (x.double() for x in (pred, target, tough, tolerant))
    side = torch.sign(p - g).detach()

    def assist(t0, alpha, alpha_neg):
        t = (g + side * torch.abs(t0 - g)).detach()
        b = (g + kw["reflection"] * side * torch.abs(t0 - g)).detach()
        push = torch.sign(t - p) * torch.sign(p - b)
        w = alpha * (torch.sign(p - t) * torch.sign(t - g) > 0) + alpha_neg * ((push > 0) if strict_push else (push >= 0))
        return w.detach() * torch.abs(t - p)

    e, d = torch.abs(g - p), torch.abs(g - o)
    main = torch.where(e <= d, 3 * e, e * e + 3 * d - d * d)
    loss = (kw["main_weight"] * main + kw["tough_weight"] * assist(u, kw["alpha_tough"], kw["alpha_tough_neg"])
            + kw["tolerant_weight"] * assist(o, kw["alpha_tolerant"], kw["alpha_tolerant_neg"]))
    red = kw["reduction"]
    out = loss if red == "none" else loss.sum() if red == "sum" else loss.mean()
    return out.to(pred.dtype)


def _strict_negative_map(fn):
    """The negative (push-away) map with a strict ``> 0``: drops the band edge p = b."""

    def port(*, pred, target, tough, tolerant, **kw):
        return _eager(pred, target, tough, tolerant, {**DEFAULTS, "reduction": "mean", **kw}, strict_push=True)

    return port


def _mean_over_rows(fn):
    """``"mean"`` over the N faces (coordinates summed), not over all N·2L entries."""

    def port(*, pred, reduction="mean", **kw):
        if reduction != "mean":
            return fn(pred=pred, reduction=reduction, **kw)
        return (fn(pred=pred, reduction="sum", **kw).float() / pred.shape[0]).to(pred.dtype)

    return port


KD_LANDMARK = Spec(
    name="kd_landmark_loss",
    paper=14,
    family="classification",
    summary="KD-Loss for landmark regression: 3·L1/L2 main term plus tough and tolerant teachers' assistive "
            "terms with reflected teachers, fused into one elementwise pass each way.",
    reference=f"{REF}:kd_landmark_loss",
    reference_grad=f"{REF}:kd_landmark_loss_grad",
    accelerated=f"{ACC}:kd_landmark_loss",
    baseline=f"{BASE}:kd_landmark_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("pred",),
    tolerance=TOLERANCE,
    reduction_length=_length,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(256, 196),),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=(
        "sign(0) = 0, strict '> 0' for the pull map and inclusive '>= 0' for the push map, as the authors' code",
        "region decisions against T and |g - o| are exact ties in every precision on grid inputs",
    ),
    wrong_ports={
        "tough teacher ignored (set to the ground truth)": wrong_ports.replaces_argument(
            "tough", lambda tough, kw: kw["target"]),
        "negative map with a strict > 0": _strict_negative_map,
        "mean over faces instead of all coordinates": _mean_over_rows,
    },
)

register(KD_LANDMARK)
