"""Specs of Mesa (P21): 8-bit running-range quantisation and the memory-saving layers built on it.

The rounding noise is an explicit input. The strategies nudge it (by 0.05, after rounding to the
dtype under test) so that no element sits within 0.02 of a rounding boundary of the reference's
float64 computation: the codes ``q`` must then match exactly, and so must every gradient computed
from them (a code off by one would move the dequantised activation by a whole step, |alpha| / 255).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...numerics import round_to_dtype
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad
from twinops.reference.layers import mesa as R

REF = "twinops.reference.layers.mesa"
ACC = "twinops.accelerated.layers.mesa"
BASE = "twinops.conformance.baselines.layers.mesa"

# Sizes around the 32-element chunks the kernels use under the interpreter.
SIZES = (1, 2, 3, 5, 8, 16, 17, 33)
MOMENTA = (0.1, 0.5, 1.0)
MAX_ELEMENTS = 600  # keeps interpreter runs short; the gpu profile is not capped


def _shape(draw, profile: str, sizes_per_dim, cap: int = MAX_ELEMENTS) -> tuple:
    """A shape whose dimensions come from ``sizes_per_dim`` (one tuple per axis), at most ``cap``
    elements (checked axis by axis, the last axis first so it keeps its full range)."""
    cap = 10**9 if profile == "gpu" else cap
    dims, total = [], 1
    for sizes in reversed(sizes_per_dim):
        fits = [n for n in sizes if total * n <= cap] or [min(sizes)]
        n = draw(st.sampled_from(fits))
        dims.append(n)
        total *= n
    return tuple(reversed(dims))

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 2e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "fp32 atol 2e-6: the dequantised activation q / s + beta is computed in fp32 from an fp32 "
        "running state (one rounding of beta, whose magnitude is that of the data).",
    ),
)


def _nudge(x: np.ndarray, noise: np.ndarray, new_range, new_min, groups: int, axis: int, dtype: str) -> np.ndarray:
    """Move rounding noise away from the reference's rounding boundaries (see the module docstring)."""
    s = R._scale(new_range)[None, :, None, None]
    v = (R._grouped(x, groups, axis) - new_min[None, :, None, None]) * s
    u = R._grouped(noise.copy(), groups, axis)
    for _ in range(3):
        w = v + u  # the code changes where w crosses an integer
        close = np.abs(w - np.rint(w)) < 0.02
        if not close.any():
            break
        u = np.where(close, np.where(u < 0.5, u + 0.05, u - 0.05), u)
        u = round_to_dtype(u, dtype)
    return u.reshape(noise.shape)


def _state_arrays(rng, groups: int, x: np.ndarray, axis: int, dtype: str):
    """A plausible running state: near the data's range, sometimes far off (clamping at 0 / 255)."""
    v = R._grouped(x, groups, axis)
    lo, hi = v.min(axis=(0, 2, 3)), v.max(axis=(0, 2, 3))
    kind = rng.integers(0, 3)
    if kind == 0:
        rr, rm = (hi - lo) * rng.uniform(0.8, 1.2, groups), lo + rng.uniform(-0.2, 0.2, groups)
    elif kind == 1:
        rr, rm = (hi - lo) * rng.uniform(0.1, 0.5, groups), lo + (hi - lo) * rng.uniform(0.2, 0.5, groups)
    else:
        rr, rm = rng.uniform(0.5, 3.0, groups), rng.uniform(-2.0, 0.5, groups)
    return round_to_dtype(rr, dtype), round_to_dtype(rm, dtype)


