"""Specs of EvoNorm-S0 and EvoNorm-B0 (P51): normalisation-activation layers on (N, C, H, W) input."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad
from ...wrong_ports import replaces_argument

MODULE = "evonorm"
REF = f"twinops.reference.layers.{MODULE}"
ACC = f"twinops.accelerated.layers.{MODULE}"
BASE = f"twinops.conformance.baselines.layers.{MODULE}"

BATCH = {"ci": (1, 3), "dev": (1, 2, 3, 5), "gpu": (1, 3, 8, 32)}
# (H, W): H W at the interpreter's 16-wide spatial tiles +-1, one position, one row, one column.
SPATIAL = {
    "ci": ((1, 1), (3, 5), (4, 4), (17, 1), (1, 33), (2, 3)),
    "dev": ((1, 1), (3, 5), (4, 4), (17, 1), (1, 33), (2, 3), (5, 7), (8, 8)),
    "gpu": ((1, 1), (7, 7), (14, 14), (28, 28), (56, 56), (3, 1000)),
}
GROUPS = {"ci": (1, 2, 3), "dev": (1, 2, 3, 4), "gpu": (1, 8, 32)}
CHANNELS_PER_GROUP = {"ci": (1, 2, 3), "dev": (1, 2, 3, 5), "gpu": (1, 2, 8, 16, 33)}
CHANNELS = {"ci": (1, 2, 3), "dev": (1, 2, 3, 5, 8), "gpu": (1, 3, 32, 64, 256)}
SCALES = (1e-3, 1.0, 30.0)
LAYOUTS_4D = ("contiguous", "strided", "row_strided")  # channels_last is checked in tests/test_layers_evonorm.py
PARAM_LAYOUTS = ("contiguous", "strided")
GRAD_INPUTS = ("x", "v", "weight", "bias")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 2e-6, "float16": 2e-5, "bfloat16": 2e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(n), n the longest reduction behind an output: the group (C/G) H W for "
        "S0, the batch N H W for B0 and for the parameter gradients.",
        "atol scales with the largest entry of the row (last axis): dx subtracts the statistics' term "
        "from the elementwise one and keeps the rounding error of the larger.",
        "atol doubled over the default (fp32 2e-6): y and dx divide by a standard deviation as small as "
        "sqrt(eps), which multiplies the fp32 rounding of the statistics.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _params(rng, c: int) -> dict:
    return {"v": rng.normal(size=c), "weight": rng.normal(size=c), "bias": rng.normal(size=c)}


def _x(draw, rng, shape):
    scale = draw(st.sampled_from(SCALES))
    x = rng.normal(size=shape) * scale + rng.normal() * scale
    if draw(st.integers(0, 5)) == 0:
        x[:, :1] = x[0, 0, 0, 0]  # a constant channel (a constant S0 group when C / G = 1)
    return x, scale


def _layouts(draw) -> dict:
    layouts = {"x": draw(st.sampled_from(LAYOUTS_4D))}
    for name in ("v", "weight", "bias"):
        layouts[name] = draw(st.sampled_from(PARAM_LAYOUTS))
    return layouts


# ---------------------------------------------------------------------------------------- S0


@st.composite
def _s0_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(BATCH[profile]))
    groups = draw(st.sampled_from(GROUPS[profile]))
    c = groups * draw(st.sampled_from(CHANNELS_PER_GROUP[profile]))
    h, w = draw(st.sampled_from(SPATIAL[profile]))
    x, scale = _x(draw, rng, (n, c, h, w))
    kwargs = {"groups": groups, "eps": draw(st.sampled_from((1e-5, 1e-3)))}
    return Sample({"x": x, **_params(rng, c)}, kwargs, GRAD_INPUTS, layouts=_layouts(draw),
                  grad_out=upstream_grad(rng, x.shape), note=f"scale={scale:g}")


def _s0_edge_cases() -> list[Sample]:
    rng = np.random.default_rng(51)
    x = rng.normal(size=(2, 4, 3, 3))
    nan, inf = x.copy(), x.copy()
    nan[0, 1, 2, 2] = np.nan
    inf[1, 3, 0, 1] = np.inf
    const = x.copy()
    const[1, 2:] = 0.7
    cases = [
        (nan, 2, "NaN: its (sample, group) is NaN"),
        (inf, 2, "inf: its (sample, group) is NaN"),
        (const, 2, "a constant group: variance 0, std sqrt(eps)"),
        (rng.normal(size=(1, 1, 1, 1)), 1, "one element: variance 0"),
        (rng.normal(size=(3, 4, 1, 1)), 4, "one element per group"),
        (rng.normal(size=(2, 4, 2, 2)) * 100 + 1e3, 1, "large mean: the variance must not cancel"),
    ]
    return [Sample({"x": xx, **_params(rng, xx.shape[1])}, {"groups": g, "eps": 1e-5}, GRAD_INPUTS,
                   grad_out=upstream_grad(rng, xx.shape), note=note) for xx, g, note in cases]


def _s0_length(sample: Sample) -> int:
    n, c, h, w = np.shape(sample.arrays["x"])
    return max((c // sample.kwargs["groups"]) * h * w, n * h * w)


def _bad(description, error, match, x=(2, 4, 3, 3), c=4, b0=False, params=None, data_dependent=False, **kwargs):
    def make():
        arrays = {"x": np.ones(x), "v": np.ones(c), "weight": np.ones(c), "bias": np.zeros(c)}
        if b0:
            arrays["running_var"] = np.ones(c)
        arrays.update(params or {})
        return {k: v for k, v in arrays.items() if v is not None}, kwargs

    return BadInput(description, make, error, match, data_dependent=data_dependent)


S0_BAD = (
    _bad("channels not divisible by groups", ValueError, "groups", groups=3),
    _bad("groups = 0", ValueError, "groups", groups=0),
    _bad("groups not an int", TypeError, "groups", groups=2.0),
    _bad("3-D x", ValueError, "x", x=(2, 4, 9), groups=2),
    _bad("empty x", ValueError, "x", x=(0, 4, 3, 3), groups=2),
    _bad("v of the wrong length", ValueError, "v", params={"v": np.ones(3)}, groups=2),
    _bad("weight of shape (1, C, 1, 1)", ValueError, "weight", params={"weight": np.ones((1, 4, 1, 1))}, groups=2),
    _bad("bias of the wrong length", ValueError, "bias", params={"bias": np.zeros(5)}, groups=2),
    _bad("eps = 0", ValueError, "eps", groups=2, eps=0.0),
    _bad("eps = NaN", ValueError, "eps", groups=2, eps=float("nan")),
)


def _make_bench(shape, groups=None, b0=False):
    def make(rng):
        c = shape[1]
        arrays = {"x": rng.standard_normal(shape, dtype=np.float32),
                  "v": np.ones(c, np.float32), "weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}
        if b0:
            arrays["running_var"] = np.ones(c, np.float32)  # a float32 buffer, as in the module
            return arrays, {}
        return arrays, {"groups": groups}

    return make


def _s0_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x and writes y; backward reads x and grad and writes dx. The per-(n, g) and
    per-channel statistics are left out (O(N C)). The second sweep over each (n, g) group re-reads
    it, mostly from L2 (50 KB a group at the benchmark shape); that traffic is not counted."""
    size = float(np.prod(np.shape(arrays["x"])))
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction] * size * itemsize


