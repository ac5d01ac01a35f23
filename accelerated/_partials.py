"""Deterministic finishing sums: kernels that reduce in blocks write one fp32 partial sum per
program, and one program per output adds its partials in a fixed order (no atomics, so the result
is the same on every run)."""

import torch
import triton
import triton.language as tl

from . import _runtime as rt

BLOCK = {"interpreter": 16, "gpu": 1024}


@triton.jit
def _sum_partials_kernel(
    partials_ptr,  # (R, P) fp32 contiguous: per-program partial sums
    out_ptr,       # out (R,) contiguous in the result dtype (a 0-d tensor when R = 1)
    P, divisor,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, P, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partials_ptr + row * P + j, mask=j < P, other=0.0)
    total = tl.sum(acc, axis=0) / divisor
    tl.store(out_ptr + row, total.to(out_ptr.dtype.element_ty))


def sum_partials(partials: torch.Tensor, divisor: float, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (R elements, contiguous) with the row sums of ``partials`` (R, P) / ``divisor``."""
    block = BLOCK["interpreter" if rt.interpreting() else "gpu"]
    _sum_partials_kernel[(partials.shape[0],)](partials, out, partials.shape[1], divisor, BLOCK=block)
    return out