@st.composite
def _quant_case(draw, dtype: str, shape: tuple, axis: int, transform=None):
    """x, state, hyper-parameters and nudged noise; ``transform`` maps x to the quantised tensor
    (softmax quantises its output)."""
    rng = seed(draw)
    d = shape[axis]
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if d % g == 0]))
    scale = draw(st.sampled_from((1e-2, 1.0, 5.0)))
    x = round_to_dtype(rng.normal(size=shape) * scale + rng.normal() * scale, dtype)
    quantised = transform(x) if transform else x
    rr, rm = _state_arrays(rng, groups, quantised, axis, dtype)
    momentum = draw(st.sampled_from(MOMENTA))
    mode = draw(st.sampled_from(("train", "train", "first", "eval")))
    training, first_step = mode != "eval", mode == "first"
    new_range, new_min = R._update_state(quantised, rr, rm, groups=groups, axis=axis, momentum=momentum,
                                         training=training, first_step=first_step)
    noise = round_to_dtype(rng.uniform(0.0, 1.0, size=shape), dtype)
    noise = np.minimum(noise, np.nextafter(1.0, 0.0))
    noise = _nudge(quantised, noise, new_range, new_min, groups, axis, dtype)
    kwargs = dict(groups=groups, momentum=momentum, training=training, first_step=first_step)
    return rng, x, rr, rm, noise, kwargs


# ------------------------------------------------------------------------------- quantise


@st.composite
def _quantize_samples(draw, profile: str, dtype: str):
    rank = draw(st.integers(1, 3))
    shape = _shape(draw, profile, [SIZES] * rank)
    axis = draw(st.integers(0, rank - 1))
    rng, x, rr, rm, noise, kwargs = draw(_quant_case(dtype, shape, axis))
    layouts = {"x": draw(st.sampled_from(("contiguous", "strided", "row_strided")))}
    if rank == 2:
        layouts["x"] = draw(st.sampled_from(("contiguous", "transposed", "strided")))
    return Sample(arrays={"x": x, "running_range": rr, "running_min": rm, "noise": noise},
                  kwargs={**kwargs, "dim": axis - rank if draw(st.booleans()) else axis},
                  float_inputs=("x", "running_range", "running_min", "noise"), layouts=layouts)


def _grid_example(shape=(4, 6), groups=2) -> Sample:
    """Round-to-nearest (no noise) on values a quarter step above the grid, first step: exact codes."""
    rng = np.random.default_rng(3)
    k = rng.integers(0, 255, size=shape).astype(np.float64)
    k[0, :] = 0.0
    k[1, :] = 255.0  # every group spans exactly [0, 1]: scale 255
    x = np.where(k == 255.0, 1.0, (k + 0.25) / 255.0)
    x[0, :] = 0.0
    return Sample(arrays={"x": x, "running_range": np.ones(groups), "running_min": np.zeros(groups)},
                  kwargs=dict(groups=groups, first_step=True), float_inputs=("x", "running_range", "running_min"))


def _quantize_examples():
    constant = Sample(arrays={"x": np.full((3, 4), 0.75), "running_range": np.zeros(1), "running_min": np.zeros(1)},
                      kwargs=dict(first_step=True), float_inputs=("x", "running_range", "running_min"),
                      note="constant tensor: range clamped at 1e-8, every code 0")
    return [_grid_example(), constant]


def _bad(arrays: dict, kwargs: dict | None = None):
    return lambda: (arrays, kwargs or {})


def _quant_bad_inputs(make_x, extra: dict | None = None, axis_note: str = "") -> tuple[BadInput, ...]:
    """Bad inputs of every quantising operation; ``make_x()`` gives a valid x whose grouped axis has 4
    entries; ``extra`` adds the layer's other inputs."""
    extra = extra or {}
    x = make_x()

    def call(kwargs=None, **arrays):
        base = {"x": x, **extra, "running_range": np.ones(2), "running_min": np.zeros(2)}
        return _bad({**base, **arrays}, {"groups": 2, **(kwargs or {})})

    x_nan = x.copy()
    x_nan.reshape(-1)[0] = np.nan
    return (
        BadInput("channels not divisible by groups" + axis_note, call({"groups": 3}), ValueError, "groups"),
        BadInput("running state of the wrong shape", call(running_range=np.ones(3)), ValueError, "running_range"),
        BadInput("non-finite running statistics", call(running_min=np.array([0.0, np.inf])), ValueError,
                 "running_min", data_dependent=True),
        BadInput("eval mode before any running statistic exists", call({"training": False, "first_step": True}),
                 ValueError, "first_step"),
        BadInput("NaN in x", call(x=x_nan), ValueError, "finite", data_dependent=True),
        BadInput("noise of the wrong shape", call(noise=np.zeros(3)), ValueError, "noise"),
        BadInput("momentum > 1", call({"momentum": 1.5}), ValueError, "momentum"),
        BadInput("momentum = 0", call({"momentum": 0.0}), ValueError, "momentum"),
    )


