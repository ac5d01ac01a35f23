"""Host-side helpers shared by every accelerated technique: device and dtype checks, block sizes.

Everything here runs on the host without synchronising the device. Value-dependent checks (a
label out of range) happen inside the kernels, which mark the affected rows NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..reference._checks import REDUCTIONS, check_int

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)

# Widest class chunk one program loads at a time. Under the Triton interpreter a small chunk keeps
# CPU runs fast and makes modest class counts cross chunk boundaries, so the loops are tested.
INTERPRETER_BLOCK = 32
GPU_BLOCK = 4096


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RowLaunch:
    """Widest class chunk and warps of a row-wise kernel on the GPU. Each technique sets its own
    from the tuning sweep (``tests/gpu/sweep_blocks.py``, results in ``docs/benchmarks/``)."""

    block: int = GPU_BLOCK
    warps: int = 8


SWEEP: RowLaunch | None = None  # set by the tuning sweep to override every technique's choice


def row_launch(n: int, tuned: RowLaunch = RowLaunch()) -> dict:
    """``BLOCK_C`` (a power of two, 16 to the tuned width; 32 under the interpreter) and
    ``num_warps`` for rows of ``n`` elements, as launch keyword arguments."""
    tuned = SWEEP or tuned
    cap = INTERPRETER_BLOCK if interpreting() else tuned.block
    block = max(16, min(cap, 1 << max(0, (n - 1).bit_length())))
    return {"BLOCK_C": block, "num_warps": min(tuned.warps, max(1, block // 256))}


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_device(*named: tuple[str, torch.Tensor | None]) -> None:
    """All tensors on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``)."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreting():
            raise ValueError(
                f"{name} is a CPU tensor: twinops kernels run on a CUDA device. To run them on the CPU "
                "through the Triton interpreter, set TRITON_INTERPRET=1 before triton is imported."
            )
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}")


def check_float_tensor(x, name: str, ndim: int, shape: str) -> torch.Tensor:
    """A float32/float16/bfloat16 tensor with ``ndim`` dimensions (``shape`` names them, e.g.
    ``"(B, D)"``, for the message)."""
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {x.ndim} dimensions {tuple(x.shape)}")
    return x


def check_int_tensor(x, name: str, shape: tuple, what: str = "labels") -> torch.Tensor:
    """An integer tensor of exactly ``shape``."""
    check_tensor(x, name)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of {what}, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` inputs. fp32 follows PyTorch's own switch:
    exact ("ieee") at ``torch.get_float32_matmul_precision() == "highest"`` (the default), TF32
    otherwise, as ``torch.matmul`` does. 16-bit inputs are multiplied exactly with fp32 accumulation
    whatever the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    check_tensor(logits, name)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {logits.ndim} dimensions {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
    return logits


def check_target(target, n: int, name: str = "target") -> torch.Tensor:
    check_tensor(target, name)
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match logits, got {tuple(target.shape)}")
    return target


def check_class_weight(weight, c: int, name: str = "weight") -> torch.Tensor | None:
    if weight is None:
        return None
    check_tensor(weight, name)
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if tuple(weight.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), one entry per class, got {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError(f"{name}: gradients with respect to class weights are not supported; pass {name}.detach()")
    return weight


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_row_loss(logits, target, ignore_index, reduction) -> int:
    """The host-side checks every row-wise loss makes: (N, C) floating logits, (N,) integer labels,
    an int ``ignore_index``, a known reduction, both tensors on one usable device. Returns
    ``ignore_index``. Label values are checked by the kernels (invalid rows come out NaN)."""
    check_logits(logits)
    check_target(target, logits.shape[0])
    ignore_index = check_int(ignore_index, "ignore_index")
    check_reduction(reduction)
    check_device(("logits", logits), ("target", target))
    return ignore_index


def reduce_rows(row_loss: torch.Tensor, row_weight: torch.Tensor, reduction: str, dtype: torch.dtype):
    """Per-row fp32 losses → the requested reduction, returned in ``dtype`` (as the reference's
    ``reduce_rows``: ``mean`` divides by the total weight of non-ignored rows)."""
    if reduction == "none":
        out = row_loss
    elif reduction == "sum":
        out = row_loss.sum()
    else:
        out = row_loss.sum() / row_weight.sum()
    return out.to(dtype)
