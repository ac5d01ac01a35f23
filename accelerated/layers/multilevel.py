"""Multi-level training operators (P34) as Triton kernels: coalesce, de-coalesce and interpolate
parameters. See `twinops.reference.layers.multilevel` for the definitions.

    coalesce     W'[i, j] = (1 / |G_i|) sum_{a in G_i} sum_{c in H_j} W[a, c]    (gather, no atomics)
    decoalesce   W_l[a, c] = W_s[g(a), h(c)] / |H_{h(c)}|                        (gather)
    interpolate  theta = (1 - alpha) theta_M1 + alpha theta_deco                     (elementwise)

Each kernel reads its inputs once and writes its output once; they are bandwidth-bound one-shot
transforms run between training stages, never trained through, so there is no backward. The group
maps are turned on the device (no synchronisation) into member lists sorted by group: ``order``
(members of group i are ``order[offset[i] : offset[i] + count[i]]``), ``offset`` and ``count``.
An invalid map (an entry outside [0, t) or an empty group) cannot raise without a device
synchronisation: the result is all NaN instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from ...reference.layers.multilevel import _width  # the reference's checks on a width, shared
from .. import _runtime as rt

__all__ = ["coalesce", "decoalesce", "interpolate_params"]

HAS_TRITON_BACKWARD = False  # one-shot weight-space transforms: never trained through


@triton.jit
def _coalesce_kernel(
    w_ptr, stride_wr, stride_wc,                        # (S_OUT, S_IN) large weight, any strides
    row_order_ptr, row_offset_ptr, row_count_ptr,       # row groups: (S_OUT,) members sorted by group, (T_OUT,) offsets and sizes
    col_order_ptr, col_offset_ptr, col_count_ptr,       # column groups: (S_IN,), (T_IN,), (T_IN,)
    poison_ptr,                                         # (1,) fp32: 0, or NaN when a group map is invalid
    out_ptr, stride_or, stride_oc,                      # out (T_OUT, T_IN) in the weight's dtype
    T_OUT, T_IN,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_count = tl.load(row_count_ptr + i, mask=i < T_OUT, other=0)
    row_offset = tl.load(row_offset_ptr + i, mask=i < T_OUT, other=0)
    col_count = tl.load(col_count_ptr + j, mask=j < T_IN, other=0)
    col_offset = tl.load(col_offset_ptr + j, mask=j < T_IN, other=0)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r in range(0, tl.max(row_count, axis=0)):       # r-th member of each row group in the tile
        row_live = r < row_count
        a = tl.load(row_order_ptr + row_offset + r, mask=row_live, other=0).to(tl.int64)
        for q in range(0, tl.max(col_count, axis=0)):   # q-th member of each column group
            col_live = q < col_count
            c = tl.load(col_order_ptr + col_offset + q, mask=col_live, other=0).to(tl.int64)
            acc += tl.load(w_ptr + a[:, None] * stride_wr + c[None, :] * stride_wc,
                           mask=row_live[:, None] & col_live[None, :], other=0.0).to(tl.float32)
    out = acc / row_count[:, None].to(tl.float32) + tl.load(poison_ptr)  # rows averaged, columns summed
    tl.store(out_ptr + i[:, None] * stride_or + j[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
             mask=(i[:, None] < T_OUT) & (j[None, :] < T_IN))


@triton.jit
def _decoalesce_kernel(
    w_ptr, stride_wr, stride_wc,                        # (T_OUT, T_IN) small weight, any strides
    row_group_ptr, col_group_ptr,                       # (S_OUT,), (S_IN,) int64 group of each large channel
    col_count_ptr,                                      # (T_IN,) int32 column group sizes
    poison_ptr,                                         # (1,) fp32: 0, or NaN when a group map is invalid
    out_ptr, stride_or, stride_oc,                      # out (S_OUT, S_IN) in the weight's dtype
    S_OUT, S_IN,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    ga = tl.load(row_group_ptr + a, mask=a < S_OUT, other=0)
    gc = tl.load(col_group_ptr + c, mask=c < S_IN, other=0)
    size = tl.load(col_count_ptr + gc, mask=c < S_IN, other=1).to(tl.float32)
    mask = (a[:, None] < S_OUT) & (c[None, :] < S_IN)
    w = tl.load(w_ptr + ga[:, None] * stride_wr + gc[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
    out = w / size[None, :] + tl.load(poison_ptr)      # rows copied, columns split evenly
    tl.store(out_ptr + a[:, None] * stride_or + c[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolate_kernel(
    a_ptr, stride_ar, stride_ac,                        # (R, C) view of the original parameters
    b_ptr, stride_br, stride_bc,                        # (R, C) view of the de-coalesced parameters
    out_ptr,                                            # out (R, C) contiguous, in the inputs' dtype
    R, C, alpha,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < R) & (c[None, :] < C)
    a = tl.load(a_ptr + r[:, None] * stride_ar + c[None, :] * stride_ac, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + r[:, None] * stride_br + c[None, :] * stride_bc, mask=mask, other=0.0).to(tl.float32)
    out = (1.0 - alpha) * a + alpha * b
    tl.store(out_ptr + r[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ host side


def _blocks() -> tuple[int, int]:
    return (16, 16) if rt.interpreting() else (32, 64)


def _tables(groups: torch.Tensor, width: int):
    """(safe map int64, members sorted by group, offsets, sizes int32, invalid flag) on the device."""
    g = groups.to(torch.int64)
    valid = (g >= 0) & (g < width)
    safe = torch.where(valid, g, torch.zeros_like(g))
    count = torch.zeros(width, dtype=torch.int32, device=g.device).index_add_(
        0, safe, torch.ones_like(safe, dtype=torch.int32))
    order = torch.argsort(safe, stable=True)
    offset = torch.cumsum(count, 0, dtype=torch.int64) - count
    invalid = (~valid).any() | (count == 0).any()
    return safe, order, offset, count, invalid


def _poison(*flags: torch.Tensor) -> torch.Tensor:
    bad = flags[0]
    for f in flags[1:]:
        bad = bad | f
    return torch.where(bad, float("nan"), 0.0).to(torch.float32).reshape(1)


@torch.library.custom_op("twinops::coalesce", mutates_args=())
def _coalesce(weight: torch.Tensor, row_groups: torch.Tensor, col_groups: torch.Tensor,
              t_out: int, t_in: int) -> torch.Tensor:
    w = weight if weight.ndim == 2 else weight[:, None]
    out = torch.empty((t_out, t_in), device=weight.device, dtype=weight.dtype)
    _, row_order, row_offset, row_count, row_bad = _tables(row_groups, t_out)
    _, col_order, col_offset, col_count, col_bad = _tables(col_groups, t_in)
    if out.numel() > 0:
        bi, bj = _blocks()
        _coalesce_kernel[(triton.cdiv(t_out, bi), triton.cdiv(t_in, bj))](
            w, w.stride(0), w.stride(1), row_order, row_offset, row_count, col_order, col_offset, col_count,
            _poison(row_bad, col_bad), out, out.stride(0), out.stride(1), t_out, t_in, BLOCK_I=bi, BLOCK_J=bj,
        )
    return out if weight.ndim == 2 else out[:, 0]


@_coalesce.register_fake
def _(weight, row_groups, col_groups, t_out, t_in):
    return weight.new_empty((t_out, t_in) if weight.ndim == 2 else (t_out,))


@torch.library.custom_op("twinops::decoalesce", mutates_args=())
def _decoalesce(weight: torch.Tensor, row_groups: torch.Tensor, col_groups: torch.Tensor) -> torch.Tensor:
    w = weight if weight.ndim == 2 else weight[:, None]
    s_out, s_in = row_groups.shape[0], col_groups.shape[0]
    out = torch.empty((s_out, s_in), device=weight.device, dtype=weight.dtype)
    row_safe, _, _, _, row_bad = _tables(row_groups, w.shape[0])
    col_safe, _, _, col_count, col_bad = _tables(col_groups, w.shape[1])
    if out.numel() > 0:
        bi, bj = _blocks()
        _decoalesce_kernel[(triton.cdiv(s_out, bi), triton.cdiv(s_in, bj))](
            w, w.stride(0), w.stride(1), row_safe, col_safe, col_count, _poison(row_bad, col_bad),
            out, out.stride(0), out.stride(1), s_out, s_in, BLOCK_I=bi, BLOCK_J=bj,
        )
    return out if weight.ndim == 2 else out[:, 0]


@_decoalesce.register_fake
def _(weight, row_groups, col_groups):
    s_out, s_in = row_groups.shape[0], col_groups.shape[0]
    return weight.new_empty((s_out, s_in) if weight.ndim == 2 else (s_out,))


@torch.library.custom_op("twinops::interpolate_params", mutates_args=())
def _interpolate(original: torch.Tensor, decoalesced: torch.Tensor, alpha: float) -> torch.Tensor:
    out = torch.empty(original.shape, device=original.device, dtype=original.dtype)
    if out.numel() == 0:
        return out
    # An (R, C) view over the last axis: a view for contiguous and last-axis-strided inputs.
    cols = original.shape[-1] if original.ndim else 1
    a = original.reshape(-1, cols)
    b = decoalesced.reshape(-1, cols)
    br, bc = _blocks()
    _interpolate_kernel[(triton.cdiv(a.shape[0], br), triton.cdiv(cols, bc))](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), out, a.shape[0], cols, alpha,
        BLOCK_R=br, BLOCK_C=bc,
    )
    return out


@_interpolate.register_fake
def _(original, decoalesced, alpha):
    return original.new_empty(original.shape)


# ------------------------------------------------------------------------------------------ public API


def _check_weight(weight, name="weight") -> torch.Tensor:
    rt.check_tensor(weight, name)
    if weight.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (s_out, s_in) or (s_out,), got {weight.ndim} dimensions "
                         f"{tuple(weight.shape)}")
    return weight


def _group_map(groups, name: str, size: int | None, width: int, device) -> torch.Tensor:
    """A (size,) integer map (values checked on the device); None is the pairing g(i) = i mod t, s = 2t."""
    if groups is None:
        size = 2 * width if size is None else size
        if size != 2 * width:
            raise ValueError(f"{name}=None pairs channel i with i + t and needs s = 2t; got s={size}, t={width}")
        return torch.arange(size, device=device) % width
    rt.check_tensor(groups, name)
    if groups.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of group indices, got shape {tuple(groups.shape)}")
    return rt.check_int_tensor(groups, name, (groups.shape[0] if size is None else size,), "group indices")


def coalesce(weight, out_groups=None, in_groups=None, *, out_width=None, in_width=None):
    """Merge a large weight into a small one: rows averaged over ``out_groups``, columns summed over
    ``in_groups`` (P34). Same arguments and semantics as `twinops.reference.layers.multilevel.coalesce`;
    returns the weight's dtype and never requires grad. An invalid group map gives an all-NaN result."""
    _check_weight(weight)
    t_out = _width(out_width, "out_width", weight.shape[0])
    rows = _group_map(out_groups, "out_groups", weight.shape[0], t_out, weight.device)
    if weight.ndim == 1:
        if in_groups is not None or in_width is not None:
            raise ValueError("in_groups and in_width apply to 2-D weights only; weight is 1-D")
        cols, t_in = torch.zeros(1, dtype=torch.int64, device=weight.device), 1
    else:
        t_in = _width(in_width, "in_width", weight.shape[1])
        cols = _group_map(in_groups, "in_groups", weight.shape[1], t_in, weight.device)
    rt.check_device(("weight", weight), ("out_groups", rows), ("in_groups", cols))
    return _coalesce(weight.detach(), rows, cols, t_out, t_in)


