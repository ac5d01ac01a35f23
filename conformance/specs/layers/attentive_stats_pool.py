"""Spec of attentive statistics pooling (P61): softmax-over-time weighted mean and deviation per channel."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad
from ...wrong_ports import replaces_argument

NAME = "attentive_stats_pool"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"

BATCH = {"ci": (1, 2, 3), "dev": (1, 2, 3, 5), "gpu": (1, 3, 8, 64)}
CHANNELS = {"ci": (1, 3, 15, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 31, 33), "gpu": (1, 15, 16, 17, 255, 1536)}
FRAMES = {"ci": (1, 2, 15, 16, 17, 33), "dev": (1, 2, 3, 15, 16, 17, 31, 32, 33, 64),
          "gpu": (1, 63, 64, 65, 300, 1001)}
LAYOUTS_3D = ("contiguous", "strided", "row_strided")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(T): every output is an fp32 weighted sum over T frames.",
        "atol scales with the row's largest entry: a channel whose mean is near 0 or whose deviation is "
        "small against the mean keeps the rounding error of its largest features; a logit gradient "
        "alpha (x - mu) keeps the error of mu.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _clear_eps(x, logits, mode: str) -> float:
    """The variance floor for a sample: the authors' 1e-9, 1/100 of the smallest channel variance
    (the floor inactive but visible: sqrt(v + eps) would differ), or 100x the largest (active
    everywhere). The gradient switches at v = eps, so no channel variance may lie within a factor
    100 of eps (rounding to the dtype under test must not move a channel across); a conflicting
    choice moves eps to the middle of the widest gap between the variances (in log scale)."""
    from twinops.reference.layers.attentive_stats_pool import _moments

    _, _, var = _moments(np.asarray(x, np.float64), np.asarray(logits, np.float64))
    # Below ~1e-12 max x^2 an fp32 variance is rounding noise: such channels count as variance 0
    # and eps stays 100x above that noise floor.
    floor = np.log10(max(1e-12 * float(np.nanmax(np.where(np.isfinite(x), x, 0.0) ** 2, initial=0.0)), 1e-30))
    v = np.sort(np.log10(np.maximum(var[np.isfinite(var)], 10.0**floor)))
    v = v[v > floor]
    top = v[-1] if v.size else floor
    target = {"default": -9.0, "just below": (v[0] if v.size else top) - 2.0, "above all": top + 2.0}[mode]
    if target >= floor + 2.0 and np.all(np.abs(v - target) >= 2.0):
        return float(10.0**target)
    edges = np.concatenate([[floor], v, [top + 6.0]])
    i = int(np.argmax(np.diff(edges)))
    return float(10.0 ** ((edges[i] + edges[i + 1]) / 2))


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(BATCH[profile]))
    c = draw(st.sampled_from(CHANNELS[profile]))
    t = draw(st.sampled_from(FRAMES[profile]))
    scale = draw(st.sampled_from((1e-2, 1.0, 10.0)))
    offset = draw(st.sampled_from((0.0, 3.0)))  # a mean large against the spread
    x = scale * (rng.normal(size=(b, c, t)) + offset * rng.normal(size=(b, c, 1)))
    sharpness = draw(st.sampled_from((0.0, 1.0, 4.0)))  # 0: uniform weights (plain mean and std)
    logits = sharpness * rng.normal(size=(b, c, t)) + rng.normal(size=(b, c, 1))
    padded = draw(st.booleans()) and t > 1
    if padded:  # right-padded utterances: logit -inf on the padding, at least one frame kept
        lengths = rng.integers(1, t + 1, size=b)
        logits = np.where(np.arange(t)[None, None, :] < lengths[:, None, None], logits, -np.inf)
    mode = draw(st.sampled_from(("default", "default", "just below", "above all")))
    eps = _clear_eps(x, logits, mode)
    layouts = {"x": draw(st.sampled_from(LAYOUTS_3D)), "logits": draw(st.sampled_from(LAYOUTS_3D))}
    return Sample(
        arrays={"x": x, "logits": logits},
        kwargs={"eps": eps},
        float_inputs=("x", "logits"),
        layouts=layouts,
        grad_out=upstream_grad(rng, (b, 2 * c)),
        note=f"scale={scale:g} offset={offset:g} sharpness={sharpness:g} padded={padded}",
    )


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 4, 6))
    e = rng.normal(size=(2, 4, 6))
    nan_x, inf_x = x.copy(), x.copy()
    nan_x[0, 1, 3] = np.nan
    inf_x[1, 2, 0] = np.inf
    masked, all_masked, pos_inf = e.copy(), e.copy(), e.copy()
    masked[:, :, 4:] = -np.inf
    all_masked[1, 3, :] = -np.inf
    pos_inf[0, 0, 2] = np.inf
    const = x.copy()
    const[0, 2, :] = 1.5
    cases = [
        (nan_x, e, 1e-9, "NaN feature: its channel NaN"),
        (inf_x, e, 1e-9, "inf feature: mean inf, deviation NaN"),
        (x, masked, 1e-9, "logit -inf on the last two frames: zero weight"),
        (x, all_masked, 1e-9, "every logit -inf in one channel: NaN"),
        (x, pos_inf, 1e-9, "a +inf logit: NaN"),
        (const, e, 1e-9, "a constant channel: deviation sqrt(eps), no deviation gradient"),
        (x[:, :, :1], e[:, :, :1], 1e-9, "T = 1"),
        (x, np.zeros_like(e), 1e-9, "uniform weights: the plain mean and population deviation"),
        (x, 50.0 * e, 1e-9, "saturated softmax"),
        (x[:0], e[:0], 1e-9, "B = 0"),
        (x[:, :0], e[:, :0], 1e-9, "C = 0"),
        (x, e, 10.0, "eps above every variance: deviation sqrt(eps)"),
    ]
    return [Sample({"x": a, "logits": l}, {"eps": eps}, ("x", "logits"),
                   grad_out=upstream_grad(rng, (a.shape[0], 2 * a.shape[1])), note=note)
            for a, l, eps, note in cases]


def _bad(description, error, match, x=(2, 3, 4), logits=(2, 3, 4), **kwargs):
    return BadInput(description, lambda: ({"x": np.ones(x), "logits": np.zeros(logits)}, kwargs), error, match)


BAD_INPUTS = (
    _bad("2-D x", ValueError, "x", x=(2, 3), logits=(2, 3)),
    _bad("logits of another shape", ValueError, "logits", logits=(2, 3, 5)),
    _bad("logits for one channel only", ValueError, "logits", logits=(2, 1, 4)),
    _bad("T = 0", ValueError, "x", x=(2, 3, 0), logits=(2, 3, 0)),
    _bad("eps = 0", ValueError, "eps", eps=0.0),
    _bad("eps < 0", ValueError, "eps", eps=-1e-9),
    _bad("eps = NaN", ValueError, "eps", eps=float("nan")),
    _bad("eps not a number", TypeError, "eps", eps="1e-9"),
)


def _bench(b: int, c: int, t: int) -> BenchCase:
    def build(rng, b, c, t):
        return ({"x": rng.standard_normal((b, c, t), dtype=np.float32),
                 "logits": rng.standard_normal((b, c, t), dtype=np.float32)}, {})

    return BenchCase(f"ECAPA-TDNN head B={b} C={c} T={t}", lambda rng: build(rng, b, c, t), ("x", "logits"),
                     smoke=lambda rng: build(rng, 2, 5, 17))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x and the logits and writes (B, 2C); backward reads the (B, 2C) gradient, x and
    the logits again and writes both (B, C, T) gradients (the saved 16-byte per-channel statistics
    are not counted)."""
    b, c, t = np.shape(arrays["x"])
    big, small = b * c * t * itemsize, b * 2 * c * itemsize
    fwd = 2 * big + small
    bwd = 4 * big + small
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _uniform_weights(fn):
    """Ignores the attention: every frame weighted 1/T."""
    import torch

    return replaces_argument("logits", lambda e, kw: torch.zeros_like(e))(fn)


