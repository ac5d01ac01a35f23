"""Specs of the Hyp-OC (P48) Poincaré-ball operations: `poincare_expmap0`, `poincare_distance`,
`hyp_pc_loss` and `hyperbolic_mlr_ce`."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad

REF = "twinops.reference.metric.hyperbolic"
ACC = "twinops.accelerated.metric.hyperbolic"
BASE = "twinops.conformance.baselines.metric.hyperbolic"

CURVATURES = (0.1, 1.0, 0.01, 3.0)
# The MLR kernels tile rows, classes and D by 16 under the interpreter: 17 crosses every boundary.
MLR_CLASSES = {"ci": (1, 2, 3, 16, 17), "dev": (1, 2, 3, 7, 15, 16, 17, 31, 32, 33),
               "gpu": (2, 17, 63, 64, 65, 129, 1000)}
MLR_BATCH = {"ci": (1, 2, 3, 5, 16, 17), "dev": EMBED_BATCH["dev"], "gpu": EMBED_BATCH["gpu"]}
MLR_DIMS = {"ci": (1, 3, 8, 17), "dev": EMBED_DIMS["dev"], "gpu": EMBED_DIMS["gpu"]}


def _curvature(draw) -> float:
    return draw(st.sampled_from(CURVATURES) | st.floats(0.01, 5.0))


def _max_radius(dtype: str) -> float:
    """Largest sqrt(c)*||x|| drawn: close to the boundary, but so that rounding to a 16-bit dtype
    cannot push a point out of the ball."""
    return 0.999 if dtype in ("float32", "float64") else 0.99


def ball_points(rng: np.random.Generator, n: int, d: int, c: float, max_radius: float) -> np.ndarray:
    """(n, d) points of the ball of curvature -c: random directions, sqrt(c)*radius uniform in
    [0, max_radius] with about one row in five pinned at max_radius (near the boundary)."""
    v = rng.normal(size=(n, d))
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norm > 0, norm, 1.0)
    r = rng.uniform(0.0, max_radius, size=(n, 1))
    r = np.where(rng.random((n, 1)) < 0.2, max_radius, r)
    return v * r / math.sqrt(c)


def _width(sample: Sample) -> int:
    return int(np.shape(next(iter(sample.arrays.values())))[1])


def _bad_c(make_arrays, extra=None) -> tuple[BadInput, ...]:
    out = []
    for value, rule in ((0.0, "> 0"), (-1.0, "> 0"), (float("nan"), "finite"), (float("inf"), "finite")):
        out.append(BadInput(f"c = {value:g} (must be {rule})", lambda v=value: (make_arrays(), {**(extra or {}), "c": v}),
                            ValueError, "c"))
    return tuple(out)


def _with_kwarg(name, value):
    """A port that calls the implementation with ``name`` forced to ``value``."""
    return lambda fn: (lambda **kw: fn(**{**kw, name: value}))


# ---------------------------------------------------------------------------- poincare_expmap0

EXPMAP_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D): every output is scaled by a function of the row norm, a reduction over D.",
        "atol is relative to the row's largest entry: an entry that is tiny next to the rest of its row "
        "carries the row's relative rounding error (the norm, the clip factor).",
        "16-bit outputs also pass when no worse than 2x the eager baseline + atol (the result is rounded "
        "to the input dtype).",
    ),
)


@st.composite
def _expmap_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    # Rows of very different norms: tiny (Taylor branch), ordinary, past the clipping radius.
    scales = np.array(draw(st.lists(st.sampled_from((1e-4, 0.05, 0.3, 1.0, 5.0)), min_size=n, max_size=n)))
    x = rng.normal(size=(n, d)) * scales[:, None] / math.sqrt(d)
    kwargs = {"c": _curvature(draw), "clip_r": draw(st.sampled_from((2.0, None, 0.5, 10.0))),
              "eps": draw(st.sampled_from((1e-3, 1e-5, 0.1)))}
    return Sample({"x": x}, kwargs, ("x",), layouts={"x": draw(st.sampled_from(LAYOUTS))},
                  grad_out=upstream_grad(rng, (n, d)), note=f"row scales {sorted(set(scales.tolist()))}")


def _expmap_examples() -> list[Sample]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5))
    nan, inf, zero = x.copy(), x.copy(), x.copy()
    nan[1, 2], inf[2, 0], zero[3] = np.nan, np.inf, 0.0
    g = upstream_grad(rng, (4, 5))
    return [
        Sample({"x": nan}, {"c": 0.1, "clip_r": 2.0, "eps": 1e-3}, ("x",), grad_out=g, note="NaN in row 1"),
        Sample({"x": inf}, {"c": 0.1, "clip_r": 2.0, "eps": 1e-3}, ("x",), grad_out=g, note="+inf in row 2"),
        Sample({"x": zero}, {"c": 1.0, "clip_r": None, "eps": 1e-3}, ("x",), grad_out=g, note="a zero row"),
        Sample({"x": 30 * x}, {"c": 10.0, "clip_r": None, "eps": 1e-3}, ("x",), grad_out=g,
               note="every row projected onto the ball of radius (1 - eps)/sqrt(c)"),
        Sample({"x": 30 * x}, {"c": 4.0, "clip_r": 2.0, "eps": 1e-3}, ("x",), grad_out=g,
               note="clipped and projected"),
    ]


def _expmap_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x and writes y; backward reads x and dL/dy and writes dL/dx."""
    n, d = np.shape(arrays["x"])
    return float({"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction] * n * d * itemsize)


def _features(n, d):
    def make(rng):
        return {"x": rng.standard_normal((n, d), dtype=np.float32) * np.float32(3.0 / math.sqrt(d))}, {}

    return make


def _no_clipping(fn):
    return lambda **kw: fn(**{**kw, "clip_r": None})


EXPMAP0 = Spec(
    name="poincare_expmap0",
    paper=48,
    family="metric",
    summary="Feature clipping and the exponential map at the origin onto the Poincaré ball, with projection.",
    reference=f"{REF}:poincare_expmap0",
    reference_grad=f"{REF}:poincare_expmap0_grad",
    accelerated=f"{ACC}:poincare_expmap0",
    baseline=f"{BASE}:poincare_expmap0",
    samples=_expmap_samples,
    examples=_expmap_examples,
    grad_inputs=("x",),
    tolerance=EXPMAP_TOLERANCE,
    reduction_length=_width,
    bad_inputs=_bad_c(lambda: {"x": np.ones((2, 3))}) + (
        BadInput("clip_r = 0 (must be > 0 or None)", lambda: ({"x": np.ones((2, 3))}, {"clip_r": 0.0}),
                 ValueError, "clip_r"),
        BadInput("eps = 1 (must be in (0, 1))", lambda: ({"x": np.ones((2, 3))}, {"eps": 1.0}), ValueError, "eps"),
        BadInput("eps = 0 (must be in (0, 1))", lambda: ({"x": np.ones((2, 3))}, {"eps": 0.0}), ValueError, "eps"),
        BadInput("1-D x", lambda: ({"x": np.ones(3)}, {}), ValueError, "x"),
    ),
    bench_cases=(BenchCase("65536x512", _features(65536, 512), ("x",), smoke=_features(4, 8)),
                 BenchCase("1048576x128", _features(1048576, 128), ("x",), smoke=_features(4, 8))),
    bytes_moved=_expmap_bytes,
    properties=("every output row satisfies sqrt(c)*||y|| <= 1 - eps (tested)",),
    wrong_ports={"forgets the feature clipping": _no_clipping},
)


# ---------------------------------------------------------------------------- poincare_distance

DISTANCE_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 2e-4, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D): the distance is a function of three reductions over D.",
        "fp32 rtol 2e-4: points are drawn up to sqrt(c)||x|| = 0.999, where 1 - c||x||^2 ~ 2e-3 is formed "
        "in fp32 from an fp32 ||x||^2 (and c rounded to fp32) and so carries ~500 ulps of relative error; "
        "the gradient divides by it twice (measured worst ~8e-5 relative on the dev profile). 16-bit inputs "
        "are drawn up to 0.99 and computed in fp32.",
        "gradient atol is relative to the row's largest entry: entries are sums of terms of the row's scale.",
    ),
)