def decoalesce(weight, out_groups=None, in_groups=None):
    """Grow a small weight into a large one: rows copied to every member of their group, columns split
    evenly (P34). Same arguments and semantics as `twinops.reference.layers.multilevel.decoalesce`;
    returns the weight's dtype and never requires grad. An invalid group map gives an all-NaN result."""
    _check_weight(weight)
    rows = _group_map(out_groups, "out_groups", None, weight.shape[0], weight.device)
    if weight.ndim == 1:
        if in_groups is not None:
            raise ValueError("in_groups applies to 2-D weights only; weight is 1-D")
        cols = torch.zeros(1, dtype=torch.int64, device=weight.device)
    else:
        cols = _group_map(in_groups, "in_groups", None, weight.shape[1], weight.device)
    rt.check_device(("weight", weight), ("out_groups", rows), ("in_groups", cols))
    return _decoalesce(weight.detach(), rows, cols)


def interpolate_params(original, decoalesced, *, alpha=0.5):
    """``(1 - alpha) * original + alpha * decoalesced`` (P34's V-cycle merge), in the inputs' dtype.
    Same arguments and semantics as `twinops.reference.layers.multilevel.interpolate_params`; never
    requires grad."""
    for name, t in (("original", original), ("decoalesced", decoalesced)):
        rt.check_tensor(t, name)
        if t.dtype not in rt.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if original.shape != decoalesced.shape:
        raise ValueError(f"decoalesced must have the shape of original {tuple(original.shape)}, "
                         f"got {tuple(decoalesced.shape)}")
    if original.dtype != decoalesced.dtype:
        raise TypeError(f"decoalesced must have the dtype of original ({original.dtype}), got {decoalesced.dtype}")
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    rt.check_device(("original", original), ("decoalesced", decoalesced))
    return _interpolate(original.detach(), decoalesced.detach(), alpha)
