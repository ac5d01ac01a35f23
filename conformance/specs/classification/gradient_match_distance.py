"""Spec of the gradient-matching distance (P17, ``gradient_match_distance``).

The public functions take two lists of tensors; the conformance engine passes named arrays, so the
spec uses the ``_named`` form of each implementation with a fixed number of slots,
``g_s_0 … g_s_13`` / ``g_r_0 … g_r_13``: the length of DC's ConvNet-3 parameter list (the
benchmark). Each slot draws its own number of dimensions (1 to 4) and shape, so a sample is any
14-tensor parameter list (1-D slots stand for biases and norm parameters, compared under no metric
but "mse" / "cos").
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed, upstream_grad

REF = "twinops.reference.classification.gradient_match_distance"
ACC = "twinops.accelerated.classification.gradient_match_distance"
BASE = "twinops.conformance.baselines.classification.gradient_match_distance"

SLOTS = 14
SYN = tuple(f"g_s_{i}" for i in range(SLOTS))
REAL = tuple(f"g_r_{i}" for i in range(SLOTS))
METRICS = ("ours", "mse", "cos")
SHORT_ROWS = (1, 2, 3, 4, 5)
TILE_ROWS = {"ci": (15, 16, 17, 33), "dev": (15, 16, 17, 31, 32, 33, 64), "gpu": (127, 1024, 1025, 2048, 4097)}
ROW_COUNTS = {"ci": (1, 2, 3), "dev": (1, 2, 3, 5), "gpu": (1, 3, 64, 128)}


def _shape(draw, profile: str) -> tuple:
    """A parameter-gradient shape: 1-D (C,), 2-D (O, I), 3-D (C, h, w) or 4-D (O, I, kh, kw)."""
    ndim = draw(st.integers(1, 4))
    length = draw(st.sampled_from(TILE_ROWS[profile]) if draw(st.integers(0, 4)) == 0 else st.sampled_from(SHORT_ROWS))
    if ndim == 1:
        return (length,)
    rows = draw(st.sampled_from(ROW_COUNTS[profile]))
    divisors = [k for k in range(1, length + 1) if length % k == 0]
    first = draw(st.sampled_from(divisors))
    if ndim == 2:
        return (rows, length)
    if ndim == 3:
        return (rows, first, length // first)
    rest = length // first
    second = draw(st.sampled_from([k for k in range(1, rest + 1) if rest % k == 0]))
    return (rows, first, second, rest // second)


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    metric = draw(st.sampled_from(METRICS))
    eps = draw(st.sampled_from((1e-6, 1e-6, 1e-2)))
    scale_s, scale_r = draw(st.sampled_from((0.1, 1.0, 3.0))), draw(st.sampled_from((0.1, 1.0, 3.0)))
    matched = draw(st.booleans())  # synthetic gradients close to the real ones (distance near 0)
    arrays, layouts = {}, {}
    for i in range(SLOTS):
        shape = _shape(draw, profile)
        real = rng.normal(size=shape) * scale_r
        syn = real * scale_s / scale_r + 0.1 * scale_s * rng.normal(size=shape) if matched else \
            rng.normal(size=shape) * scale_s
        arrays[SYN[i]], arrays[REAL[i]] = syn, real
        for name in (SYN[i], REAL[i]):
            if draw(st.integers(0, 3)) == 0:
                layouts[name] = draw(st.sampled_from(LAYOUTS))
    return Sample(arrays, {"metric": metric, "eps": eps}, SYN + REAL, layouts, grad_out=upstream_grad(rng, ()),
                  note=f"scales syn={scale_s:g} real={scale_r:g}{' matched' if matched else ''}")


def _base(rng) -> dict:
    shapes = [(3, 2, 2, 2), (3,), (3,), (3,), (2, 4, 2), (2,), (4, 5), (4,), (2, 17), (2,), (1, 16), (5,), (3, 1), (1,)]
    arrays = {}
    for i, shape in enumerate(shapes):
        arrays[SYN[i]], arrays[REAL[i]] = rng.normal(size=shape), rng.normal(size=shape)
    return arrays


def _edges() -> list[Sample]:
    rng = np.random.default_rng(17)
    base = _base(rng)
    cases = []

    def case(note, change, metrics):
        arrays = {k: v.copy() for k, v in base.items()}
        change(arrays)
        for metric in metrics:
            cases.append(Sample(arrays, {"metric": metric, "eps": 1e-6}, SYN + REAL,
                                grad_out=upstream_grad(rng, ()), note=note))

    def set_(name, index, value):
        def change(arrays):
            arrays[name][index] = value
        return change

    def replace(pairs):
        def change(arrays):
            for name, value in pairs.items():
                arrays[name] = value
        return change

    case("NaN in a synthetic conv weight", set_("g_s_0", (1, 0, 1, 1), np.nan), ("ours", "cos"))
    case("NaN in a synthetic bias (skipped by 'ours')", set_("g_s_1", 2, np.nan), ("ours", "mse"))
    case("+inf in a real linear weight", set_("g_r_6", (0, 3), np.inf), ("ours",))
    case("a zero real row", set_("g_r_6", 2, 0.0), ("cos",))
    case("a zero synthetic row (gradient -a/eps)", set_("g_s_8", 1, 0.0), ("ours",))
    case("a tensor with no rows; rows of length 0; a 1-D tensor in a 2-D slot",
         replace({"g_s_0": np.zeros((0, 2, 2, 2)), "g_r_0": np.zeros((0, 2, 2, 2)),
                  "g_s_4": np.zeros((2, 0, 3)), "g_r_4": np.zeros((2, 0, 3)),
                  "g_s_6": rng.normal(size=4), "g_r_6": rng.normal(size=4)}), ("ours", "cos"))
    case("synthetic gradients equal to the real ones",
         lambda arrays: arrays.update({s: arrays[r].copy() for s, r in zip(SYN, REAL)}), ("ours", "mse"))
    case("synthetic gradients opposite to the real ones",
         lambda arrays: arrays.update({s: -2.0 * arrays[r] for s, r in zip(SYN, REAL)}), ("cos",))
    return cases


def _fd_skip(sample: Sample):
    for name in SYN:
        x = np.asarray(sample.arrays[name])
        rows = x.reshape(x.shape[0], int(np.prod(x.shape[1:]))) if x.ndim >= 2 else x[:0, None]
        if (np.linalg.norm(rows, axis=1) == 0).any():
            return "a zero synthetic row: |b| is not differentiable at 0 (the gradient there is a convention)"
    return None


def _numel(sample: Sample) -> int:
    return int(sum(np.size(sample.arrays[k]) for k in SYN))


def _bad(description, error, match, change=None, **kwargs):
    def make():
        arrays = {"g_s_0": np.ones((2, 3)), "g_r_0": np.ones((2, 3)) * 0.5, "g_s_1": np.ones(3), "g_r_1": np.ones(3)}
        if change is not None:
            change(arrays)
        return arrays, kwargs
    return BadInput(description, make, error, match)


BAD_INPUTS = (
    _bad("shapes of a pair differ", ValueError, "grads_real[0]", lambda a: a.update(g_r_0=np.ones((3, 2)))),
    _bad("a 0-d gradient", ValueError, "grads_syn[1]",
         lambda a: a.update(g_s_1=np.array(1.0), g_r_1=np.array(1.0))),
    _bad("a 5-D gradient", ValueError, "dimensions",
         lambda a: a.update(g_s_1=np.ones((1, 1, 1, 1, 2)), g_r_1=np.ones((1, 1, 1, 1, 2)))),
    _bad("g_r_1 missing", ValueError, "g_r_1", lambda a: a.pop("g_r_1")),
    _bad("an argument that is not g_s_<i> / g_r_<i>", TypeError, "unexpected", lambda a: a.update(w_0=np.ones(2))),
    _bad("a boolean gradient", TypeError, "grads_syn[0]", lambda a: a.update(g_s_0=np.ones((2, 3), bool))),
    _bad("unknown metric", ValueError, "metric", metric="l2"),
    _bad("eps < 0", ValueError, "eps", eps=-1e-6),
    _bad("eps NaN", ValueError, "eps", eps=float("nan")),
    _bad("eps not a number", TypeError, "eps", eps="small"),
)


# ConvNet-3 of DC (width 128, instance norm with affine parameters, average pooling) on 32x32 RGB
# images and 10 classes: the parameter list gradient matching compares, in model order.
CONVNET3 = ((128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
            (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,))
CONVNET3_SMOKE = ((4, 3, 3, 3), (4,), (4,), (4,), (4, 4, 3, 3), (4,), (4,), (4,),
                  (4, 4, 3, 3), (4,), (4,), (4,), (3, 16), (3,))


def _params(shapes):
    def make(rng):
        arrays = {}
        for i, shape in enumerate(shapes):
            real = (rng.standard_normal(shape, dtype=np.float32) * 1e-2)
            arrays[SYN[i]] = real + rng.standard_normal(shape, dtype=np.float32) * 1e-2
            arrays[REAL[i]] = real
        return arrays, {"metric": "ours"}
    return make


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads both lists once; the backward reads them again and writes the gradient."""
    numel = sum(np.size(arrays[k]) for k in SYN)
    rows = sum(np.shape(arrays[k])[0] if np.ndim(arrays[k]) > 1 else 1 for k in SYN)
    per = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction]
    return float(per * numel * itemsize + 20 * rows)


