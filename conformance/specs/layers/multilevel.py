"""Specs of the multi-level training operators (P34): coalesce, de-coalesce and interpolate parameters.

Why these are (barely) worth a kernel: each reads its input once and writes its output once and runs
once per V-cycle, between training runs. Eager PyTorch (``index_add_`` on both axes, then a division
by ``bincount``) makes three passes over the large weight and an fp32 intermediate of t_out x s_in;
the gather kernels make one, deterministically (no atomics), with no intermediate. That saves
milliseconds once per V-cycle, so the kernels exist for one-pass determinism and for completeness of
the library, not for training throughput. ``interpolate_params`` is ``torch.lerp``: already one pass
in eager PyTorch; the kernel only matches it.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import LAYOUTS, seed

REF = "twinops.reference.layers.multilevel"
ACC = "twinops.accelerated.layers.multilevel"
BASE = "twinops.conformance.baselines.layers.multilevel"

# Channel counts around the 16-wide tiles of the interpreter (32/64-wide on the GPU).
SIZES = {"ci": (1, 2, 3, 4, 15, 16, 17, 34), "dev": (1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 34, 64),
         "gpu": (2, 63, 64, 65, 128, 768, 1025)}
LAYOUTS_1D = ("contiguous", "strided", "row_strided")

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(terms per output): a coalesced entry is an fp32 sum over the product of its "
        "row and column group sizes.",
        "atol scales with the row's largest entry: a coalesced sum that nearly cancels keeps the rounding "
        "error of its largest terms.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _map(draw, rng, size: int, *, allow_default: bool):
    """(groups or None, width): the default pairing, the identity, or a random surjection."""
    modes = ["identity", "random", "random"] + (["pairs", "pairs"] if allow_default and size % 2 == 0 else [])
    mode = draw(st.sampled_from(modes))
    if mode == "pairs":
        return None, size // 2, mode
    if mode == "identity":
        return np.arange(size, dtype=np.int64), size, mode
    width = draw(st.integers(1, size))
    return rng.permutation(np.arange(size) % width).astype(np.int64), width, mode


def _weight(draw, rng, shape):
    scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
    return rng.normal(size=shape) * scale + rng.normal() * scale, scale


def _layout(draw, ndim: int) -> str:
    return draw(st.sampled_from(LAYOUTS if ndim == 2 else LAYOUTS_1D))


# ------------------------------------------------------------------------------------------ coalesce


@st.composite
def _coalesce_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    two_d = draw(st.integers(0, 2)) > 0
    s_out = draw(st.sampled_from(SIZES[profile]))
    shape = (s_out, draw(st.sampled_from(SIZES[profile]))) if two_d else (s_out,)
    weight, scale = _weight(draw, rng, shape)
    arrays, kwargs, layouts, notes = {"weight": weight}, {}, {"weight": _layout(draw, len(shape))}, []
    for axis, (gname, wname) in enumerate((("out_groups", "out_width"), ("in_groups", "in_width"))[:len(shape)]):
        groups, width, mode = _map(draw, rng, shape[axis], allow_default=True)
        notes.append(f"{gname}={mode}")
        if groups is not None:
            arrays[gname] = groups
            kwargs[wname] = width
            if draw(st.booleans()):
                layouts[gname] = "strided"
    return Sample(arrays, kwargs, ("weight",), layouts, note=f"scale={scale:g}, " + ", ".join(notes))


def _terms(sample: Sample) -> int:
    """Terms summed per coalesced entry: the product of the largest row and column group sizes."""
    out = 1
    for axis, (gname, wname) in enumerate((("out_groups", "out_width"), ("in_groups", "in_width"))):
        if axis >= np.ndim(sample.arrays["weight"]):
            break
        size = np.shape(sample.arrays["weight"])[axis]
        groups = sample.arrays.get(gname)
        out *= 2 if groups is None else int(np.bincount(np.asarray(groups)).max(initial=1))
    return out


def _coalesce_edges() -> list[Sample]:
    rng = np.random.default_rng(34)
    w = rng.normal(size=(6, 8))
    nan, inf = w.copy(), w.copy()
    nan[1, 2] = np.nan
    inf[5, 0] = np.inf
    three = np.array([0, 1, 2, 0, 1, 2, 0, 1])  # sizes 3, 3, 2
    return [
        Sample({"weight": w}, {}, ("weight",), note="default pairing on both axes"),
        Sample({"weight": nan}, {}, ("weight",), note="NaN reaches only its own coalesced entry"),
        Sample({"weight": inf}, {}, ("weight",), note="inf reaches only its own coalesced entry"),
        Sample({"weight": w[:, 0]}, {}, ("weight",), note="1-D (a bias): averaged in pairs"),
        Sample({"weight": w, "in_groups": three}, {"in_width": 3}, ("weight",), note="unequal column groups"),
        Sample({"weight": w, "out_groups": np.zeros(6, dtype=np.int64)}, {"out_width": 1}, ("weight",),
               note="one group: the column-summed row mean"),
        Sample({"weight": w, "out_groups": np.arange(6), "in_groups": np.arange(8)}, {"out_width": 6, "in_width": 8},
               ("weight",), note="identity maps: a copy"),
    ]


def _bad(description, error, match, weight=(4, 6), data_dependent=False, arrays=None, **kwargs):
    return BadInput(description, lambda: ({"weight": np.ones(weight), **(arrays or {})}, kwargs), error, match,
                    data_dependent=data_dependent)


COALESCE_BAD = (
    _bad("3-D weight", ValueError, "weight", weight=(2, 4, 6)),
    _bad("default pairing of an odd size", ValueError, "out_width", weight=(5, 6)),
    _bad("group index out of range", ValueError, "out_groups", data_dependent=True,
         arrays={"out_groups": np.array([0, 1, 2, 1])}, out_width=2),
    _bad("empty group", ValueError, "in_groups", data_dependent=True,
         arrays={"in_groups": np.array([0, 0, 2, 2, 0, 2])}, in_width=3),
    _bad("group map of the wrong length", ValueError, "out_groups", arrays={"out_groups": np.array([0, 1, 0])}),
    _bad("float group map", TypeError, "out_groups", arrays={"out_groups": np.array([0.0, 1.0, 0.0, 1.0])}),
    _bad("in_groups with a 1-D weight", ValueError, "in_groups", weight=(4,), arrays={"in_groups": np.array([0, 1])}),
    _bad("out_width of 0", ValueError, "out_width", out_width=0),
    _bad("out_width larger than the weight", ValueError, "out_width", out_width=5),
)


def _bench(kind: str, rows: int, cols: int) -> BenchCase:
    def build(rng, rows, cols):
        if kind == "interpolate":
            return ({"original": rng.standard_normal((rows, cols), dtype=np.float32),
                     "decoalesced": rng.standard_normal((rows, cols), dtype=np.float32)}, {"alpha": 0.5})
        return {"weight": rng.standard_normal((rows, cols), dtype=np.float32)}, {}

    inputs = ("original", "decoalesced") if kind == "interpolate" else ("weight",)
    return BenchCase(f"{rows}x{cols}", lambda rng: build(rng, rows, cols), inputs,
                     smoke=lambda rng: build(rng, 6, 8), dtypes=("float32", "bfloat16"))


def _coalesce_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads the (s_out, s_in) weight once and writes the (s_out/2, s_in/2) result (default pairing)."""
    s = np.size(arrays["weight"])
    return float(s * itemsize * 1.25)


