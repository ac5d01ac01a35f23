"""Specs of HPM's relative loss and easy-to-hard mask (P30)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...strategies import LAYOUTS, seed, upstream_grad
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance

REF = "twinops.reference.metric.hpm"
ACC = "twinops.accelerated.metric.hpm"
BASE = "twinops.conformance.baselines.metric.hpm"

BATCH = {"ci": (1, 2, 3, 5), "dev": (1, 2, 3, 4, 7), "gpu": (1, 3, 64, 256)}
# Patches per image around the 16-wide tiles of the interpreter (64-wide on the GPU).
PATCHES = {
    "ci": (1, 2, 3, 8, 15, 16, 17, 33),
    "dev": (1, 2, 3, 5, 15, 16, 17, 31, 32, 33, 49),
    "gpu": (2, 63, 64, 65, 147, 196, 257),
}


# ---------------------------------------------------------------------------- hpm_relative_loss


def _targets(rng, b, m, mode):
    if mode == "distinct":
        return rng.gamma(2.0, 0.5, size=(b, m))
    if mode == "ties":  # a few distinct values: many tied pairs
        return rng.integers(0, 3, size=(b, m)) * 0.25
    return np.full((b, m), 0.7)  # every pair tied: nothing to rank


@st.composite
def _relative_samples(draw, profile, dtype):
    rng = seed(draw)
    b = draw(st.sampled_from(BATCH[profile]))
    m = draw(st.sampled_from(PATCHES[profile]))
    scale = draw(st.sampled_from((0.01, 1.0, 5.0, 30.0)))
    pred = rng.normal(size=(b, m)) * scale + rng.normal()
    mode = draw(st.sampled_from(("distinct", "distinct", "ties", "all tied")))
    target = _targets(rng, b, m, mode)
    if mode == "ties" and b > 1 and draw(st.booleans()):
        target[0] = 0.5  # one image without a pair to rank, the others with
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    kwargs = {"eps": draw(st.sampled_from((1e-6, 0.0, 1e-3))), "reduction": reduction}
    layouts = {"pred": draw(st.sampled_from(LAYOUTS)), "target": draw(st.sampled_from(LAYOUTS))}
    return Sample({"pred": pred, "target": target}, kwargs, ("pred", "target"), layouts=layouts,
                  grad_out=upstream_grad(rng, (b,) if reduction == "none" else ()),
                  note=f"targets {mode}, pred scale {scale:g}")


def _relative_examples():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(2, 5))
    target = rng.normal(size=(2, 5))
    nan_pred, nan_target = pred.copy(), target.copy()
    nan_pred[1, 2] = np.nan
    nan_target[0, 1] = np.nan
    far = pred * 1e3  # sigmoid saturates: the eps bound (about 13.8 a pair) is reached
    cases = (
        (pred, np.full((2, 5), 1.0), 1e-6, "mean", "every target tied: no pair to rank"),
        (pred[:, :1], target[:, :1], 1e-6, "none", "one patch per image"),
        (nan_pred, target, 1e-6, "none", "NaN prediction"),
        (pred, nan_target, 1e-6, "sum", "NaN target: its pairs are ignored"),
        (far, target, 1e-6, "none", "saturated sigmoid"),
        (far, target, 0.0, "mean", "saturated sigmoid, exact log-sigmoid"),
    )
    out = []
    for p, t, eps, reduction, note in cases:
        grad = None if np.isnan(p).any() else upstream_grad(rng, (2,) if reduction == "none" else ())
        out.append(Sample({"pred": p, "target": t}, {"eps": eps, "reduction": reduction}, ("pred", "target"),
                          grad_out=grad, note=note))
    return out


def _pairs_per_image(sample: Sample) -> int:
    return max(1, int(np.shape(sample.arrays["pred"])[1]) ** 2)


def _relative_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads pred and target once; backward reads both and writes the gradient."""
    b, m = np.shape(arrays["pred"])
    passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction]
    return float(passes * b * m * itemsize + 12 * b)


def _relative_bench(b, m):
    def make(rng):
        return {"pred": rng.standard_normal((b, m)), "target": rng.gamma(2.0, 0.5, (b, m))}, {}

    def smoke(rng):
        return {"pred": rng.standard_normal((2, 5)), "target": rng.gamma(2.0, 0.5, (2, 5))}, {}

    return BenchCase(f"B={b} M={m}", make, ("pred", "target"), smoke=smoke)