def _counts_1d_tensors(fn):
    """Compares biases and norm parameters too (a 1-D tensor viewed as one row)."""
    return lambda **kw: fn(**{k: (v.reshape(1, -1) if hasattr(v, "ndim") and v.ndim == 1 else v)
                              for k, v in kw.items()})


def _whole_tensor_cosine(fn):
    """One cosine per tensor (flattened) instead of one per output row."""
    return lambda **kw: fn(**{k: (v.reshape(1, -1) if hasattr(v, "ndim") and v.ndim >= 2 else v)
                              for k, v in kw.items()})


GRADIENT_MATCH = Spec(
    name="gradient_match_distance",
    paper=17,
    family="classification",
    summary="Dataset-condensation gradient matching: row-wise cosine distance summed over a parameter list, "
            "one launch over a packed row table.",
    reference=f"{REF}:gradient_match_distance_named",
    reference_grad=f"{REF}:gradient_match_distance_named_grad",
    accelerated=f"{ACC}:gradient_match_distance_named",
    baseline=f"{BASE}:gradient_match_distance_named",
    samples=lambda profile, dtype: _samples(profile, dtype),
    grad_inputs=SYN,
    tolerance=Tolerance(
        rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
        atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
        reasons=("atol grows with sqrt(number of gradient entries): the distance is a sum of fp32 row "
                 "reductions over every entry of every tensor, and each gradient entry combines two such sums.",),
    ),
    reduction_length=_numel,
    bad_inputs=BAD_INPUTS,
    examples=_edges,
    bench_cases=(BenchCase(
        "ConvNet-3 of DC (32x32x3 -> 10 classes, width 128, instance norm): 14 tensors, 320,010 parameters",
        _params(CONVNET3), SYN + REAL, smoke=_params(CONVNET3_SMOKE), dtypes=("float32",)),),
    bytes_moved=_bytes,
    fd_skip=_fd_skip,
    properties=("1-D tensors contribute 0 to metric='ours' and get a zero gradient (tested)",
                "grads_real receives no gradient; passing one that requires grad is an error"),
    wrong_ports={"compares 1-D tensors too": _counts_1d_tensors,
                 "one cosine per tensor instead of per row": _whole_tensor_cosine},
)

register(GRADIENT_MATCH)