def _s0_instance_std(fn):
    """Group statistics over each channel alone (InstanceNorm-like) instead of C / G channels."""
    return replaces_argument("groups", lambda g, kw: kw["x"].shape[1])(fn)


def _s0_ignores_v(fn):
    """The swish gate x sigmoid(x) without the learned v."""
    import torch

    return replaces_argument("v", lambda v, kw: torch.ones_like(v))(fn)


EVONORM_S0 = Spec(
    name="evonorm_s0",
    paper=51,
    family="layers",
    summary="EvoNorm-S0: x sigmoid(v x) divided by the per-(sample, group) standard deviation, then an affine map.",
    reference=f"{REF}:evonorm_s0",
    reference_grad=f"{REF}:evonorm_s0_grad",
    accelerated=f"{ACC}:evonorm_s0",
    baseline=f"{BASE}:evonorm_s0",
    samples=lambda profile, dtype: _s0_samples(profile, dtype),
    examples=_s0_edge_cases,
    grad_inputs=GRAD_INPUTS,
    tolerance=TOLERANCE,
    reduction_length=_s0_length,
    bad_inputs=S0_BAD,
    bench_cases=(BenchCase("N=64 C=256 H=W=56 G=32", _make_bench((64, 256, 56, 56), 32), ("x", "v", "weight", "bias"),
                           smoke=_make_bench((2, 64, 3, 5), 32), dtypes=("bfloat16",)),),
    bytes_moved=_s0_bytes,
    properties=("NaN or inf in x makes its whole (sample, group) NaN",
                "a constant group has standard deviation sqrt(eps)"),
    wrong_ports={"instance instead of group statistics": _s0_instance_std, "ignores v": _s0_ignores_v},
)