def _stale_scale(fn):
    """Quantises with the previous step's state (the 'one-launch' shortcut) but returns the new state."""

    def port(**kw):
        if not kw.get("training", True):
            return fn(**kw)
        q_old = fn(**dict(kw, training=False, first_step=False))[0] if not kw.get("first_step") else None
        out = fn(**kw)
        return (out[0] if q_old is None else q_old,) + tuple(out[1:])

    return port


def _ignores_noise(fn):
    return lambda **kw: fn(**dict(kw, noise=None))


def _elementwise_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: read x twice (group min / max, then quantise + op), write y and the 1-byte codes;
    backward: read the codes and the upstream gradient, write the gradient. Saved for backward:
    n bytes of codes + 8 G of state, against 2 n for a bf16 activation."""
    n = int(np.prod(np.shape(arrays["x"])))
    fwd, bwd = 3 * n * itemsize + n, 2 * n * itemsize + n
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _quantize_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Read x twice, write one byte per element."""
    n = int(np.prod(np.shape(arrays["x"])))
    return float(2 * n * itemsize + n)


def _vit_inputs(shape, groups):
    def make(rng):
        x = rng.standard_normal(shape, dtype=np.float32)
        return {"x": x, "running_range": np.full(groups, 6.0, np.float32),
                "running_min": np.full(groups, -3.0, np.float32)}, {"groups": groups}

    return make


QUANTIZE = Spec(
    name="mesa_quantize",
    paper=21,
    family="layers",
    summary="Mesa: 8-bit group-wise quantisation with a running (range, min) estimate and optional stochastic "
            "rounding; returns the codes and the updated state.",
    reference=f"{REF}:mesa_quantize",
    reference_grad=None,
    accelerated=f"{ACC}:mesa_quantize",
    baseline=f"{BASE}:mesa_quantize",
    samples=lambda profile, dtype: _quantize_samples(profile, dtype),
    tolerance=TOLERANCE,
    bad_inputs=_quant_bad_inputs(lambda: np.linspace(-1.0, 1.0, 12).reshape(3, 4)) + (
        BadInput("dim out of range", _bad({"x": np.zeros((3, 4)), "running_range": np.ones(1),
                                            "running_min": np.zeros(1)}, {"dim": 2}), ValueError, "dim"),
    ),
    examples=_quantize_examples,
    bench_cases=(BenchCase("64x197x768 G=12", _vit_inputs((64, 197, 768), 12), ("x",),
                           smoke=_vit_inputs((2, 3, 24), 12), dtypes=("bfloat16",)),),
    bytes_moved=_quantize_bytes,
    output_dtypes=("uint8", "float32", "float32"),
    properties=("codes are exact (uint8) given the noise; the state is float32",),
    wrong_ports={"quantises with the previous step's state": _stale_scale,
                 "ignores the rounding noise": _ignores_noise},
)


# ----------------------------------------------------------------------------- dequantise


@st.composite
def _dequantize_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    rank = draw(st.integers(1, 3))
    shape = _shape(draw, profile, [SIZES] * rank)
    axis = draw(st.integers(0, rank - 1))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if shape[axis] % g == 0]))
    q = rng.integers(0, 256, size=shape).astype(np.uint8)
    q.reshape(-1)[0] = 255
    rr = rng.uniform(1e-3, 10.0, groups) * rng.choice([-1.0, 1.0], groups)
    rm = rng.normal(size=groups) * 3
    return Sample(arrays={"q": q, "running_range": rr, "running_min": rm}, kwargs={"groups": groups, "dim": axis},
                  float_inputs=("running_range", "running_min"))


def _dequantize_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    n = int(np.prod(np.shape(arrays["q"])))
    return float(n + n * itemsize)


