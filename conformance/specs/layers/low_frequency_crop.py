"""Spec of the low-frequency crop (P8, EfficientTrain): keep the centred low-frequency band of each
image plane's 2-D spectrum."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad

NAME = "low_frequency_crop"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"

# Image sides around the 16-wide tiles of the interpreter (64-wide on the GPU).
SIDES = {"ci": (2, 3, 5, 8, 15, 16, 17, 33), "dev": (2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 40),
         "gpu": (7, 32, 63, 64, 65, 129, 224)}
BATCH = {"ci": (1, 2), "dev": (1, 2, 3), "gpu": (1, 4, 16)}
CHANNELS = {"ci": (1, 3), "dev": (1, 2, 3), "gpu": (1, 3)}
LAYOUTS_4D = ("contiguous", "strided", "row_strided")  # "transposed" is a 2-D layout

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(H*W): each output (and each gradient entry) is an fp32 sum over a whole plane.",
        "atol scales with the row's largest entry: an output near 0 keeps the rounding error of the "
        "plane's largest terms.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch (FFT) baseline + atol.",
    ),
)


def _band(draw, size: int) -> int:
    """A band in [2, size]: the extremes (2, size: the identity for even sizes) and anything between."""
    return draw(st.sampled_from((2, size)) | st.integers(2, size))


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(BATCH[profile]))
    c = draw(st.sampled_from(CHANNELS[profile]))
    h = draw(st.sampled_from(SIDES[profile]))
    square = draw(st.booleans())
    w = h if square else draw(st.sampled_from(SIDES[profile]))
    if square and draw(st.booleans()):
        band = _band(draw, h)
    else:
        band = (_band(draw, h), _band(draw, w))
    scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
    x = rng.normal(size=(n, c, h, w)) * scale + rng.normal() * scale
    bh, bw = (band, band) if isinstance(band, int) else band
    return Sample(
        arrays={"x": x},
        kwargs={"band": band},
        float_inputs=("x",),
        layouts={"x": draw(st.sampled_from(LAYOUTS_4D))},
        grad_out=upstream_grad(rng, (n, c, 2 * (bh // 2), 2 * (bw // 2))),
        note=f"scale={scale:g}",
    )


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 2, 9, 9))
    nan, inf = x.copy(), x.copy()
    nan[0, 1, 4, 2] = np.nan
    inf[1, 0, 0, 8] = -np.inf
    cases = [
        (x, 6, "a plain crop 9 -> 6"),
        (x, 7, "odd band: output 6"),
        (x, 9, "band = size (odd): output 8"),
        (x[..., :8, :8], 8, "band = size (even): the identity"),
        (x, 2, "the smallest band: output 2 x 2"),
        (nan, 6, "NaN in plane (0, 1): that plane NaN"),
        (inf, 6, "-inf in plane (1, 0): that plane NaN"),
        (np.full((1, 1, 6, 6), 2.5), 4, "constant image: constant output"),
        (x[:, :, :, :5], (4, 5), "non-square with a band pair"),
        (x[:0], 6, "N = 0: empty output"),
        (x[:, :0], 6, "C = 0: empty output"),
    ]
    out = []
    for arr, band, note in cases:
        bh, bw = (band, band) if isinstance(band, int) else band
        grad = upstream_grad(rng, arr.shape[:2] + (2 * (bh // 2), 2 * (bw // 2)))
        out.append(Sample({"x": arr}, {"band": band}, ("x",), grad_out=grad, note=note))
    return out


def _bad(description, error, match, shape=(2, 3, 8, 8), **kwargs):
    return BadInput(description, lambda: ({"x": np.ones(shape)}, kwargs), error, match)


BAD_INPUTS = (
    _bad("3-D x", ValueError, "x", shape=(3, 8, 8), band=4),
    _bad("band larger than the image", ValueError, "band", band=9),
    _bad("band of 1 (no frequency kept)", ValueError, "band", band=1),
    _bad("band of 0", ValueError, "band", band=0),
    _bad("int band on a non-square image", ValueError, "band", shape=(1, 1, 8, 6), band=4),
    _bad("band pair larger than W", ValueError, "band", shape=(1, 1, 8, 6), band=(4, 7)),
    _bad("band of three entries", ValueError, "band", band=(4, 4, 4)),
    _bad("float band", TypeError, "band", band=4.0),
)


def _bench(n: int, c: int, size: int, band: int) -> BenchCase:
    def build(rng, n, c, size, band):
        return {"x": rng.standard_normal((n, c, size, size), dtype=np.float32)}, {"band": band}

    return BenchCase(f"N={n} C={c} {size}x{size} -> {band}x{band}", lambda rng: build(rng, n, c, size, band), ("x",),
                     smoke=lambda rng: build(rng, 1, 2, 17, 16), dtypes=("float32", "bfloat16"))


BENCH_BAND = 160  # the band of the benchmark (the byte and FLOP models receive only the arrays)


def _out_side(size: int) -> int:
    """Output side at the benchmark band (the image side when smaller, as in the smoke case)."""
    return 2 * (min(size, BENCH_BAND) // 2)


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x (N, C, H, W) and writes y (N, C, h, w); backward reads the gradient of y and
    writes that of x. The fp32 intermediate (N*C, H, w + 1) (resp. (N*C, h, W + 1)), written and read
    once, is not counted: the model is the operator's essential traffic."""
    n, c, hh, ww = np.shape(arrays["x"])
    one = n * c * (hh * ww + _out_side(hh) * _out_side(ww)) * itemsize
    return 2.0 * one if direction == "fwd+bwd" else float(one)