def _over_all_pairs(fn):
    """``mean`` divided by every ordered pair B*M*M, tied ones included (the classic slip)."""

    def port(*, reduction="mean", **kw):
        if reduction != "mean":
            return fn(reduction=reduction, **kw)
        b, m = kw["pred"].shape
        return fn(reduction="sum", **kw) / max(1, b * m * m)

    return port


def _reversed_ranking(fn):
    """Ranks the predictions against the negated targets (the two sigmoid branches swapped)."""
    return lambda **kw: fn(**dict(kw, target=-kw["target"]))


def _bad_relative(description, error, match, pred=(2, 4), target=(2, 4), **kw):
    def make():
        return {"pred": np.zeros(pred), "target": np.zeros(target)}, kw

    return BadInput(description, make, error, match)


HPM_RELATIVE = Spec(
    name="hpm_relative_loss",
    paper=30,
    family="metric",
    summary="HPM's pairwise ranking loss of predicted against measured patch losses, without the (B, M, M) tensors.",
    reference=f"{REF}:hpm_relative_loss",
    reference_grad=f"{REF}:hpm_relative_loss_grad",
    accelerated=f"{ACC}:hpm_relative_loss",
    baseline=f"{BASE}:hpm_relative_loss",
    samples=_relative_samples,
    examples=_relative_examples,
    grad_inputs=("pred",),
    tolerance=Tolerance(
        rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
        atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
        reasons=(
            "atol grows with sqrt(M^2): the per-image sum runs over M^2 ordered pairs (and each gradient "
            "entry over M), each rounded in fp32.",
            "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the "
            "result is rounded to the input dtype.",
        ),
    ),
    reduction_length=_pairs_per_image,
    bad_inputs=(
        _bad_relative("target shape differs from pred", ValueError, "target", target=(2, 5)),
        _bad_relative("1-D pred", ValueError, "pred", pred=(4,), target=(4,)),
        _bad_relative("eps < 0", ValueError, "eps", eps=-1e-6),
        _bad_relative("eps = inf", ValueError, "eps", eps=float("inf")),
        _bad_relative("unknown reduction", ValueError, "reduction", reduction="avg"),
    ),
    bench_cases=(_relative_bench(256, 147), _relative_bench(2048, 147)),
    bytes_moved=_relative_bytes,
    wrong_ports={
        "mean over all pairs, ties included": _over_all_pairs,
        "ranking against reversed targets": _reversed_ranking,
    },
    properties=(
        "tied targets (and i = j) contribute nothing; no pair to rank gives 0 for 'mean'",
        "eps = 0 is the exact log-sigmoid ranking loss, computed stably",
    ),
)


# ---------------------------------------------------------------------------- easy_to_hard_mask


@st.composite
def _mask_samples(draw, profile, dtype):
    rng = seed(draw)
    b = draw(st.sampled_from(BATCH[profile]))
    length = draw(st.sampled_from(PATCHES[profile] + (49,)))
    pred_mode = draw(st.sampled_from(("distinct", "ties", "ties", "constant", "nan")))
    pred = rng.normal(size=(b, length))
    if pred_mode == "ties":
        pred = rng.integers(0, 3, size=(b, length)).astype(np.float64)
    elif pred_mode == "constant":
        pred = np.full((b, length), 0.25)
    elif pred_mode == "nan":
        pred[rng.random((b, length)) < 0.2] = np.nan
    noise_mode = draw(st.sampled_from(("uniform", "ties", "nan")))
    noise = rng.random((b, length))
    if noise_mode == "ties":
        noise = np.round(noise * 3) / 4
    elif noise_mode == "nan":
        noise[rng.random((b, length)) < 0.2] = np.nan
    total = draw(st.integers(1, 12))
    epoch = draw(st.integers(0, total - 1) | st.just(total - 1))
    ratio = draw(st.sampled_from((0.75, 0.75, 0.5, 0.9, 0.0, 1.0)) | st.floats(0.0, 1.0))
    layouts = {"pred": draw(st.sampled_from(LAYOUTS)), "noise": draw(st.sampled_from(LAYOUTS))}
    return Sample({"pred": pred, "noise": noise}, {"epoch": epoch, "total_epochs": total, "mask_ratio": ratio},
                  ("pred", "noise"), layouts=layouts, note=f"pred {pred_mode}, noise {noise_mode}")