def _vit_codes(shape, groups):
    def make(rng):
        return {"q": rng.integers(0, 256, size=shape).astype(np.uint8), "running_range": np.full(groups, 6.0),
                "running_min": np.full(groups, -3.0)}, {"groups": groups}

    return make


def _wrong_dequant_group(fn):
    """Uses group 0's scale for every group."""
    import torch

    def port(q, running_range, running_min, **kw):
        return fn(q=q, running_range=running_range[:1].expand(running_range.shape).contiguous(),
                  running_min=running_min[:1].expand(running_min.shape).contiguous(), **kw)

    return lambda **kw: port(**kw) if torch.is_tensor(kw["running_range"]) else fn(**kw)


DEQUANTIZE = Spec(
    name="mesa_dequantize",
    paper=21,
    family="layers",
    summary="Mesa: restore 8-bit codes, x_hat = q / s_g + beta_g with s_g = 255 / max(|alpha_g|, 1e-8).",
    reference=f"{REF}:mesa_dequantize",
    reference_grad=None,
    accelerated=f"{ACC}:mesa_dequantize",
    baseline=f"{BASE}:mesa_dequantize",
    samples=lambda profile, dtype: _dequantize_samples(profile, dtype),
    tolerance=TOLERANCE,
    bad_inputs=(
        BadInput("float codes", _bad({"q": np.zeros((2, 4)), "running_range": np.ones(1), "running_min": np.zeros(1)}),
                 TypeError, "q"),
        BadInput("channels not divisible by groups", _bad(
            {"q": np.zeros((2, 4), np.uint8), "running_range": np.ones(3), "running_min": np.zeros(3)},
            {"groups": 3}), ValueError, "groups"),
        BadInput("running state of the wrong shape", _bad(
            {"q": np.zeros((2, 4), np.uint8), "running_range": np.ones(3), "running_min": np.zeros(2)},
            {"groups": 2}), ValueError, "running_range"),
    ),
    bench_cases=(BenchCase("64x197x768 G=12", _vit_codes((64, 197, 768), 12), ("running_range", "running_min"),
                           smoke=_vit_codes((2, 3, 24), 12), dtypes=("bfloat16",)),),
    bytes_moved=_dequantize_bytes,
    wrong_ports={"one scale for every group": _wrong_dequant_group},
)


# ------------------------------------------------------------------------------------ GELU


@st.composite
def _gelu_samples(draw, profile: str, dtype: str):
    rank = draw(st.integers(1, 3))
    shape = _shape(draw, profile, [SIZES] * (rank - 1) + [(4, 6, 8, 12, 17)])
    rng, x, rr, rm, noise, kwargs = draw(_quant_case(dtype, shape, rank - 1))
    layout = draw(st.sampled_from(("contiguous", "strided", "row_strided") + (("transposed",) if rank == 2 else ())))
    return Sample(arrays={"x": x, "running_range": rr, "running_min": rm, "noise": noise}, kwargs=kwargs,
                  float_inputs=("x", "running_range", "running_min", "noise"), layouts={"x": layout},
                  grad_out=upstream_grad(rng, shape))


def _saved_point_function(op, prime_input=lambda values: values["x"]):
    """What the Mesa gradient differentiates: the operation shifted to the dequantised activation,
    x -> op(x_hat_0 + (x - x_0)), whose derivative at x_0 is op'(x_hat_0) (the saved codes are constants)."""

    def make(values: dict, kwargs: dict):
        x0 = values["x"]
        axis = x0.ndim - 1
        q, new_range, new_min, groups = R._prepare(x0, values["running_range"], values["running_min"],
                                                   values.get("noise"), kwargs.get("groups", 1), axis,
                                                   kwargs.get("momentum", 0.1), kwargs.get("training", True),
                                                   kwargs.get("first_step", False))
        x_hat = R._dequantize(q, new_range, new_min, groups, axis)
        return lambda x, **rest: op(x_hat + (x - x0))

    return make