def _flops(arrays: dict, direction: str) -> float:
    """Multiply-adds of the two products per plane (P = N*C planes; (h, w) at the benchmark band):
    forward 2 P (H W (w + 1) + h H w), backward 2 P (h w (W + 1) + H h W)."""
    n, c, hh, ww = np.shape(arrays["x"])
    p = n * c
    h, w = _out_side(hh), _out_side(ww)
    fwd = 2.0 * p * (hh * ww * (w + 1) + h * hh * w)
    bwd = 2.0 * p * (h * w * (ww + 1) + hh * h * ww)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _axis_imag(size: int, b: int, like):
    """The rank-one imaginary part u v^T of one axis' crop matrix (see the accelerated module)."""
    import torch

    u = torch.tensor([(-1.0) ** m for m in range(2 * b)], dtype=torch.float64)
    v = torch.tensor([math.sin(2 * math.pi * b * j / size) / size for j in range(size)], dtype=torch.float64)
    return u.to(like.device), v.to(like.device)


def _drops_cross_term(fn):
    """Computes A_Hr x A_Wr^T only: forgets the Re of the unpaired Nyquist frequency's cross term."""

    def port(*, x, band=160):
        bh, bw = (band, band) if isinstance(band, int) else band
        uh, vh = _axis_imag(x.shape[2], bh // 2, x)
        uw, vw = _axis_imag(x.shape[3], bw // 2, x)
        s = (x.double() @ vw) @ vh  # (N, C): v_H^T x v_W
        return fn(x=x, band=band) + (s[:, :, None, None] * uh[:, None] * uw[None, :]).to(x.dtype)

    return port


def _no_scale(fn):
    """Forgets the mean-preserving scale (2 b_h 2 b_w) / (H W)."""

    def port(*, x, band=160):
        bh, bw = (band, band) if isinstance(band, int) else band
        return fn(x=x, band=band) * (x.shape[2] * x.shape[3] / (4.0 * (bh // 2) * (bw // 2)))

    return port


LOW_FREQUENCY_CROP = Spec(
    name=NAME,
    paper=8,
    family="layers",
    summary="Crop the centred low-frequency band of each image plane's spectrum, as two small real matrix "
            "products (no FFT).",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=("x",),
    tolerance=TOLERANCE,
    reduction_length=lambda sample: int(np.prod(np.shape(sample.arrays["x"])[2:])),
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(256, 3, 224, BENCH_BAND),),
    bytes_moved=_bytes,
    flops=_flops,
    properties=("an even band equal to the image size is the identity",
                "the image mean of every plane is preserved",
                "the gradient is the adjoint: <y, g> = <x, dx> (the spectral zero-pad)",
                "NaN or inf anywhere in a plane makes that whole output plane NaN"),
    wrong_ports={"drops the Nyquist cross term (no Re of the rank-one part)": _drops_cross_term,
                 "forgets the mean-preserving scale": _no_scale},
)

register(LOW_FREQUENCY_CROP)
