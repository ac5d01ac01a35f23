"""Spec of the quality-weighted dual LoRA linear layer (P2, PETALface)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad

NAME = "dual_lora_linear"
REF = f"twinops.reference.layers.{NAME}"
ACC = f"twinops.accelerated.layers.{NAME}"
BASE = f"twinops.conformance.baselines.layers.{NAME}"

# Rows around the 16-row interpreter tiles; the ci list stays short (each sample runs five kernels).
ROWS = {"ci": (1, 2, 5, 16, 17), "dev": EMBED_BATCH["dev"], "gpu": EMBED_BATCH["gpu"]}
RANKS = {"ci": (1, 2, 8, 16, 17), "dev": (1, 2, 3, 8, 15, 16, 17, 32), "gpu": (1, 4, 8, 16, 17, 32, 64)}
FACTORS = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")
GRAD_INPUTS = ("x",) + FACTORS + ("alpha",)

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(N + d_in + d_out): outputs are sums over d_in (y), d_out (dx, dalpha) "
        "and N (the factors' gradients) terms in fp32.",
        "atol scales with the row's largest entry: an entry that nearly cancels keeps the rounding error "
        "of the row's largest terms.",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol.",
    ),
)


def _alpha(draw, rng, n: int) -> np.ndarray:
    mode = draw(st.sampled_from(("uniform", "unclamped", "exact 0/1", "per image")))
    if mode == "uniform":
        return rng.uniform(0.0, 1.0, size=n)
    if mode == "unclamped":  # the authors' 0.5 + (q - tau) is not clamped
        return rng.uniform(-0.6, 1.6, size=n)
    if mode == "exact 0/1":  # one branch exactly silent per row
        return rng.integers(0, 2, size=n).astype(np.float64)
    images = max(1, n // 4)
    return np.repeat(rng.uniform(0.0, 1.0, size=images), -(-n // images))[:n]


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(ROWS[profile]))
    d_in = draw(st.sampled_from(EMBED_DIMS[profile]))
    d_out = draw(st.sampled_from(EMBED_DIMS[profile]))
    ranks = [r for r in RANKS[profile] if r <= min(d_in, d_out)]
    r1, r2 = draw(st.sampled_from(ranks)), draw(st.sampled_from(ranks))
    scale = draw(st.sampled_from((1.0, 1.0, 2.0, 0.25, -1.0)))
    arrays = {
        "x": rng.normal(size=(n, d_in)) * draw(st.sampled_from((1e-2, 1.0, 10.0))),
        "weight": rng.normal(size=(d_out, d_in)) / np.sqrt(d_in),
        "lora_a1": rng.normal(size=(r1, d_in)) / r1,
        "lora_b1": rng.normal(size=(d_out, r1)) * 0.3,
        "lora_a2": rng.normal(size=(r2, d_in)) / r2,
        "lora_b2": rng.normal(size=(d_out, r2)) * 0.3,
        "alpha": _alpha(draw, rng, n),
    }
    if draw(st.booleans()):
        arrays["bias"] = rng.normal(size=d_out)
    masks = draw(st.sampled_from(("none", "both", "first", "second")))
    for i in (1, 2):
        if masks in ("both", ("first", "second")[i - 1]):
            arrays[f"dropout_mask{i}"] = (rng.random((n, d_out)) < 0.9) / 0.9
    layouts = {k: draw(st.sampled_from(LAYOUTS)) for k in ("x", "weight", "lora_a1", "lora_b2")}
    return Sample(arrays=arrays, kwargs={"scale": scale}, float_inputs=tuple(arrays), layouts=layouts,
                  grad_out=upstream_grad(rng, (n, d_out)), note=f"r1={r1}, r2={r2}, masks={masks}")


def _base(rng, n=5, d_in=6, d_out=7, r=2) -> dict:
    return {
        "x": rng.normal(size=(n, d_in)), "weight": rng.normal(size=(d_out, d_in)) / 3,
        "lora_a1": rng.normal(size=(r, d_in)), "lora_b1": rng.normal(size=(d_out, r)),
        "lora_a2": rng.normal(size=(r, d_in)), "lora_b2": rng.normal(size=(d_out, r)),
        "alpha": np.array([0.0, 1.0, 0.3, -0.5, 1.5])[:n], "bias": rng.normal(size=d_out),
    }


def _edge_cases() -> list[Sample]:
    rng = np.random.default_rng(2)
    base = _base(rng)
    nan_x = dict(base, x=base["x"].copy())
    nan_x["x"][2, 3] = np.nan
    nan_alpha = dict(base, alpha=base["alpha"].copy())
    nan_alpha["alpha"][3] = np.nan
    zero_b = dict(base, lora_b1=np.zeros((7, 2)), lora_b2=np.zeros((7, 2)))
    empty = {k: (v[:0] if k in ("x", "alpha") else v) for k, v in base.items()}
    full_rank = _base(rng, d_in=6, d_out=6, r=6)
    cases = [
        (base, "alpha in {0, 1, 0.3, -0.5, 1.5}: rows 0/1 silence one branch exactly"),
        (nan_x, "NaN in x: its row NaN"),
        (nan_alpha, "NaN alpha: its row NaN"),
        (zero_b, "B = 0 (the initialisation): the frozen layer"),
        (empty, "N = 0"),
        (full_rank, "rank = min(d_in, d_out)"),
        (dict(base, dropout_mask1=np.zeros((5, 7)), dropout_mask2=np.full((5, 7), 1 / 0.9)), "all dropped / all kept"),
    ]
    return [Sample(arrays, {"scale": 1.0}, tuple(arrays),
                   grad_out=upstream_grad(rng, (arrays["x"].shape[0], arrays["weight"].shape[0])), note=note)
            for arrays, note in cases]


def _bad(description, error, match, **change):
    def make():
        arrays = _base(np.random.default_rng(0))
        arrays.update({k: v for k, v in change.items() if k != "scale"})
        return arrays, {k: v for k, v in change.items() if k == "scale"}

    return BadInput(description, make, error, match)


BAD_INPUTS = (
    _bad("1-D x", ValueError, "x", x=np.ones(6)),
    _bad("weight with the wrong d_in", ValueError, "weight", weight=np.ones((7, 5))),
    _bad("rank larger than the dimensions", ValueError, "lora_a1", lora_a1=np.ones((8, 6)), lora_b1=np.ones((7, 8))),
    _bad("rank 0", ValueError, "lora_a2", lora_a2=np.ones((0, 6)), lora_b2=np.ones((7, 0))),
    _bad("lora_b1 with the wrong rank", ValueError, "lora_b1", lora_b1=np.ones((7, 3))),
    _bad("lora_b2 with the wrong d_out", ValueError, "lora_b2", lora_b2=np.ones((6, 2))),
    _bad("lora_a2 with the wrong d_in", ValueError, "lora_a2", lora_a2=np.ones((2, 5))),
    _bad("alpha of the wrong length", ValueError, "alpha", alpha=np.ones(4)),
    _bad("bias of the wrong length", ValueError, "bias", bias=np.ones(6)),
    _bad("dropout mask of the wrong shape", ValueError, "dropout_mask1", dropout_mask1=np.ones((5, 6))),
    _bad("bool alpha", TypeError, "alpha", alpha=np.ones(5, dtype=bool)),
    _bad("scale = NaN", ValueError, "scale", scale=float("nan")),
)


def _bench(n: int, d_in: int, d_out: int, r: int, masks: bool) -> BenchCase:
    """Swin-style qkv-sized linear: random frozen weight, trained-looking factors, alpha uniform."""

    def build(rng, n, d_in, d_out, r):
        f32 = np.float32
        arrays = {
            "x": rng.standard_normal((n, d_in), dtype=f32),
            "weight": rng.standard_normal((d_out, d_in), dtype=f32) / np.sqrt(d_in),
            "lora_a1": rng.standard_normal((r, d_in), dtype=f32) / r,
            "lora_b1": rng.standard_normal((d_out, r), dtype=f32),
            "lora_a2": rng.standard_normal((r, d_in), dtype=f32) / r,
            "lora_b2": rng.standard_normal((d_out, r), dtype=f32),
            "alpha": rng.uniform(0, 1, size=n).astype(f32), "bias": rng.standard_normal(d_out, dtype=f32),
        }
        if masks:
            for i in (1, 2):
                arrays[f"dropout_mask{i}"] = ((rng.random((n, d_out)) < 0.9) / 0.9).astype(f32)
        return arrays, {}

    label = f"N={n} {d_in}->{d_out} r={r}" + (" dropout" if masks else "")
    floats = ("x", "weight") + FACTORS + ("alpha", "bias") + (("dropout_mask1", "dropout_mask2") if masks else ())
    return BenchCase(label, lambda rng: build(rng, n, d_in, d_out, r), floats,
                     smoke=lambda rng: build(rng, 16, 16, 16, 2))


def _sizes(arrays: dict):
    n, d_in = np.shape(arrays["x"])
    d_out, r1, r2 = np.shape(arrays["weight"])[0], np.shape(arrays["lora_a1"])[0], np.shape(arrays["lora_a2"])[0]
    return n, d_in, d_out, r1 + r2


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward: read x, W, the factors, alpha, bias, the masks; write y and u (fp32, N (r1 + r2)).
    Backward: read G three times (rank pass, dx, dB), W, x (dA), u and the masks twice; write dx and
    q (fp32) and read it twice. Re-reads of tiles by other programs (x once per column tile, W once per
    row tile) are left to the caches and not counted."""
    n, d_in, d_out, r = _sizes(arrays)
    masks = sum(1 for k in ("dropout_mask1", "dropout_mask2") if k in arrays) * n * d_out * itemsize
    small = (r * (d_in + d_out) + d_out) * itemsize + n * itemsize
    fwd = (n * d_in + d_out * d_in + n * d_out) * itemsize + small + masks + 4 * n * r
    bwd = (3 * n * d_out + d_out * d_in + 2 * n * d_in) * itemsize + small + 2 * masks + 4 * 4 * n * r
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _flops(arrays: dict, direction: str) -> float:
    """The op's useful FLOPs: the frozen GEMM plus both rank-r branches (2 N r (d_in + d_out) each);
    backward the dx GEMM plus G B, q A, dA and dB. Not counted: the fused forward recomputes u = x Aᵀ
    in every output-column tile (d_out / 64 times at the GPU tile size)."""
    n, d_in, d_out, r = _sizes(arrays)
    fwd = 2 * n * d_in * d_out + 2 * n * r * (d_in + d_out)
    bwd = 2 * n * d_out * d_in + 4 * n * r * (d_in + d_out)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _swaps_branches(fn):
    """alpha weighting the first branch instead of the second (the HR/LR branches swapped)."""
    return lambda **kw: fn(**{**kw, "alpha": 1 - kw["alpha"]})