# ---------------------------------------------------------------------------------------- B0

B0_MOMENTA = (0.1, 0.0, 0.5, 1.0)


@st.composite
def _b0_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(BATCH[profile]))
    c = draw(st.sampled_from(CHANNELS[profile]))
    h, w = draw(st.sampled_from(SPATIAL[profile]))
    x, scale = _x(draw, rng, (n, c, h, w))
    kwargs = {"training": draw(st.booleans()), "momentum": draw(st.sampled_from(B0_MOMENTA)),
              "eps": draw(st.sampled_from((1e-5, 1e-3)))}
    params = _params(rng, c)
    # v x + s against a: with v ~ N(0, 1) both branches of the maximum are taken in most samples;
    # a running variance around the data's keeps them both alive in evaluation too.
    running = rng.uniform(0.2, 3.0, size=c) * (np.var(x) if kwargs["training"] is False else 1.0)
    layouts = _layouts(draw)
    layouts["running_var"] = draw(st.sampled_from(PARAM_LAYOUTS))
    return Sample({"x": x, **params, "running_var": running}, kwargs, GRAD_INPUTS + ("running_var",),
                  layouts=layouts, grad_out=upstream_grad(rng, x.shape), note=f"scale={scale:g}")


def _b0_edge_cases() -> list[Sample]:
    rng = np.random.default_rng(52)
    x = rng.normal(size=(2, 3, 3, 3))
    nan, inf = x.copy(), x.copy()
    nan[0, 1, 2, 2] = np.nan
    inf[1, 2, 0, 1] = np.inf
    cases = [
        (nan, "NaN: its instance, and in training its channel, is NaN"),
        (inf, "inf: its instance, and in training its channel, is NaN"),
        (np.zeros((2, 3, 2, 2)), "all zero: a = v x + s = sqrt(eps), a tie (gradient split 50/50)"),
        (rng.normal(size=(1, 3, 1, 1)), "N H W = 1: batch and instance variance 0"),
        (rng.normal(size=(2, 3, 2, 2)) * 100 + 1e3, "large mean: the variances must not cancel"),
    ]
    out = []
    for training in (True, False):
        for xx, note in cases:
            c = xx.shape[1]
            out.append(Sample({"x": xx, **_params(rng, c), "running_var": rng.uniform(0.5, 2.0, c)},
                              {"training": training, "momentum": 0.1, "eps": 1e-5}, GRAD_INPUTS + ("running_var",),
                              grad_out=upstream_grad(rng, xx.shape), note=note))
    return out


def _b0_length(sample: Sample) -> int:
    n, c, h, w = np.shape(sample.arrays["x"])
    return n * h * w


def _b0_fd_skip(sample: Sample) -> str | None:
    """Finite differences cannot check the gradient of the maximum at (or within a step of) a tie
    a_c = v x + s; the 50/50 split there is pinned by a reference test."""
    x = np.asarray(sample.arrays["x"], dtype=np.float64)
    kw = sample.kwargs
    eps = kw["eps"]
    v = np.asarray(sample.arrays["v"])[None, :, None, None]
    with np.errstate(invalid="ignore"):
        s = np.sqrt(x.var(axis=(2, 3), keepdims=True) + eps)
        if kw["training"]:
            a = np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + eps)
        else:
            a = np.sqrt(np.asarray(sample.arrays["running_var"])[None, :, None, None] + eps)
        gap = np.abs(v * x + s - a)
    if np.any(gap < 1e-4 * np.maximum(1.0, np.abs(a))):
        return "finite differences skip samples with a tie (or near-tie) in max(a, v x + s)"
    return None


