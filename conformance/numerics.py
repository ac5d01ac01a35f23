"""Dtype rounding and the tolerance comparison, in plain NumPy (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import Tolerance


def round_to_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values an input of ``dtype`` actually holds (round to nearest even; values
    beyond the dtype's range become ±inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _round(np.asarray(array, dtype=np.float64), dtype)


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float64":
        return a.copy()
    if dtype == "float32":
        return a.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        f = a.astype(np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
        return np.where(np.isnan(f), np.nan, out)
    raise ValueError(f"unknown dtype {dtype!r}")


@dataclass
class Comparison:
    """Outcome of comparing one output (or gradient) against the reference."""

    ok: bool
    max_abs: float  # largest |acc - ref| over finite reference entries
    worst_ratio: float  # largest error / allowed error (<= 1 passes)
    worst_index: tuple | None
    message: str = ""


def compare(
    acc: np.ndarray,
    ref: np.ndarray,
    *,
    dtype: str,
    tolerance: Tolerance,
    reduction_length: int = 1,
    baseline: np.ndarray | None = None,
) -> Comparison:
    """Elementwise ``|acc - ref| <= atol * sqrt(n) + rtol * |ref|``; NaN and inf positions exact.

    For 16-bit dtypes an element also passes when its error is at most ``baseline_factor`` times the
    eager baseline's error on the same element plus ``atol`` (no worse than naive).
    """
    acc = np.asarray(acc, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if acc.shape != ref.shape:
        return Comparison(False, np.inf, np.inf, None, f"shape {acc.shape} != reference shape {ref.shape}")
    # A finite reference value beyond the dtype's range is expected to overflow to ±inf.
    overflow = np.isfinite(ref) & np.isinf(round_to_dtype(ref, dtype))
    ref = np.where(overflow, np.copysign(np.inf, ref), ref)
    nan_acc, nan_ref = np.isnan(acc), np.isnan(ref)
    if (nan_acc != nan_ref).any():
        idx = tuple(int(i) for i in np.argwhere(nan_acc != nan_ref)[0])
        return Comparison(
            False, np.inf, np.inf, idx, f"NaN positions differ at {idx}: got {acc[idx]!r}, reference {ref[idx]!r}"
        )
    inf_ref = np.isinf(ref)
    if (np.isinf(acc) != inf_ref).any() or (acc[inf_ref] != ref[inf_ref]).any():
        bad = (np.isinf(acc) != inf_ref) | (inf_ref & (acc != ref))
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return Comparison(
            False, np.inf, np.inf, idx, f"inf positions differ at {idx}: got {acc[idx]!r}, reference {ref[idx]!r}"
        )
    finite = np.isfinite(ref)
    if not finite.any():
        return Comparison(True, 0.0, 0.0, None)
    rtol, atol = tolerance.rtol[dtype], tolerance.atol[dtype]
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(acc - np.where(finite, ref, 0.0)), 0.0)
    atol_scale = 1.0
    if tolerance.atol_scales_with_row and ref.ndim >= 1:
        atol_scale = np.maximum(1.0, np.max(np.abs(np.where(finite, ref, 0.0)), axis=-1, keepdims=True))
    allowed = atol * atol_scale * np.sqrt(max(reduction_length, 1)) + rtol * np.abs(np.where(finite, ref, 0.0))
    if baseline is not None and dtype in ("float16", "bfloat16"):
        base = np.asarray(baseline, dtype=np.float64)
        usable = finite & np.isfinite(base)
        base_err = np.where(usable, np.abs(np.where(usable, base, 0.0) - np.where(usable, ref, 0.0)), 0.0)
        allowed = np.maximum(allowed, tolerance.baseline_factor * base_err + atol)
    ratio = err / allowed
    flat = int(np.argmax(ratio))
    idx = tuple(int(i) for i in np.unravel_index(flat, ratio.shape)) if ratio.ndim else ()
    worst = float(ratio.reshape(-1)[flat])
    ok = worst <= 1.0
    msg = "" if ok else (
        f"max error {err.max():.3g} exceeds tolerance at index {idx}: got {acc[idx]!r}, "
        f"reference {ref[idx]!r}, allowed {allowed[idx]:.3g} (rtol={rtol:g}, atol={atol:g}, n={reduction_length})"
    )
    return Comparison(ok, float(err.max()), worst, idx, msg)