@st.composite
def _pair_samples(draw, profile: str, dtype: str, *, halves: bool = False):
    rng = seed(draw)
    n = draw(st.sampled_from(EMBED_BATCH[profile]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    c = _curvature(draw)
    r = _max_radius(dtype)
    x = ball_points(rng, n, d, c, r)
    y = ball_points(rng, n, d, c, r)
    # duplicated points (distance 0, gradient defined as 0) in one sample in four
    dup = (rng.random(n) < 0.3) & draw(st.sampled_from((False, False, False, True)))
    y = np.where(dup[:, None], x, y)
    if halves:
        return Sample({"z": np.concatenate([x, y])}, {"c": c}, ("z",), layouts={"z": draw(st.sampled_from(LAYOUTS))},
                      grad_out=upstream_grad(rng, ()), note=f"{int(dup.sum())} duplicated pairs")
    layouts = {"x": draw(st.sampled_from(LAYOUTS)), "y": draw(st.sampled_from(LAYOUTS))}
    return Sample({"x": x, "y": y}, {"c": c}, ("x", "y"), layouts=layouts, grad_out=upstream_grad(rng, (n,)),
                  note=f"{int(dup.sum())} duplicated rows")


def _distance_examples() -> list[Sample]:
    rng = np.random.default_rng(2)
    x, y = ball_points(rng, 4, 3, 1.0, 0.9), ball_points(rng, 4, 3, 1.0, 0.9)
    nan = x.copy()
    nan[2, 1] = np.nan
    g = upstream_grad(rng, (4,))
    edge = np.array([[0.999, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1e-4, 0.0, 0.0]])
    return [
        Sample({"x": nan, "y": y}, {"c": 1.0}, ("x", "y"), grad_out=g, note="NaN in row 2"),
        Sample({"x": x, "y": x.copy()}, {"c": 1.0}, ("x", "y"), grad_out=g, note="x = y: distance 0, gradient 0"),
        Sample({"x": edge, "y": -edge}, {"c": 1.0}, ("x", "y"), grad_out=g, note="antipodal points near the boundary"),
        Sample({"x": np.zeros((0, 3)), "y": np.zeros((0, 3))}, {"c": 1.0}, ("x", "y"), grad_out=np.zeros(0),
               note="empty batch"),
    ]


def _has_duplicates(sample: Sample) -> str | None:
    """Finite differences cannot check the gradient where x_i = y_i: the distance behaves like
    ||x - y|| there (no derivative); the reference defines it as 0, pinned by a test."""
    arrays = sample.arrays
    if "z" in arrays:
        z = np.asarray(arrays["z"])
        x, y = z[: len(z) // 2], z[len(z) // 2:]
    else:
        x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
    if np.any(np.all(x == y, axis=1)):
        return "finite differences skip samples with x_i = y_i (no derivative there; 0 by definition, tested)"
    return None


def _outside(shape=(2, 3), row=1):
    x = np.full(shape, 0.1)
    x[row] = 2.0  # c ||x||^2 = 0.1 * 12 > 1
    return x


def _distance_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads x and y and writes N distances; backward reads x, y (and N gradients), writes dx, dy."""
    n, d = np.shape(arrays["x"])
    fwd, bwd = 2 * n * d * itemsize + n * itemsize, 4 * n * d * itemsize + n * itemsize
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _pairs_bench(n, d, c=0.1):
    def make(rng):
        return {"x": ball_points(rng, n, d, c, 0.95).astype(np.float32),
                "y": ball_points(rng, n, d, c, 0.95).astype(np.float32)}, {}

    return make


def _arctan_distance(fn):
    """The authors' code: (2/sqrt(c)) arctan(sqrt(c)||(-x)+y||), the spherical distance, in place of
    artanh; from d, sqrt(c)||(-x)+y|| = tanh(sqrt(c) d / 2)."""
    import torch

    def port(**kw):
        sc = math.sqrt(kw.get("c", 0.1))
        return 2 / sc * torch.atan(torch.tanh(sc * fn(**kw) / 2))

    return port


DISTANCE = Spec(
    name="poincare_distance",
    paper=48,
    family="metric",
    summary="Row-wise geodesic distance on the Poincaré ball of curvature -c (arcosh form).",
    reference=f"{REF}:poincare_distance",
    reference_grad=f"{REF}:poincare_distance_grad",
    accelerated=f"{ACC}:poincare_distance",
    baseline=f"{BASE}:poincare_distance",
    samples=_pair_samples,
    examples=_distance_examples,
    grad_inputs=("x", "y"),
    tolerance=DISTANCE_TOLERANCE,
    fd_skip=_has_duplicates,
    reduction_length=_width,
    bad_inputs=_bad_c(lambda: {"x": np.zeros((2, 3)), "y": np.zeros((2, 3))}) + (
        BadInput("x[1] outside the ball", lambda: ({"x": _outside(), "y": np.zeros((2, 3))}, {}), ValueError, "x",
                 data_dependent=True),
        BadInput("y[1] outside the ball", lambda: ({"x": np.zeros((2, 3)), "y": _outside()}, {}), ValueError, "y",
                 data_dependent=True),
        BadInput("y of another shape", lambda: ({"x": np.zeros((2, 3)), "y": np.zeros((3, 3))}, {}), ValueError, "y"),
        BadInput("1-D x", lambda: ({"x": np.zeros(3), "y": np.zeros(3)}, {}), ValueError, "x"),
    ),
    bench_cases=(BenchCase("65536x512", _pairs_bench(65536, 512), ("x", "y"), smoke=_pairs_bench(4, 8)),),
    bytes_moved=_distance_bytes,
    properties=("distance 0 and gradient 0 at x = y; symmetric in x and y (tested)",),
    wrong_ports={"spherical arctan distance of the authors' code": _arctan_distance,
                 "curvature ignored (c = 1)": _with_kwarg("c", 1.0)},
)


# ---------------------------------------------------------------------------- hyp_pc_loss


def _pc_examples() -> list[Sample]:
    rng = np.random.default_rng(3)
    z = ball_points(rng, 6, 4, 0.1, 0.9)
    nan = z.copy()
    nan[4, 0] = np.nan
    g = upstream_grad(rng, ())
    return [
        Sample({"z": np.zeros((0, 4))}, {"c": 0.1}, ("z",), grad_out=g, note="empty batch: loss 0"),
        Sample({"z": np.concatenate([z[:3], z[:3]])}, {"c": 0.1}, ("z",), grad_out=g, note="every pair duplicated"),
        Sample({"z": nan}, {"c": 0.1}, ("z",), grad_out=g, note="NaN in row 4"),
        Sample({"z": z[:2]}, {"c": 0.1}, ("z",), grad_out=g, note="one pair"),
    ]


def _pc_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads z once; backward reads z and writes dz."""
    b, d = np.shape(arrays["z"])
    return float({"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction] * b * d * itemsize)


def _pc_bench(b, d, c=0.1):
    def make(rng):
        return {"z": ball_points(rng, b, d, c, 0.95).astype(np.float32)}, {}

    return make


def _halved_sum(fn):
    """Normalises by the B/2 pairs instead of the authors' B."""
    return lambda **kw: fn(**kw) * 2


def _adjacent_pairs(fn):
    """Pairs rows (2i, 2i + 1) instead of (i, i + B/2)."""
    import torch

    return lambda z, **kw: fn(z=torch.cat([z[0::2], z[1::2]]), **kw)


HYP_PC = Spec(
    name="hyp_pc_loss",
    paper=48,
    family="metric",
    summary="Hyp-PC: Poincaré distance between rows i and i + B/2 of a batch, summed and divided by B.",
    reference=f"{REF}:hyp_pc_loss",
    reference_grad=f"{REF}:hyp_pc_loss_grad",
    accelerated=f"{ACC}:hyp_pc_loss",
    baseline=f"{BASE}:hyp_pc_loss",
    samples=lambda profile, dtype: _pair_samples(profile, dtype, halves=True),
    examples=_pc_examples,
    grad_inputs=("z",),
    tolerance=DISTANCE_TOLERANCE,
    fd_skip=_has_duplicates,
    reduction_length=lambda sample: _width(sample) * max(1, np.shape(sample.arrays["z"])[0] // 2),
    bad_inputs=_bad_c(lambda: {"z": np.zeros((2, 3))}) + (
        BadInput("odd batch size", lambda: ({"z": np.zeros((3, 3))}, {}), ValueError, "z"),
        BadInput("z[1] outside the ball", lambda: ({"z": _outside((4, 3))}, {}), ValueError, "z", data_dependent=True),
        BadInput("1-D z", lambda: ({"z": np.zeros(4)}, {}), ValueError, "z"),
    ),
    bench_cases=(BenchCase("65536x512", _pc_bench(65536, 512), ("z",), smoke=_pc_bench(4, 8)),),
    bytes_moved=_pc_bytes,
    wrong_ports={"divides by B/2 pairs": _halved_sum, "pairs adjacent rows": _adjacent_pairs},
)


# ---------------------------------------------------------------------------- hyperbolic_mlr_ce

MLR_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(D): logits come from two dot products of length D (tl.dot, fp32 accumulation).",
        "atol is relative to the largest entry of the row (of the loss vector, of each gradient row): the "
        "logits are sums of terms as large as 2||a||/(beta sqrt(c)) asinh(...), and the cross-entropy and "
        "its gradient inherit their absolute rounding error.",
        "fp32 rtol 1e-4, fp16 2e-3: near the boundary omega = 1 - c||x||^2 carries 1/omega ulps of relative "
        "error (500 at sqrt(c)||x|| = 0.999, the fixed example; random points are drawn up to 0.99) before it "
        "divides the asinh argument, and the gradient's three terms (through <x,a>, <x,p>, ||x||^2) cancel "
        "by up to ~100x.",
        "bf16 and the TF32 path (torch.set_float32_matmul_precision('high')) are GPU-lane checks: the "
        "interpreter computes tl.dot exactly.",
    ),
)


@st.composite
def _mlr_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(MLR_BATCH[profile]))
    k = draw(st.sampled_from(MLR_CLASSES[profile]))
    d = draw(st.sampled_from(MLR_DIMS[profile]))
    c = _curvature(draw)
    # up to sqrt(c)||x|| = 0.99 (0.95 in 16-bit); the fixed examples put a point at 0.999
    x = ball_points(rng, n, d, c, 0.99 if dtype == "float32" else 0.95)
    p = ball_points(rng, k, d, c, draw(st.sampled_from((0.0, 0.3, 0.9))))
    a = rng.normal(size=(k, d)) * draw(st.sampled_from((0.05, 0.3, 1.0))) / math.sqrt(d)
    if k > 1 and draw(st.sampled_from((False, False, False, True))):
        a[rng.integers(k)] = 0.0  # a class with a zero normal: logit 0
    ignore_index = draw(st.sampled_from((-100, -1)))
    target = rng.integers(0, k, size=n)
    mode = draw(st.sampled_from(("none", "some", "some", "all")))
    if mode == "some":
        target = np.where(rng.random(n) < 0.3, ignore_index, target)
    elif mode == "all":
        target = np.full(n, ignore_index)
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    layouts = {"x": draw(st.sampled_from(LAYOUTS)), "p": draw(st.sampled_from(LAYOUTS)),
               "a": draw(st.sampled_from(LAYOUTS))}
    return Sample(
        {"x": x, "target": target.astype(np.int64), "p": p, "a": a},
        {"c": c, "ignore_index": ignore_index, "reduction": reduction},
        ("x", "p", "a"), layouts=layouts,
        grad_out=upstream_grad(rng, (n,) if reduction == "none" else ()),
        note=f"ignored rows: {mode}",
    )


def _mlr_examples() -> list[Sample]:
    rng = np.random.default_rng(4)
    n, k, d, c = 5, 3, 4, 0.5
    x, p = ball_points(rng, n, d, c, 0.9), ball_points(rng, k, d, c, 0.5)
    a = rng.normal(size=(k, d))
    t = np.array([0, 2, 1, 1, 0])
    nan = x.copy()
    nan[1, 0] = np.nan
    boundary = x.copy()
    boundary[2] *= 0.999 / (math.sqrt(c) * np.linalg.norm(boundary[2]))
    cases = (
        ({"x": nan, "target": t, "p": p, "a": a}, "none", "NaN in row 1"),
        ({"x": nan, "target": np.array([0, -100, 1, 1, 0]), "p": p, "a": a}, "mean", "NaN in an ignored row"),
        ({"x": x, "target": np.full(n, -100), "p": p, "a": a}, "mean", "every row ignored"),
        ({"x": x, "target": np.zeros(n, dtype=np.int64), "p": p[:1], "a": a[:1]}, "sum", "one class"),
        ({"x": boundary, "target": t, "p": p, "a": a}, "none", "a point at sqrt(c)||x|| = 0.999"),
        ({"x": boundary, "target": t, "p": p, "a": a}, "mean", "a point at sqrt(c)||x|| = 0.999"),
        ({"x": x, "target": t, "p": p, "a": np.concatenate([a[:2], np.zeros((1, d))])}, "sum", "a zero normal"),
        ({"x": x[:0], "target": t[:0], "p": p, "a": a}, "none", "empty batch"),
    )
    out = []
    for arrays, reduction, note in cases:
        g = upstream_grad(rng, (len(arrays["target"]),) if reduction == "none" else ())
        kw = {"c": c, "ignore_index": -100, "reduction": reduction}
        out.append(Sample(arrays, kw, ("x", "p", "a"), grad_out=g, note=note))
    return out


def _zero_normal(sample: Sample) -> str | None:
    """At a_k = 0 the logit is 0 (its limit) but its derivative in a_k is unbounded; the reference
    passes no gradient there (a convention, tested), which finite differences cannot confirm."""
    if np.any(np.all(np.asarray(sample.arrays["a"]) == 0, axis=1)):
        return "finite differences skip samples with a zero normal a_k (unbounded derivative in a_k; 0 by convention)"
    return None


def _mlr_arrays(n=2, k=3, d=3, **change):
    arrays = {"x": np.full((n, d), 0.1), "target": np.arange(n) % k, "p": np.full((k, d), 0.2),
              "a": np.ones((k, d))}
    arrays.update(change)
    return lambda **kw: (arrays, kw)


def _mlr_bench(n, k, d, c=0.1):
    def make(rng):
        return {"x": ball_points(rng, n, d, c, 0.95).astype(np.float32),
                "target": rng.integers(0, k, n),
                "p": ball_points(rng, k, d, c, 0.5).astype(np.float32),
                "a": (rng.standard_normal((k, d), dtype=np.float32) / np.float32(math.sqrt(d)))}, {}

    return make


def _mlr_flops(arrays: dict, direction: str) -> float:
    """2 N K D per matrix product. Forward: X A^T and X P^T. Backward: the row pass recomputes both and
    adds dXA A + dXP P; the column pass recomputes both and adds dXA^T X, dXP^T X (recomputation counted)."""
    n, d = np.shape(arrays["x"])
    k = np.shape(arrays["p"])[0]
    return float({"fwd": 2, "bwd": 8, "fwd+bwd": 10}[direction] * 2 * n * k * d)


def _ignores_labels(target, kw):
    import torch

    return torch.where(target == kw.get("ignore_index", -100), 0, target)


MLR = Spec(
    name="hyperbolic_mlr_ce",
    paper=48,
    family="metric",
    summary="Hyp-CE: cross-entropy of hyperbolic multinomial logistic regression logits (two GEMMs, fused epilogue).",
    reference=f"{REF}:hyperbolic_mlr_ce",
    reference_grad=f"{REF}:hyperbolic_mlr_ce_grad",
    accelerated=f"{ACC}:hyperbolic_mlr_ce",
    baseline=f"{BASE}:hyperbolic_mlr_ce",
    samples=_mlr_samples,
    examples=_mlr_examples,
    grad_inputs=("x", "p", "a"),
    tolerance=MLR_TOLERANCE,
    fd_skip=_zero_normal,
    reduction_length=_width,
    bad_inputs=_bad_c(lambda: _mlr_arrays()()[0]) + (
        BadInput("label >= K", _mlr_arrays(target=np.array([0, 3])), ValueError, "target", data_dependent=True),
        BadInput("negative label other than ignore_index", _mlr_arrays(target=np.array([-5, 0])), ValueError,
                 "target", data_dependent=True),
        BadInput("x[1] outside the ball", _mlr_arrays(x=_outside()), ValueError, "x", data_dependent=True),
        BadInput("p[1] outside the ball", _mlr_arrays(p=_outside((3, 3))), ValueError, "p", data_dependent=True),
        BadInput("p of another width", _mlr_arrays(p=np.zeros((3, 4)), a=np.ones((3, 4))), ValueError, "p"),
        BadInput("a of another shape", _mlr_arrays(a=np.ones((2, 3))), ValueError, "a"),
        BadInput("float target", _mlr_arrays(target=np.array([0.0, 1.0])), TypeError, "target"),
        BadInput("target length differs from N", _mlr_arrays(target=np.array([0, 1, 2])), ValueError, "target"),
        BadInput("unknown reduction", lambda: (_mlr_arrays()()[0], {"reduction": "avg"}), ValueError, "reduction"),
    ),
    bench_cases=(BenchCase("65536x1000x512", _mlr_bench(65536, 1000, 512), ("x", "p", "a"),
                           smoke=_mlr_bench(4, 3, 8), dtypes=("float32", "bfloat16")),),
    flops=_mlr_flops,
    properties=("equals the cross-entropy of hyptorch's Möbius-sum logits (tested against a brute-force form)",),
    wrong_ports={"ignores ignore_index": wrong_ports.replaces_argument("target", _ignores_labels),
                 "mean over all rows": wrong_ports.mean_over_all_rows},
)

register(EXPMAP0, DISTANCE, HYP_PC, MLR)
