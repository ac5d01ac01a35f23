"""DRM's entropy-weighted head ensemble (P32) as one Triton kernel: one program per sample reads
the D+1 heads' logits of that sample, computes every head's softmax statistics and entropy in one
pass over the classes, then writes the weighted combination in a second pass (the sample's
(D+1) x C logits are still in L2). See `twinops.reference.classification.drm_ensemble` for the
definition.

Per sample b and head h, with x = z - m (m the running maximum), the first pass keeps
    m_h,   t_h = sum_{c != c*} e^{x_c}  (all classes but one maximal one),   u_h = sum_c e^{x_c} (-x_c)
so that s_h = 1 + t_h and H_h = log1p(t_h) + u_h / s_h, a sum of non-negative terms (accurate for
nearly one-hot heads, where lse - sum p z cancels). Weights: softmax over heads of -gamma log H_h
(gamma >= 0) or a one-hot on the first minimal H_h (gamma < 0). Second pass:
    out[b, c] = sum_{h summed} w_h e^{z_hc - m_h} / s_h.
Extra memory: none beyond the (B, C) output.

Not trained through (forward only): DRM uses the combination only for pseudo-labels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_real
from .. import _runtime as rt
from .._triton_math import log1p

__all__ = ["drm_ensemble", "DRMEnsemble"]

HAS_TRITON_BACKWARD = False

LAUNCH = rt.RowLaunch(block=512, warps=4)


@triton.jit
def _drm_ensemble_kernel(
    logits_ptr, stride_head, stride_batch, stride_class,  # (D+1, B, C); element (h, b, c) at h*sh + b*sb + c*sc
    out_ptr, stride_out_batch, stride_out_class,          # out (B, C) in the logits' dtype
    num_heads, C, gamma,
    SUMMED: tl.constexpr,       # heads whose predictions are summed: D, or D + 1 with the shared head
    SELECT: tl.constexpr,       # gamma < 0: take the lowest-entropy head
    HEADS: tl.constexpr,        # num_heads rounded up to a power of two
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS)
    live = heads < num_heads
    row = logits_ptr + b * stride_batch + heads.to(tl.int64)[:, None] * stride_head  # (HEADS, 1) row pointers

    # Pass 1: online max m, t = sum of e^{x} over all classes but one maximal one, u = sum e^{x} (-x).
    m = tl.full([HEADS], float("-inf"), tl.float32)
    t = tl.full([HEADS], 0.0, tl.float32)
    u = tl.full([HEADS], 0.0, tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = live[:, None] & (cols < C)[None, :]
        z = tl.load(row + cols[None, :] * stride_class, mask=mask, other=float("-inf")).to(tl.float32)
        chunk_max = tl.max(z, axis=1)
        m_new = tl.where(chunk_max > m, chunk_max, m)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Old terms rescale by r = e^{m - m_new}; each old x grows by (m - m_new) <= 0. The old
        # maximum (left out of t) becomes an ordinary term worth r when the maximum moves.
        moved = m_new > m
        r = tl.where(moved, tl.exp(m - shift), 1.0)
        gap = tl.where(moved & (m > float("-inf")), shift - m, 0.0)
        u = r * (u + gap * (t + 1.0))
        t = r * t + tl.where(moved & (m > float("-inf")), r, 0.0)
        x = z - shift[:, None]
        e = tl.exp(x)
        # leave out the first maximal class of this chunk when it holds the new maximum
        first = tl.min(tl.where(z == m_new[:, None], cols[None, :], C + BLOCK_C), axis=1)
        skip = moved[:, None] & (cols[None, :] == first[:, None])
        t += tl.sum(tl.where(skip, 0.0, e), axis=1)
        u += tl.sum(tl.where(e > 0.0, e * -x, 0.0), axis=1)
        m = m_new
    s = 1.0 + t
    entropy = log1p(t) + u / s
    # NaN (a NaN or +inf logit, a row of -inf) must survive: t or u is NaN there, or m is -inf/+inf.
    entropy = tl.where((m == float("-inf")) | (m == float("inf")), float("nan"), entropy)
    entropy = tl.where(entropy < 1e-12, 1e-12, entropy)
    bad = tl.sum(tl.where(live & (entropy != entropy), 1, 0), axis=0) > 0

    if SELECT:
        lowest = tl.min(tl.where(live, entropy, float("inf")), axis=0)
        pick = tl.min(tl.where(live & (entropy == lowest), heads, HEADS), axis=0)  # ties: lowest index
        w = tl.where(heads == pick, 1.0, 0.0)
    else:
        log_w = tl.where(live, -gamma * tl.log(entropy), float("-inf"))
        w = tl.exp(log_w - tl.max(log_w, axis=0))
        w = w / tl.sum(w, axis=0)
        w = tl.where(heads < SUMMED, w, 0.0)
    w = tl.where(bad, float("nan"), w)
    scale = w / s  # weight over each head's softmax denominator

    # Pass 2: the weighted sum of the heads' softmax rows.
    out_row = out_ptr + b * stride_out_batch
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (live & (w != 0.0))[:, None] & (cols < C)[None, :]  # heads of weight 0 are not read
        z = tl.load(row + cols[None, :] * stride_class, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.where(mask, tl.exp(z - tl.where(m == float("-inf"), 0.0, m)[:, None]), 0.0)
        y = tl.sum(tl.where(mask, scale[:, None] * p, 0.0), axis=0)
        y = tl.where(bad, float("nan"), y)
        tl.store(out_row + cols * stride_out_class, y.to(out_ptr.dtype.element_ty), mask=cols < C)


@torch.library.custom_op("twinops::drm_ensemble", mutates_args=())
def _drm_ensemble(logits: torch.Tensor, gamma: float, include_shared_head_in_sum: bool) -> torch.Tensor:
    heads, batch, c = logits.shape
    out = torch.empty((batch, c), device=logits.device, dtype=logits.dtype)
    if batch > 0:
        launch = rt.row_launch(c, LAUNCH)
        if rt.interpreting():
            launch["BLOCK_C"] = 16
        _drm_ensemble_kernel[(batch,)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), out, out.stride(0), out.stride(1),
            heads, c, gamma, SUMMED=heads if include_shared_head_in_sum else heads - 1, SELECT=gamma < 0,
            HEADS=max(2, triton.next_power_of_2(heads)), **launch,
        )
    return out


@_drm_ensemble.register_fake
def _(logits, gamma, include_shared_head_in_sum):
    return logits.new_empty((logits.shape[1], logits.shape[2]))


def drm_ensemble(logits, *, gamma=1.0, include_shared_head_in_sum=False):
    """DRM's entropy-weighted (``gamma >= 0``) or lowest-entropy (``gamma < 0``) combination of
    the heads' softmax predictions, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.drm_ensemble`: ``logits``
    is (D+1, B, C) with the shared head last; returns (B, C) in the logits' dtype. Forward only
    (the combination is a pseudo-label source, not trained through); the result never requires grad.
    """
    rt.check_float_tensor(logits, "logits", 3, "(D+1, B, C)")
    if logits.shape[0] < 2:
        raise ValueError(f"logits must stack at least 2 heads (D >= 1 domain heads and the shared head), "
                         f"got shape {tuple(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError(f"logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
    gamma = check_real(gamma, "gamma")
    include = check_bool(include_shared_head_in_sum, "include_shared_head_in_sum")
    rt.check_device(("logits", logits))
    return _drm_ensemble(logits.detach(), gamma, include)


class DRMEnsemble(torch.nn.Module):
    """``nn.Module`` form of `drm_ensemble`: ``forward(logits)`` with logits (D+1, B, C)."""

    def __init__(self, *, gamma=1.0, include_shared_head_in_sum=False):
        super().__init__()
        self.gamma, self.include_shared_head_in_sum = gamma, include_shared_head_in_sum

    def forward(self, logits):
        return drm_ensemble(logits, gamma=self.gamma, include_shared_head_in_sum=self.include_shared_head_in_sum)