def _exact_gradient(op_name: str):
    """The full-precision gradient (at x, not at the saved activation): what Mesa approximates."""

    def wrap(fn):
        import torch

        def port(**kw):
            y, new_range, new_min = fn(**kw)
            x = kw["x"].float()
            exact = (torch.nn.functional.gelu(x) if op_name == "gelu" else torch.softmax(x, dim=-1)).to(y.dtype)
            return y.detach() + (exact - exact.detach()), new_range, new_min

        return lambda **kw: port(**kw) if torch.is_tensor(kw["x"]) else fn(**kw)

    return wrap


GELU = Spec(
    name="mesa_gelu",
    paper=21,
    family="layers",
    summary="Mesa GELU: exact erf GELU forward; the backward uses GELU'(x_hat) from the 8-bit saved input.",
    reference=f"{REF}:mesa_gelu",
    reference_grad=f"{REF}:mesa_gelu_grad",
    accelerated=f"{ACC}:mesa_gelu",
    baseline=f"{BASE}:mesa_gelu",
    samples=lambda profile, dtype: _gelu_samples(profile, dtype),
    grad_inputs=("x",),
    tolerance=TOLERANCE,
    bad_inputs=_quant_bad_inputs(lambda: np.linspace(-1.0, 1.0, 12).reshape(3, 4)),
    bench_cases=(BenchCase("64x197x768 G=12", _vit_inputs((64, 197, 768), 12), ("x",),
                           smoke=_vit_inputs((2, 3, 24), 12), dtypes=("bfloat16",)),),
    bytes_moved=_elementwise_bytes,
    fd_function=_saved_point_function(R._gelu),
    output_dtypes=("input", "float32", "float32"),
    grad_output_index=0,
    properties=("saved for backward: uint8 codes (1 byte / element) + 8 G bytes of state",),
    wrong_ports={"full-precision gradient (not at the saved activation)": _exact_gradient("gelu"),
                 "quantises with the previous step's state": _stale_scale},
)


# --------------------------------------------------------------------------------- softmax


@st.composite
def _softmax_samples(draw, profile: str, dtype: str):
    shape = _shape(draw, profile, [(1, 2), (1, 2, 3, 4), (1, 2, 3), SIZES], cap=400)
    rng, x, rr, rm, noise, kwargs = draw(_quant_case(dtype, shape, 1, transform=R._softmax))
    layout = draw(st.sampled_from(("contiguous", "strided", "row_strided")))
    return Sample(arrays={"x": x, "running_range": rr, "running_min": rm, "noise": noise}, kwargs=kwargs,
                  float_inputs=("x", "running_range", "running_min", "noise"), layouts={"x": layout},
                  grad_out=upstream_grad(rng, shape))


def _softmax_linearisation(values: dict, kwargs: dict):
    """What the Mesa softmax gradient differentiates: softmax linearised at the dequantised output
    y_hat_0, x -> y_hat_0 + (diag(y_hat_0) - y_hat_0 y_hat_0^T)(x - x_0) row by row (its VJP is
    y_hat_0 (g - sum g y_hat_0); the saved codes are constants)."""
    x0 = values["x"]
    y0 = R._softmax(x0)
    q, new_range, new_min, groups = R._prepare(y0, values["running_range"], values["running_min"], values.get("noise"),
                                               kwargs.get("groups", 1), 1, kwargs.get("momentum", 0.1),
                                               kwargs.get("training", True), kwargs.get("first_step", False))
    y_hat = R._dequantize(q, new_range, new_min, groups, 1)

    def f(x, **rest):
        dx = x - x0
        return y_hat + y_hat * dx - y_hat * np.sum(y_hat * dx, axis=-1, keepdims=True)

    return f


def _scores_inputs(shape, groups):
    def make(rng):
        x = rng.standard_normal(shape, dtype=np.float32) * 2.0
        return {"x": x, "running_range": np.full(groups, 0.5, np.float32),
                "running_min": np.zeros(groups, np.float32)}, {"groups": groups}

    return make