def _mask_examples():
    rng = np.random.default_rng(5)
    pred, noise = rng.normal(size=(3, 16)), rng.random((3, 16))
    kw = {"epoch": 9, "total_epochs": 10, "mask_ratio": 0.75}
    inf_pred = pred.copy()
    inf_pred[0, :3] = [np.inf, -np.inf, np.nan]
    cases = (
        (np.zeros((3, 16)), np.zeros((3, 16)), kw, "everything tied: index order decides"),
        (pred, noise, {**kw, "epoch": 0, "total_epochs": 100}, "n_hard = 0: fully random"),
        (pred, noise, {**kw, "mask_ratio": 0.0}, "mask ratio 0: n_keep = L, nothing masked"),
        (pred, noise, {**kw, "mask_ratio": 1.0}, "mask ratio 1: everything masked"),
        (pred[:, :1], noise[:, :1], kw, "one patch"),
        (inf_pred, noise, kw, "inf, -inf and NaN predictions"),
        (pred[:0], noise[:0], kw, "empty batch"),
    )
    return [Sample({"pred": p, "noise": u}, k, ("pred", "noise"), note=note) for p, u, k, note in cases]


def _mask_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Reads pred and noise, writes and re-reads the hard flags (1 byte), writes the bool mask."""
    b, length = np.shape(arrays["pred"])
    return float(b * length * (2 * itemsize + 3))


def _mask_bench(b, length):
    def make(rng):
        return {"pred": rng.standard_normal((b, length)), "noise": rng.random((b, length))}, \
            {"epoch": 399, "total_epochs": 800}

    def smoke(rng):
        return {"pred": rng.standard_normal((2, 20)), "noise": rng.random((2, 20))}, \
            {"epoch": 399, "total_epochs": 800}

    return BenchCase(f"B={b} L={length}", make, ("pred", "noise"), smoke=smoke)


def _ties_to_higher_index(fn):
    """Equal predictions / keys resolved towards the higher patch index (reverse the patch order)."""

    def port(**kw):
        out = fn(**dict(kw, pred=kw["pred"].flip(1), noise=kw["noise"].flip(1)))
        return out.flip(1)

    return port


def _easiest_masked(fn):
    """Masks the patches predicted easiest instead of the hardest."""
    return lambda **kw: fn(**dict(kw, pred=-kw["pred"]))


def _one_entry_flipped(fn):
    def port(**kw):
        out = fn(**kw).clone()
        if out.numel():
            out[0, 0] = ~out[0, 0]
        return out

    return port


def _bad_mask(description, error, match, pred=(2, 8), noise=(2, 8), **kw):
    def make():
        return {"pred": np.zeros(pred), "noise": np.zeros(noise)}, {"epoch": 0, "total_epochs": 10, **kw}

    return BadInput(description, make, error, match)


EASY_TO_HARD = Spec(
    name="easy_to_hard_mask",
    paper=30,
    family="metric",
    summary="HPM's easy-to-hard mask: the predicted-hardest patches plus a random fill from explicit keys.",
    reference=f"{REF}:easy_to_hard_mask",
    reference_grad=None,
    accelerated=f"{ACC}:easy_to_hard_mask",
    baseline=f"{BASE}:easy_to_hard_mask",
    samples=_mask_samples,
    examples=_mask_examples,
    grad_inputs=(),
    output_dtypes=("bool",),
    bad_inputs=(
        _bad_mask("noise shape differs from pred", ValueError, "noise", noise=(2, 9)),
        _bad_mask("1-D pred", ValueError, "pred", pred=(8,), noise=(8,)),
        _bad_mask("epoch = total_epochs", ValueError, "epoch", epoch=10),
        _bad_mask("negative epoch", ValueError, "epoch", epoch=-1),
        _bad_mask("total_epochs = 0", ValueError, "total_epochs", total_epochs=0),
        _bad_mask("float epoch", TypeError, "epoch", epoch=1.5),
        _bad_mask("mask_ratio > 1", ValueError, "mask_ratio", mask_ratio=1.5),
        _bad_mask("mask_ratio NaN", ValueError, "mask_ratio", mask_ratio=float("nan")),
    ),
    bench_cases=(_mask_bench(256, 196), _mask_bench(4096, 196)),
    bytes_moved=_mask_bytes,
    wrong_ports={
        "ties broken towards the higher index": _ties_to_higher_index,
        "masks the easiest patches": _easiest_masked,
        "one entry flipped": _one_entry_flipped,
    },
    properties=(
        "bool output compared exactly (any flipped entry is an error of 1)",
        "every row masks exactly L - int(L * (1 - mask_ratio)) patches",
    ),
)

register(HPM_RELATIVE, EASY_TO_HARD)