def _ignores_masks(fn):
    import torch

    def port(**kw):
        kw = {k: (torch.ones_like(v) if k.startswith("dropout_mask") else v) for k, v in kw.items()}
        return fn(**kw)

    return port


def _peft_scaling(fn):
    """PEFT's convention: scale divided by the rank."""
    return lambda **kw: fn(**{**kw, "scale": kw.get("scale", 1.0) / kw["lora_a1"].shape[0]})


DUAL_LORA_LINEAR = Spec(
    name=NAME,
    paper=2,
    family="layers",
    summary="Frozen linear layer plus two LoRA branches mixed per row by a quality weight alpha, fused in one GEMM.",
    reference=f"{REF}:{NAME}",
    reference_grad=f"{REF}:{NAME}_grad",
    accelerated=f"{ACC}:{NAME}",
    baseline=f"{BASE}:{NAME}",
    samples=lambda profile, dtype: _samples(profile, dtype),
    examples=_edge_cases,
    grad_inputs=GRAD_INPUTS,
    tolerance=TOLERANCE,
    reduction_length=lambda s: int(sum(np.shape(s.arrays["x"])) + np.shape(s.arrays["weight"])[0]),
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(8192, 768, 768, 8, False), _bench(8192, 768, 768, 16, False),
                 _bench(8192, 768, 768, 8, True)),
    bytes_moved=_bytes,
    flops=_flops,
    properties=("alpha = 0 (1) silences branch 2 (1) exactly: zero contribution, zero factor gradients",
                "with B1 = B2 = 0 (the initialisation) the output is the frozen layer's",
                "no gradient for the frozen weight and bias"),
    wrong_ports={"swaps the branches (alpha on branch 1)": _swaps_branches,
                 "ignores the dropout masks": _ignores_masks,
                 "PEFT scaling (scale / r)": _peft_scaling},
)

register(DUAL_LORA_LINEAR)