SOFTMAX = Spec(
    name="mesa_softmax",
    paper=21,
    family="layers",
    summary="Mesa softmax: exact softmax over the last axis of (B, H, N, M) scores; the backward uses the "
            "8-bit saved output, grouped by heads.",
    reference=f"{REF}:mesa_softmax",
    reference_grad=f"{REF}:mesa_softmax_grad",
    accelerated=f"{ACC}:mesa_softmax",
    baseline=f"{BASE}:mesa_softmax",
    samples=lambda profile, dtype: _softmax_samples(profile, dtype),
    grad_inputs=("x",),
    tolerance=TOLERANCE,
    bad_inputs=_quant_bad_inputs(lambda: np.linspace(-1.0, 1.0, 24).reshape(1, 4, 2, 3), axis_note=" (heads)") + (
        BadInput("3-D scores", _bad({"x": np.zeros((4, 2, 3)), "running_range": np.ones(1),
                                     "running_min": np.zeros(1)}), ValueError, "(B, H, N, M)"),
    ),
    bench_cases=(BenchCase("64x12x197x197 G=12", _scores_inputs((64, 12, 197, 197), 12), ("x",),
                           smoke=_scores_inputs((1, 12, 2, 5), 12), dtypes=("bfloat16",)),),
    bytes_moved=_elementwise_bytes,
    fd_function=_softmax_linearisation,
    output_dtypes=("input", "float32", "float32"),
    grad_output_index=0,
    properties=("saved for backward: uint8 codes of the output (1 byte / element) + 8 G bytes of state",),
    wrong_ports={"full-precision gradient (not at the saved output)": _exact_gradient("softmax"),
                 "quantises with the previous step's state": _stale_scale},
)


# ------------------------------------------------------------------------------- LayerNorm


@st.composite
def _layernorm_samples(draw, profile: str, dtype: str):
    rank = draw(st.integers(2, 3))
    shape = _shape(draw, profile, [(1, 2, 3, 5)] * (rank - 1) + [(2, 4, 6, 12, 17, 33)], cap=300)
    c = shape[-1]
    rng, x, rr, rm, noise, kwargs = draw(_quant_case(dtype, shape, rank - 1))
    w = round_to_dtype(rng.normal(size=c) * 0.5 + 1.0, dtype)
    b = round_to_dtype(rng.normal(size=c) * 0.5, dtype)
    eps = draw(st.sampled_from((1e-5, 1e-3, 0.1)))
    layout = draw(st.sampled_from(("contiguous", "strided", "row_strided") + (("transposed",) if rank == 2 else ())))
    return Sample(arrays={"x": x, "weight": w, "bias": b, "running_range": rr, "running_min": rm, "noise": noise},
                  kwargs={**kwargs, "eps": eps},
                  float_inputs=("x", "weight", "bias", "running_range", "running_min", "noise"),
                  layouts={"x": layout, "weight": draw(st.sampled_from(("contiguous", "strided")))},
                  grad_out=upstream_grad(rng, shape))


def _layernorm_at_saved_input(values: dict, kwargs: dict):
    """What the Mesa LayerNorm gradient differentiates: LayerNorm linearised at the dequantised input
    with the exact row statistics, row by row
    x, w, b -> w (n_hat + r (d - mean d - n_hat mean(n_hat d))) + b, d = x - x_0, n_hat = (x_hat_0 - mean) r
    (n_hat and r are constants: the saved codes and the saved statistics)."""
    x0 = values["x"]
    axis = x0.ndim - 1
    q, new_range, new_min, groups = R._prepare(x0, values["running_range"], values["running_min"], values.get("noise"),
                                               kwargs.get("groups", 1), axis, kwargs.get("momentum", 0.1),
                                               kwargs.get("training", True), kwargs.get("first_step", False))
    mean, rstd = R._ln_stats(x0, kwargs.get("eps", 1e-5))
    n_hat = (R._dequantize(q, new_range, new_min, groups, axis) - mean) * rstd

    def f(x, weight, bias, **rest):
        d = x - x0
        lin = d - d.mean(axis=-1, keepdims=True) - n_hat * (n_hat * d).mean(axis=-1, keepdims=True)
        return weight * (n_hat + rstd * lin) + bias

    return f