B0_BAD = (
    _bad("running_var = NaN", ValueError, "running_var", b0=True, params={"running_var": np.array([1.0, np.nan, 1, 1])},
         data_dependent=True),
    _bad("running_var = inf (eval)", ValueError, "running_var", b0=True,
         params={"running_var": np.array([1.0, np.inf, 1, 1])}, training=False, data_dependent=True),
    _bad("running_var < 0 (eval)", ValueError, "running_var", b0=True,
         params={"running_var": np.array([1.0, -4.0, 1, 1])}, training=False, data_dependent=True),
    _bad("eval mode without running_var", ValueError, "running_var", b0=True, params={"running_var": None},
         running_var=None, training=False),
    _bad("running_var of the wrong length", ValueError, "running_var", b0=True, params={"running_var": np.ones(3)}),
    _bad("v of the wrong length", ValueError, "v", b0=True, params={"v": np.ones(5)}),
    _bad("weight of shape (1, C, 1, 1)", ValueError, "weight", b0=True, params={"weight": np.ones((1, 4, 1, 1))}),
    _bad("3-D x", ValueError, "x", b0=True, x=(2, 4, 9)),
    _bad("momentum > 1", ValueError, "momentum", b0=True, momentum=1.5),
    _bad("training not a bool", TypeError, "training", b0=True, training="yes"),
    _bad("eps < 0", ValueError, "eps", b0=True, eps=-1e-5),
)


def _b0_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: the instance-statistics kernel reads x, the output kernel reads x and writes y
    (3 passes). Backward: the sums kernel reads x and grad, the dx kernel reads x and grad and
    writes dx (5 passes). O(N C) statistics are left out."""
    size = float(np.prod(np.shape(arrays["x"])))
    return {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[direction] * size * itemsize


def _b0_eval_uses_batch(fn):
    """Batch statistics in evaluation too (a module that ignores ``eval()``)."""
    return replaces_argument("training", lambda t, kw: True)(fn)


def _b0_unbiased_running(fn):
    """timm's running update: the batch variance times N H W / (N H W - 1) (Bessel), where the
    TensorFlow reference uses the biased variance."""

    def port(**kw):
        y, new = fn(**kw)
        if not kw.get("training", True) or new is None:
            return y, new
        x = kw["x"].detach().float()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        var = x.var(dim=(0, 2, 3), unbiased=False)
        m = kw.get("momentum", 0.1)
        bump = m * var * (count / max(count - 1, 1) - 1.0) + (1e-3 if count == 1 else 0.0)
        return y, (new.float() + bump).to(new.dtype)

    return port


EVONORM_B0 = Spec(
    name="evonorm_b0",
    paper=51,
    family="layers",
    summary="EvoNorm-B0: x divided by max(batch std, v x + instance std), then an affine map; a BatchNorm-style running variance.",
    reference=f"{REF}:evonorm_b0",
    reference_grad=f"{REF}:evonorm_b0_grad",
    accelerated=f"{ACC}:evonorm_b0",
    baseline=f"{BASE}:evonorm_b0",
    samples=lambda profile, dtype: _b0_samples(profile, dtype),
    examples=_b0_edge_cases,
    grad_inputs=GRAD_INPUTS,
    tolerance=TOLERANCE,
    reduction_length=_b0_length,
    bad_inputs=B0_BAD,
    bench_cases=(BenchCase("N=64 C=256 H=W=56 train", _make_bench((64, 256, 56, 56), b0=True),
                           ("x", "v", "weight", "bias"), smoke=_make_bench((2, 8, 3, 5), b0=True),
                           dtypes=("bfloat16",)),),
    bytes_moved=_b0_bytes,
    fd_skip=_b0_fd_skip,
    output_dtypes=("input", "input"),
    grad_output_index=0,
    properties=("training=False returns running_var unchanged",
                "a tie max(a, b) with a = b splits the gradient 50/50 (torch.maximum)"),
    wrong_ports={"batch statistics in eval mode": _b0_eval_uses_batch,
                 "Bessel-corrected running variance": _b0_unbiased_running},
)

register(EVONORM_S0, EVONORM_B0)
