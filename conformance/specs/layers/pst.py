"""Specs of PST (P10): the sparse linear layer with the straight-through mask, and the cubic sparsity
schedule that drives it."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad
from ...wrong_ports import replaces_argument

REF = "twinops.reference.layers.pst"
ACC = "twinops.accelerated.layers.pst"
BASE = "twinops.conformance.baselines.layers.pst"

# Token counts and widths around the 16-wide tiles the kernels use under the interpreter (64/128 on the GPU).
TOKENS = {"ci": (1, 2, 5, 16, 17), "dev": (1, 2, 3, 7, 15, 16, 17, 31, 33, 48), "gpu": (1, 17, 64, 129, 1000)}
WIDTHS = {"ci": (1, 3, 8, 16, 17, 20), "dev": (1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 40),
          "gpu": (3, 63, 64, 65, 128, 257, 768)}
RANKS = (1, 2, 3, 8, 17)
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)
GRAD_INPUTS = ("x", "U", "V", "A", "B", "R", "C")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-4, "bfloat16": 8e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(N + d_in + d_out): y sums over d_in, dx over d_out, and the parameter "
        "gradients over the tokens (G = dy^T x) and then over a weight row or column.",
        "atol scales with the row's largest entry: a sum that nearly cancels keeps the rounding error "
        "of its largest terms.",
        "16-bit atol 1e-4 (fp16) / 8e-4 (bf16), 10x / 8x the default: M * W' is rounded once to the input "
        "dtype before the tensor-core GEMM (as F.linear on a 16-bit weight), so the error of y and dx "
        "scales with sum |x| |W'| (about the row's largest entry) rather than with the entry itself.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


# ---------------------------------------------------------------------------- pst_sparse_linear


def _layer_arrays(rng, n, d_in, d_out, rw, rm, mode, scale=1.0, leading=None):
    x = rng.normal(size=(leading or ()) + (n, d_in)) * scale
    arrays = {
        "x": x,
        "weight": rng.normal(size=(d_out, d_in)) * 0.5,
        "U": rng.normal(size=(d_out, rw)),
        "V": rng.normal(size=(rw, d_in)) * 0.1,
        "A": rng.normal(size=(d_out, rm)),
        "B": rng.normal(size=(rm, d_in)) * 0.1,
        "R": rng.normal(size=d_out) * 0.1,
        "C": rng.normal(size=d_in) * 0.1,
    }
    if mode == "at initialisation":  # the authors' init: V = B = 0, R = C = 0, so S = |W|
        for k in ("V", "B", "R", "C"):
            arrays[k] = np.zeros_like(arrays[k])
    return arrays


@st.composite
def _layer_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(TOKENS[profile]))
    d_in = draw(st.sampled_from(WIDTHS[profile]))
    d_out = draw(st.sampled_from(WIDTHS[profile]))
    ranks = [r for r in RANKS if r <= min(d_in, d_out)]
    rw, rm = draw(st.sampled_from(ranks)), draw(st.sampled_from(ranks))
    mode = draw(st.sampled_from(("trained", "trained", "at initialisation")))
    scale = draw(st.sampled_from((1.0, 1.0, 1e-2, 30.0)))
    leading = (2,) if draw(st.integers(0, 4)) == 0 else None
    arrays = _layer_arrays(rng, n, d_in, d_out, rw, rm, mode, scale, leading)
    kwargs = {
        "sparsity": draw(st.one_of(st.sampled_from(SPARSITIES), st.floats(0.0, 1.0))),
        "beta": draw(st.sampled_from((1.0, 1.0, 0.5, -2.0))),
        "alpha1": draw(st.sampled_from((1.0, 1.0, 0.0, 3.0))),
        "alpha2": draw(st.sampled_from((1.0, 1.0, 0.0, 0.25))),
    }
    if draw(st.booleans()):
        arrays["bias"] = rng.normal(size=d_out)
    else:
        kwargs["bias"] = None
    layouts = {
        "x": draw(st.sampled_from(("contiguous", "strided", "row_strided") if leading else LAYOUTS)),
        "weight": draw(st.sampled_from(("contiguous", "transposed"))),
        "U": draw(st.sampled_from(("contiguous", "transposed"))),
        "V": draw(st.sampled_from(("contiguous", "strided"))),
        "B": draw(st.sampled_from(("contiguous", "transposed"))),
        "C": draw(st.sampled_from(("contiguous", "strided"))),
    }
    out_shape = arrays["x"].shape[:-1] + (d_out,)
    return Sample(arrays, kwargs, tuple(arrays), layouts=layouts, grad_out=upstream_grad(rng, out_shape),
                  note=f"{mode}, x scale={scale:g}")


def _tie_arrays():
    """A 4 x 6 weight whose first 8 entries (rows 0-1 and row 1's start) share the score 0.25: with
    k = 6 the six lowest flat indices among them are pruned. Dyadic values keep every score exact in
    fp16, fp32 and fp64, so the tie survives any rounding."""
    w = np.array([[0.25, -0.25, 0.25, 0.25, -0.25, 0.25],
                  [0.25, 0.25, 1.5, -2.0, 0.75, 1.0],
                  [-1.25, 0.5, 3.0, -0.5, 2.5, -1.75],
                  [1.0, -0.75, 0.625, 2.0, -1.5, 0.875]])
    rng = np.random.default_rng(11)
    return {
        "x": np.round(rng.normal(size=(5, 6)) * 8) / 8,
        "weight": w,
        "U": np.array([[1.0], [0.5], [-0.5], [0.25]]),
        "V": np.zeros((1, 6)),
        "A": np.array([[1.0], [0.0], [0.5], [-1.0]]),
        "B": np.zeros((1, 6)),
        "R": np.zeros(4),
        "C": np.zeros(6),
    }


def _layer_edge_cases() -> list[Sample]:
    rng = np.random.default_rng(5)
    out = []

    def add(arrays, note, sparsity, bias=True, **kw):
        arrays = dict(arrays)
        kwargs = {"sparsity": sparsity, **kw}
        d_out = arrays["weight"].shape[0]
        if bias:
            arrays["bias"] = np.round(rng.normal(size=d_out) * 4) / 4
        else:
            kwargs["bias"] = None
        shape = arrays["x"].shape[:-1] + (d_out,)
        out.append(Sample(arrays, kwargs, tuple(arrays), grad_out=upstream_grad(rng, shape), note=note))

    ties = _tie_arrays()
    add(ties, "tied scores: the lowest flat indices are pruned first (k = 6 of 8 tied)", 0.25)
    add(ties, "tied scores cut after the first (k = 1)", 1 / 24 + 1e-9)
    base = _layer_arrays(rng, 7, 9, 5, 2, 3, "trained")
    add(base, "sparsity 0: nothing pruned, the score parameters still get gradients", 0.0)
    add(base, "sparsity 1: an all-zero weight, y = bias", 1.0)
    add(_layer_arrays(rng, 7, 9, 5, 2, 3, "at initialisation"), "authors' initialisation, 90% sparse", 0.9,
        bias=False)
    nan_x = dict(base, x=base["x"].copy())
    nan_x["x"][2, 4] = np.nan
    add(nan_x, "NaN in a token: its output row NaN", 0.5)
    nan_w = dict(base, weight=base["weight"].copy())
    nan_w["weight"][1, 3] = np.nan
    add(nan_w, "NaN weight: its score sorts last (kept), output column NaN", 0.5)
    add(nan_w, "NaN weight pruned at sparsity 1 (0 * NaN is NaN)", 1.0)
    inf_x = dict(base, x=base["x"].copy())
    inf_x["x"][0, 0] = np.inf
    add(inf_x, "inf in a token", 0.3)
    add(dict(base, x=base["x"][:0]), "N = 0: empty output, zero parameter gradients", 0.5)
    add(_layer_arrays(rng, 3, 1, 4, 1, 1, "trained"), "d_in = 1 (rank 1)", 0.5)
    add(_layer_arrays(rng, 4, 6, 5, 2, 2, "trained", leading=(2,)), "x with a leading batch dimension", 0.6)
    return out


def _surrogate(values: dict, kwargs: dict):
    """What the straight-through gradient differentiates: the mask M0, the score S0 and W'0 frozen at
    the unperturbed inputs, y = x (M0 * W')^T + b + x ((S - S0) * W'0)^T. Its value equals the layer's,
    and its exact derivative is the STE gradient (dS = W' * G flows into A, B, R, C and, through |W'|,
    into U and V)."""
    from twinops.reference.layers.pst import _forward_parts

    def parts(vals):
        return _forward_parts(np.asarray(vals["weight"]), vals["U"], vals["V"], vals["A"], vals["B"], vals["R"],
                              vals["C"], kwargs["sparsity"], kwargs.get("beta", 1.0), kwargs.get("alpha1", 1.0),
                              kwargs.get("alpha2", 1.0))

    w0, s0, m0 = parts(values)

    def f(**vals):
        w_prime, score, _ = parts(vals)
        x = np.asarray(vals["x"])
        rows = x.reshape(-1, x.shape[-1])
        with np.errstate(invalid="ignore", over="ignore"):
            y = rows @ (m0 * w_prime).T + rows @ ((score - s0) * w0).T
        bias = vals.get("bias", kwargs.get("bias"))
        if bias is not None:
            y = y + bias
        return y.reshape(x.shape[:-1] + (w_prime.shape[0],))

    return f


def _reduction_length(sample: Sample) -> int:
    x = np.asarray(sample.arrays["x"])
    d_out, d_in = np.shape(sample.arrays["weight"])
    return int(x.size // max(x.shape[-1], 1)) + d_in + d_out


def _bad_layer(description, error, match, **changes):
    def make():
        rng = np.random.default_rng(0)
        arrays = _layer_arrays(rng, 3, 5, 4, 2, 2, "trained")
        arrays["bias"] = np.zeros(4)
        kwargs = {"sparsity": 0.5}
        for k, v in changes.items():
            (arrays if isinstance(v, np.ndarray) else kwargs)[k] = v
        return arrays, kwargs

    return BadInput(description, make, error, match)


LAYER_BAD_INPUTS = (
    _bad_layer("1-D weight", ValueError, "weight", weight=np.ones(5)),
    _bad_layer("x's last dimension is not d_in", ValueError, "x", x=np.ones((3, 6))),
    _bad_layer("U's rows are not d_out", ValueError, "U", U=np.ones((3, 2))),
    _bad_layer("V's columns are not d_in", ValueError, "V", V=np.ones((2, 4))),
    _bad_layer("U and V ranks differ", ValueError, "rank", V=np.ones((3, 5))),
    _bad_layer("rank of U/V larger than min(d_out, d_in)", ValueError, "rank of U/V",
               U=np.ones((4, 5)), V=np.ones((5, 5))),
    _bad_layer("rank of A/B larger than min(d_out, d_in)", ValueError, "rank of A/B",
               A=np.ones((4, 6)), B=np.ones((6, 5))),
    _bad_layer("A's rows are not d_out", ValueError, "A", A=np.ones((5, 2))),
    _bad_layer("B's columns are not d_in", ValueError, "B", B=np.ones((2, 3))),
    _bad_layer("R is not (d_out,)", ValueError, "R", R=np.ones(5)),
    _bad_layer("C is not (d_in,)", ValueError, "C", C=np.ones(4)),
    _bad_layer("bias is not (d_out,)", ValueError, "bias", bias=np.ones(5)),
    _bad_layer("sparsity > 1", ValueError, "sparsity", sparsity=1.5),
    _bad_layer("sparsity < 0", ValueError, "sparsity", sparsity=-0.1),
    _bad_layer("sparsity NaN", ValueError, "sparsity", sparsity=float("nan")),
    _bad_layer("beta infinite", ValueError, "beta", beta=float("inf")),
    _bad_layer("alpha1 not a number", TypeError, "alpha1", alpha1="1"),
)


def _layer_bench(n: int, d_in: int, d_out: int, sparsity: float, rank: int = 8) -> BenchCase:
    def build(rng, n, d_in, d_out, rank):
        f32 = np.float32
        arrays = {
            "x": rng.standard_normal((n, d_in), dtype=f32),
            "weight": rng.standard_normal((d_out, d_in), dtype=f32) * f32(0.02),
            "bias": rng.standard_normal(d_out, dtype=f32) * f32(0.02),
            "U": rng.standard_normal((d_out, rank), dtype=f32),
            "V": rng.standard_normal((rank, d_in), dtype=f32) * f32(1e-3),
            "A": rng.standard_normal((d_out, rank), dtype=f32),
            "B": rng.standard_normal((rank, d_in), dtype=f32) * f32(1e-3),
            "R": rng.standard_normal(d_out, dtype=f32) * f32(1e-3),
            "C": rng.standard_normal(d_in, dtype=f32) * f32(1e-3),
        }
        return arrays, {"sparsity": sparsity}

    names = ("x", "weight", "bias", "U", "V", "A", "B", "R", "C")
    return BenchCase(f"N={n} {d_in}->{d_out} r=8 sparsity={sparsity:g}", lambda rng: build(rng, n, d_in, d_out, rank),
                     names, smoke=lambda rng: build(rng, 20, 24, 40, 2))


def _layer_flops(arrays: dict, direction: str) -> float:
    """FLOPs the kernels execute, recomputation included: forward 2 N d_in d_out (GEMM) + 2 d_out d_in
    (3 r_w + r_m) (U V in the score and masked-weight kernels, A B in the score); backward
    4 N d_in d_out (dx and G) + 2 d_out d_in (3 r_w + 2 r_m) (U V again, then dU, dV, dA, dB)."""
    x = np.asarray(arrays["x"])
    d_out, d_in = np.shape(arrays["weight"])
    n = x.size // d_in
    rw, rm = np.shape(arrays["U"])[1], np.shape(arrays["A"])[1]
    fwd = 2.0 * n * d_in * d_out + 2.0 * d_out * d_in * (2 * rw + rm)
    bwd = 4.0 * n * d_in * d_out + 2.0 * d_out * d_in * (3 * rw + 2 * rm)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _layer_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: x, W and the factors read, y written; the fp32 score written, sorted (read + write of
    values and int64 indices) and read again; M * W' written and read. Backward: dy and x read (dy
    twice: dx and G), dx written, M * W', W and the score read."""
    x = np.asarray(arrays["x"])
    d_out, d_in = np.shape(arrays["weight"])
    n = x.size // d_in
    w = d_out * d_in
    fwd = (n * d_in + n * d_out + w) * itemsize + w * (4 + 2 * 12 + 4) + 2 * w * itemsize
    bwd = (2 * n * d_out + 2 * n * d_in + 2 * w) * itemsize + 4 * w
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _reversed_tie_order(fn):
    """Ties pruned from the highest flat index (reversing both axes reverses the flat order)."""

    def port(**kw):
        flip = dict(kw)
        for k in ("weight",):
            flip[k] = kw[k].flip(0, 1)
        for k in ("U", "A", "R"):
            flip[k] = kw[k].flip(0)
        for k in ("V", "B"):
            flip[k] = kw[k].flip(1)
        flip["C"] = kw["C"].flip(0)
        flip["x"] = kw["x"].flip(-1)
        if kw.get("bias") is not None:
            flip["bias"] = kw["bias"].flip(0)
        return fn(**flip).flip(-1)

    return port


def _prunes_one_more(fn):
    """k + 1 weights pruned instead of floor(sparsity * numel)."""

    def port(**kw):
        numel = kw["weight"].numel()
        k = int(kw["sparsity"] * numel)
        return fn(**{**kw, "sparsity": min(1.0, (k + 1.5) / numel)})

    return port


def _ignores_structured(fn):
    import torch

    return replaces_argument("C", lambda c, kw: torch.zeros_like(c))(
        replaces_argument("R", lambda r, kw: torch.zeros_like(r))(fn))


PST_SPARSE_LINEAR = Spec(
    name="pst_sparse_linear",
    paper=10,
    family="layers",
    summary="Frozen linear layer with a low-rank update, pruned by the top-k of a data-free + low-rank + "
            "structured score; straight-through gradients.",
    reference=f"{REF}:pst_sparse_linear",
    reference_grad=f"{REF}:pst_sparse_linear_grad",
    accelerated=f"{ACC}:pst_sparse_linear",
    baseline=f"{BASE}:pst_sparse_linear",
    samples=lambda profile, dtype: _layer_samples(profile, dtype),
    examples=_layer_edge_cases,
    grad_inputs=GRAD_INPUTS,
    tolerance=TOLERANCE,
    reduction_length=_reduction_length,
    fd_function=_surrogate,
    bad_inputs=LAYER_BAD_INPUTS,
    bench_cases=(_layer_bench(8192, 768, 3072, 0.5), _layer_bench(8192, 768, 3072, 0.9),
                 _layer_bench(8192, 3072, 768, 0.9)),
    bytes_moved=_layer_bytes,
    flops=_layer_flops,
    properties=("the mask prunes exactly int(sparsity * d_out * d_in) weights, ties by lowest flat index",
                "sparsity 0 keeps every weight but still trains A, B, R, C",
                "weight and bias are frozen: no gradient"),
    wrong_ports={"ties pruned from the highest flat index": _reversed_tie_order,
                 "prunes one weight too many": _prunes_one_more,
                 "ignores the structured scores R, C": _ignores_structured},
)


# ---------------------------------------------------------------------------- cubic_sparsity_schedule


@st.composite
def _schedule_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    total = draw(st.sampled_from((1, 7, 10, 100, 1000, 12345)))
    w_i = draw(st.sampled_from((0.0, 0.1, 0.25, 0.5)))
    w_f = draw(st.sampled_from((0.0, 0.3, 0.45)))
    kwargs = {
        "total_steps": total,
        "initial_sparsity": draw(st.sampled_from((0.0, 0.0, 0.2))),
        "final_sparsity": draw(st.one_of(st.sampled_from((0.9, 0.5, 1.0, 0.0)), st.floats(0.0, 1.0))),
        "initial_warmup": w_i,
        "final_warmup": w_f,
        "frequency": draw(st.sampled_from((1, 1, 3, 10))),
    }
    edges = np.array([0, int(w_i * total), int(w_i * total) + 1, total - int(w_f * total),
                      total - int(w_f * total) + 1, total, total + 1, -1])
    steps = np.concatenate([edges, rng.integers(-2, total + 3, size=draw(st.integers(1, 40)))])
    return Sample({"step": steps.astype(np.int64)}, kwargs, (), grad_out=None, note=f"T={total}")


def _schedule_edge_cases() -> list[Sample]:
    return [
        Sample({"step": np.arange(0, 101)}, {"total_steps": 100}, (), note="the authors' defaults over a 100-step run"),
        Sample({"step": np.array([5, 20])}, {"total_steps": 10, "initial_sparsity": 0.5, "final_sparsity": 0.1},
               (), note="a decreasing schedule"),
        Sample({"step": np.zeros(0, dtype=np.int64)}, {"total_steps": 10}, (), note="no steps"),
    ]


def _bad_schedule(description, error, match, step=np.arange(5), **kwargs):
    return BadInput(description, lambda: ({"step": step}, {"total_steps": 10, **kwargs}), error, match)


SCHEDULE_BAD_INPUTS = (
    _bad_schedule("total_steps = 0", ValueError, "total_steps", total_steps=0),
    _bad_schedule("warmups cover the whole run", ValueError, "initial_warmup + final_warmup",
                  initial_warmup=0.5, final_warmup=0.5),
    _bad_schedule("final_sparsity > 1", ValueError, "final_sparsity", final_sparsity=1.5),
    _bad_schedule("initial_warmup < 0", ValueError, "initial_warmup", initial_warmup=-0.1),
    _bad_schedule("frequency = 0", ValueError, "frequency", frequency=0),
    _bad_schedule("float steps", TypeError, "step", step=np.array([0.5, 1.0])),
    _bad_schedule("total_steps not an int", TypeError, "total_steps", total_steps=10.0),
)


def _schedule_bench(steps: int) -> BenchCase:
    def build(rng, steps):
        return {"step": np.arange(steps, dtype=np.int64)}, {"total_steps": steps}

    return BenchCase(f"every step of a {steps}-step run", lambda rng: build(rng, steps), (),
                     smoke=lambda rng: build(rng, 16), dtypes=("float32",))


def _schedule_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads an int64 step and writes an fp32 sparsity per step."""
    return 12.0 * np.size(arrays["step"])


CUBIC_SPARSITY_SCHEDULE = Spec(
    name="cubic_sparsity_schedule",
    paper=10,
    family="layers",
    summary="PST's cubic sparsity schedule: dense warm-up, cubic ramp to the final sparsity, final plateau.",
    reference=f"{REF}:cubic_sparsity_schedule",
    reference_grad=None,
    accelerated=f"{ACC}:cubic_sparsity_schedule",
    baseline=f"{BASE}:cubic_sparsity_schedule",
    samples=lambda profile, dtype: _schedule_samples(profile, dtype),
    examples=_schedule_edge_cases,
    output_dtypes=("float32",),
    bad_inputs=SCHEDULE_BAD_INPUTS,
    bench_cases=(_schedule_bench(1_000_000),),
    bytes_moved=_schedule_bytes,
    properties=("piecewise: initial_sparsity up to initial_warmup * T, final_sparsity after T - final_warmup * T",),
    wrong_ports={
        "step off by one": replaces_argument("step", lambda s, kw: s + 1),
        "warm-ups swapped": lambda fn: (lambda **kw: fn(**{**kw, "initial_warmup": kw.get("final_warmup", 0.3),
                                                           "final_warmup": kw.get("initial_warmup", 0.1)})),
    },
)

register(PST_SPARSE_LINEAR, CUBIC_SPARSITY_SCHEDULE)