def _decoalesce_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads the (t_out, t_in) weight once and writes the (2 t_out, 2 t_in) result (default pairing)."""
    return float(np.size(arrays["weight"]) * itemsize * 5)


def _interpolate_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads both parameter sets and writes the result."""
    return float(np.size(arrays["original"]) * itemsize * 3)


def _group_sizes(kw, name: str, width_name: str, t: int):
    import torch

    g = kw.get(name)
    if g is None:
        return torch.full((t,), 2.0)
    return torch.bincount(g.long().cpu(), minlength=t).double()


def _sums_rows(fn):
    """Rows summed over their group instead of averaged."""

    def port(**kw):
        out = fn(**kw)
        sizes = _group_sizes(kw, "out_groups", "out_width", out.shape[0]).to(out.device, out.dtype)
        return out * sizes.reshape((-1,) + (1,) * (out.ndim - 1))

    return port


def _averages_columns(fn):
    """Columns averaged over their group instead of summed (the embedding rule applied to a Linear)."""

    def port(**kw):
        out = fn(**kw)
        if out.ndim == 1:
            return out
        sizes = _group_sizes(kw, "in_groups", "in_width", out.shape[1]).to(out.device, out.dtype)
        return out / sizes[None, :]

    return port


COALESCE = Spec(
    name="coalesce",
    paper=34,
    family="layers",
    summary="Merge a large weight into a small one (multi-level training): rows averaged and columns summed "
            "over channel groups, one gather pass.",
    reference=f"{REF}:coalesce",
    reference_grad=None,
    accelerated=f"{ACC}:coalesce",
    baseline=f"{BASE}:coalesce",
    samples=lambda profile, dtype: _coalesce_samples(profile, dtype),
    examples=_coalesce_edges,
    tolerance=TOLERANCE,
    reduction_length=_terms,
    bad_inputs=COALESCE_BAD,
    bench_cases=(_bench("coalesce", 8192, 8192),),
    bytes_moved=_coalesce_bytes,
    properties=("coalesce(decoalesce(W)) == W (tested)",
                "not trained through: one-shot transform between training stages, no gradient",
                "an invalid group map raises in the reference; the kernel returns all NaN"),
    wrong_ports={"sums rows instead of averaging": _sums_rows, "averages columns instead of summing": _averages_columns},
)