def _eps_added(fn):
    """sqrt(v + eps) instead of sqrt(max(v, eps)): the floor placed the other common way."""
    import torch

    def port(**kw):
        out = fn(**kw)
        c = kw["x"].shape[1]
        eps = kw.get("eps", 1e-9)
        sigma = out[:, c:]
        var = torch.where(sigma * sigma <= eps * (1 + 1e-3), torch.zeros_like(sigma), sigma * sigma)
        return torch.cat([out[:, :c], torch.sqrt(var + eps)], dim=1)

    return port


def _softmax_over_channels(fn):
    """Normalises the attention over channels instead of over time."""
    import torch

    def port(*, x, logits, eps=1e-9):
        alpha = torch.softmax(logits.float(), dim=1)
        xf = x.float()
        mu = (alpha * xf).sum(dim=2) / alpha.sum(dim=2)
        var = (alpha * (xf - mu[:, :, None]) ** 2).sum(dim=2) / alpha.sum(dim=2)
        return torch.cat([mu, torch.sqrt(var.clamp(min=eps))], dim=1).to(x.dtype)

    return port


ATTENTIVE_STATS_POOL = Spec(
    name=NAME,
    paper=61,
    family="layers",
    summary="Channel-wise attentive statistics pooling: softmax-over-time weighted mean and standard "
            "deviation per channel, concatenated (ECAPA-TDNN / EfficientTDNN head).",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("x", "logits"),
    tolerance=TOLERANCE,
    reduction_length=lambda sample: max(1, int(np.shape(sample.arrays["x"])[2])),
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(128, 1536, 300),),
    bytes_moved=_bytes,
    properties=("frames with logit -inf get weight exactly 0",
                "the deviation is sqrt(max(v, eps)); below the floor it passes no gradient"),
    wrong_ports={"uniform weights (ignores the logits)": _uniform_weights,
                 "sqrt(v + eps) instead of sqrt(max(v, eps))": _eps_added,
                 "softmax over channels instead of time": _softmax_over_channels},
)

register(ATTENTIVE_STATS_POOL)
