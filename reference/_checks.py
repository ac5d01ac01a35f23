"""Input validation shared by the references.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) and names the offending argument, so a user sees which input is wrong.
"""

from __future__ import annotations

import math

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def as_float_matrix(x, name: str) -> np.ndarray:
    """``x`` as a float64 (N, C) array with C >= 1."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {arr.ndim} dimensions {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class (C >= 1), got shape {arr.shape}")
    return arr.astype(np.float64)


def as_labels(target, name: str, n: int, num_classes: int, ignore_index: int) -> np.ndarray:
    """``target`` as an int64 (N,) array whose entries are in [0, C) or equal ``ignore_index``."""
    arr = np.asarray(target)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of class indices, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match logits, got {arr.shape}")
    arr = arr.astype(np.int64)
    bad = (arr != ignore_index) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}[{i}] = {arr[i]} is out of range: class indices must lie in [0, {num_classes}) "
            f"or equal ignore_index={ignore_index}"
        )
    return arr


def as_class_weight(weight, name: str, num_classes: int) -> np.ndarray | None:
    """Optional per-class weight as a float64 (C,) array (any real values, as in PyTorch)."""
    if weight is None:
        return None
    arr = np.asarray(weight)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), one entry per class, got {arr.shape}")
    return arr.astype(np.float64)


def row_loss_inputs(logits, target, ignore_index, reduction):
    """Validated inputs of a row-wise classification loss.

    Returns the (N, C) float64 logits with ignored rows zeroed (so their values, NaN included, cannot
    reach the result), the labels with ignored rows set to class 0, and the (N,) mask of rows that
    are not ignored.
    """
    z = as_float_matrix(logits, "logits")
    n, c = z.shape
    ignore_index = check_int(ignore_index, "ignore_index")
    y = as_labels(target, "target", n, c, ignore_index)
    check_reduction(reduction)
    active = y != ignore_index
    return np.where(active[:, None], z, 0.0), np.where(active, y, 0), active


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_real(value, name: str, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real hyper-parameter within [low, high] (or open bounds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):  # math, not numpy: this also runs inside torch.compile'd code
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def reduce_rows(row_loss: np.ndarray, row_weight: np.ndarray, reduction: str):
    """Apply a reduction to per-row losses.

    ``mean`` divides by the total weight of the non-ignored rows, as ``torch.nn.functional.cross_entropy``
    does; with no such row that is 0/0 = NaN.
    """
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return np.float64(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(total / row_weight.sum())


def reduce_rows_grad(grad, row_weight: np.ndarray, reduction: str) -> np.ndarray:
    """d(reduced)/d(row_loss) times the upstream gradient, as an (N,) array."""
    grad = np.asarray(grad, dtype=np.float64)
    n = row_weight.shape[0]
    if reduction == "none":
        if grad.shape != (n,):
            raise ValueError(f"grad must have shape ({n},) for reduction='none', got {grad.shape}")
        return grad
    if grad.shape != ():
        raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
    if reduction == "sum":
        return np.full(n, float(grad))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.full(n, float(grad) / row_weight.sum())


def as_float_array(x, name: str, ndim: int, shape: str) -> np.ndarray:
    """``x`` as a float64 array with ``ndim`` dimensions; ``shape`` names them for the message,
    e.g. ``"(B, D)"``."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {arr.ndim} dimensions {arr.shape}")
    return arr.astype(np.float64)


def as_int_array(x, name: str, shape: tuple, what: str = "labels") -> np.ndarray:
    """``x`` as an int64 array of exactly ``shape`` (class labels compared for equality, indices)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of {what}, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr.astype(np.int64)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_choice(value, name: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