# ------------------------------------------------------------------------------------------ decoalesce


@st.composite
def _decoalesce_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    two_d = draw(st.integers(0, 2)) > 0
    t_out = draw(st.sampled_from(SIZES[profile]))
    shape = (t_out, draw(st.sampled_from(SIZES[profile]))) if two_d else (t_out,)
    weight, scale = _weight(draw, rng, shape)
    arrays, layouts, notes = {"weight": weight}, {"weight": _layout(draw, len(shape))}, []
    for axis, gname in enumerate(("out_groups", "in_groups")[:len(shape)]):
        t = shape[axis]
        mode = draw(st.sampled_from(("pairs", "random", "identity")))
        notes.append(f"{gname}={mode}")
        if mode == "pairs":
            continue
        s = t if mode == "identity" else t + draw(st.integers(0, 2 * t))
        arrays[gname] = (np.arange(s) if mode == "identity" else rng.permutation(np.arange(s) % t)).astype(np.int64)
        if draw(st.booleans()):
            layouts[gname] = "strided"
    return Sample(arrays, {}, ("weight",), layouts, note=f"scale={scale:g}, " + ", ".join(notes))


def _decoalesce_edges() -> list[Sample]:
    rng = np.random.default_rng(35)
    w = rng.normal(size=(3, 4))
    nan = w.copy()
    nan[1, 2] = np.nan
    return [
        Sample({"weight": w}, {}, ("weight",), note="default pairing: (6, 8)"),
        Sample({"weight": nan}, {}, ("weight",), note="NaN copied to its group's entries only"),
        Sample({"weight": w[:, 0]}, {}, ("weight",), note="1-D: copied"),
        Sample({"weight": w, "in_groups": np.array([0, 1, 2, 3, 0, 0])}, {}, ("weight",),
               note="a three-member column group: split in thirds"),
    ]


DECOALESCE_BAD = (
    _bad("3-D weight", ValueError, "weight", weight=(2, 4, 6)),
    _bad("group index out of range", ValueError, "out_groups", data_dependent=True,
         arrays={"out_groups": np.array([0, 1, 2, 3, 4, 5, 6, 4])}),
    _bad("empty group", ValueError, "in_groups", data_dependent=True,
         arrays={"in_groups": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])}),
    _bad("2-D group map", ValueError, "out_groups", arrays={"out_groups": np.zeros((4, 2), dtype=np.int64)}),
    _bad("in_groups with a 1-D weight", ValueError, "in_groups", weight=(4,), arrays={"in_groups": np.array([0, 1])}),
)


def _copies_columns(fn):
    """Columns copied like rows instead of split evenly (the output would double the activations)."""

    def port(**kw):
        out = fn(**kw)
        if out.ndim == 1:
            return out
        import torch

        t_in = kw["weight"].shape[1]
        g = kw.get("in_groups")
        g = (torch.arange(2 * t_in) % t_in) if g is None else g.long().cpu()
        sizes = torch.bincount(g, minlength=t_in).double()[g]
        return out * sizes.to(out.device, out.dtype)[None, :]

    return port