def _ln_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: read x twice (group min / max, then the row kernel; its re-reads of a row hit the cache),
    write y and the codes, 8 bytes of mean / rstd a row. Backward: read codes and upstream gradient
    twice (dx and the weight / bias sums), write dx. Saved: n + 8 R + 8 G bytes against 2 n + 8 R (bf16)."""
    shape = np.shape(arrays["x"])
    n, rows = int(np.prod(shape)), int(np.prod(shape[:-1]))
    fwd = 3 * n * itemsize + n + 8 * rows
    bwd = 2 * (n + n * itemsize) + n * itemsize + 8 * rows
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _ln_inputs(shape, groups):
    def make(rng):
        arrays, kw = _vit_inputs(shape, groups)(rng)
        c = shape[-1]
        arrays.update(weight=np.ones(c, np.float32) + 0.1 * rng.standard_normal(c, dtype=np.float32),
                      bias=0.1 * rng.standard_normal(c, dtype=np.float32))
        return arrays, kw

    return make


def _ln_exact_gradient(fn):
    """The full-precision LayerNorm gradient (at x, not at the dequantised input)."""
    import torch

    def port(**kw):
        y, new_range, new_min = fn(**kw)
        x = kw["x"]
        exact = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), kw["weight"].float(), kw["bias"].float(),
                                               kw.get("eps", 1e-5)).to(y.dtype)
        return y.detach() + (exact - exact.detach()), new_range, new_min

    return lambda **kw: port(**kw) if torch.is_tensor(kw["x"]) else fn(**kw)


def _ln_bad(arrays_change: dict, description: str, match: str):
    x = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    base = {"x": x, "weight": np.ones(4), "bias": np.zeros(4), "running_range": np.ones(2), "running_min": np.zeros(2)}
    return BadInput(description, _bad({**base, **arrays_change}, {"groups": 2}), ValueError, match)


LAYERNORM = Spec(
    name="mesa_layernorm",
    paper=21,
    family="layers",
    summary="Mesa LayerNorm: exact LayerNorm forward; the backward recomputes the normalised input from the "
            "8-bit saved x and the exact row mean / rstd.",
    reference=f"{REF}:mesa_layernorm",
    reference_grad=f"{REF}:mesa_layernorm_grad",
    accelerated=f"{ACC}:mesa_layernorm",
    baseline=f"{BASE}:mesa_layernorm",
    samples=lambda profile, dtype: _layernorm_samples(profile, dtype),
    grad_inputs=("x", "weight", "bias"),
    tolerance=Tolerance(
        rtol=TOLERANCE.rtol, atol={"float64": 1e-12, "float32": 2e-6, "float16": 1e-4, "bfloat16": 1e-3},
        atol_scales_with_row=True,
        reasons=TOLERANCE.reasons + (
            "atol relative to the row's largest entry and growing with sqrt(C or rows): dx is a difference of "
            "row means of g w and g w n_hat, dweight / dbias are sums over rows.",
        ),
    ),
    reduction_length=lambda sample: int(np.prod(np.shape(sample.arrays["x"])[:-1])) + np.shape(sample.arrays["x"])[-1],
    bad_inputs=_quant_bad_inputs(lambda: np.linspace(-1.0, 1.0, 12).reshape(3, 4),
                                 extra={"weight": np.ones(4), "bias": np.zeros(4)}) + (
        _ln_bad({"weight": np.ones(3)}, "weight of the wrong shape", "weight"),
        _ln_bad({"bias": np.ones((4, 1))}, "bias of the wrong shape", "bias"),
    ),
    bench_cases=(BenchCase("64x197x768 G=12", _ln_inputs((64, 197, 768), 12), ("x", "weight", "bias"),
                           smoke=_ln_inputs((2, 3, 24), 12), dtypes=("bfloat16",)),),
    bytes_moved=_ln_bytes,
    fd_function=_layernorm_at_saved_input,
    output_dtypes=("input", "float32", "float32"),
    grad_output_index=0,
    properties=("saved for backward: uint8 codes of x, fp32 mean / rstd per row, 8 G bytes of state",),
    wrong_ports={"full-precision gradient (not at the saved input)": _ln_exact_gradient,
                 "quantises with the previous step's state": _stale_scale},
)

register(QUANTIZE, DEQUANTIZE, GELU, SOFTMAX, LAYERNORM)