DECOALESCE = Spec(
    name="decoalesce",
    paper=34,
    family="layers",
    summary="Grow a small weight into a large one (multi-level training): rows copied, columns split evenly "
            "over channel groups; coalesce undoes it exactly.",
    reference=f"{REF}:decoalesce",
    reference_grad=None,
    accelerated=f"{ACC}:decoalesce",
    baseline=f"{BASE}:decoalesce",
    samples=lambda profile, dtype: _decoalesce_samples(profile, dtype),
    examples=_decoalesce_edges,
    tolerance=TOLERANCE,
    bad_inputs=DECOALESCE_BAD,
    bench_cases=(_bench("decoalesce", 4096, 4096),),
    bytes_moved=_decoalesce_bytes,
    properties=("coalesce(decoalesce(W)) == W (tested)",
                "a de-coalesced MLP computes the small MLP's function (tested)",
                "not trained through: no gradient"),
    wrong_ports={"copies columns instead of splitting them": _copies_columns},
)


# ------------------------------------------------------------------------------------------ interpolate_params


@st.composite
def _interpolate_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.sampled_from(SIZES[profile])) for _ in range(ndim))
    a, scale = _weight(draw, rng, shape)
    b = a + rng.normal(size=shape) * scale  # a trained small model lands near the original
    alpha = draw(st.sampled_from((0.0, 0.25, 0.5, 1.0)) | st.floats(0.0, 1.0))
    layouts = {}
    if ndim:
        pick = LAYOUTS if ndim == 2 else LAYOUTS_1D
        layouts = {"original": draw(st.sampled_from(pick)), "decoalesced": draw(st.sampled_from(pick))}
    return Sample({"original": a, "decoalesced": b}, {"alpha": alpha}, ("original", "decoalesced"), layouts,
                  note=f"scale={scale:g}")


def _interpolate_edges() -> list[Sample]:
    rng = np.random.default_rng(36)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    nan = b.copy()
    nan[0, 1] = np.nan
    return [
        Sample({"original": a, "decoalesced": b}, {"alpha": 0.0}, ("original", "decoalesced"), note="alpha=0: original"),
        Sample({"original": a, "decoalesced": b}, {"alpha": 1.0}, ("original", "decoalesced"), note="alpha=1: decoalesced"),
        Sample({"original": a, "decoalesced": nan}, {"alpha": 0.25}, ("original", "decoalesced"), note="NaN propagates"),
        Sample({"original": a[:0], "decoalesced": b[:0]}, {"alpha": 0.5}, ("original", "decoalesced"), note="empty"),
    ]


def _ibad(description, error, match, a=(2, 3), b=(2, 3), **kwargs):
    return BadInput(description, lambda: ({"original": np.ones(a), "decoalesced": np.ones(b)}, kwargs), error, match)


INTERPOLATE_BAD = (
    _ibad("shapes differ", ValueError, "decoalesced", b=(3, 2)),
    _ibad("alpha above 1", ValueError, "alpha", alpha=1.5),
    _ibad("alpha below 0", ValueError, "alpha", alpha=-0.1),
    _ibad("alpha NaN", ValueError, "alpha", alpha=float("nan")),
    _ibad("alpha not a number", TypeError, "alpha", alpha="half"),
)


def _swaps_roles(fn):
    """Weights alpha on the original instead of the de-coalesced parameters."""
    return lambda **kw: fn(**{**kw, "original": kw["decoalesced"], "decoalesced": kw["original"]})


INTERPOLATE = Spec(
    name="interpolate_params",
    paper=34,
    family="layers",
    summary="The V-cycle merge (multi-level training): (1 - alpha) original + alpha de-coalesced parameters.",
    reference=f"{REF}:interpolate_params",
    reference_grad=None,
    accelerated=f"{ACC}:interpolate_params",
    baseline=f"{BASE}:interpolate_params",
    samples=lambda profile, dtype: _interpolate_samples(profile, dtype),
    examples=_interpolate_edges,
    tolerance=TOLERANCE,
    bad_inputs=INTERPOLATE_BAD,
    bench_cases=(_bench("interpolate", 8192, 8192),),
    bytes_moved=_interpolate_bytes,
    properties=("alpha = 0 returns the original bit for bit (finite inputs)",
                "not trained through: no gradient; torch.lerp is already one pass, so the kernel only matches it"),
    wrong_ports={"swaps the roles of the two parameter sets": _swaps_roles},
)

register(COALESCE, DECOALESCE, INTERPOLATE)
