"""Mesa (P21) 8-bit group-wise quantisation as Triton kernels, shared by the memory-saving layers.
See `twinops.reference.layers.mesa` for the definition.

A tensor is viewed as (outer, D, inner) around the grouped axis (size D, cut into G chunks of
Dg = D / G). Group g holds outer * Dg * inner elements; element e of group g sits at

    o = e // (Dg * inner),  d = g * Dg + (e // inner) % Dg,  i = e % inner.

Every kernel runs on a (G, chunks) grid: program (g, c) handles elements [c * BLOCK, (c + 1) * BLOCK)
of group g, so the group's scale is a scalar per program. When the grouped axis is the last one
(inner == 1: GELU, LayerNorm, the default ``dim=-1``) a program holds whole rows of the group's Dg
columns instead (`tile`), which needs no integer division by runtime values. Three launches quantise:

1. `_minmax_kernel`: per-chunk min / max and a non-finite flag, (G, chunks) fp32 partials.
2. `_state_kernel`: one program per group folds the partials (any layout `group_offsets` describes:
   softmax writes one partial per row) and applies the running update
   (alpha <- (1 - m) alpha + m (max - min), beta <- (1 - m) beta + m min; first step: no history).
   A non-finite x or old state gives a NaN new state (the device cannot raise).
3. `_quantize_kernel`: q = clip(rint((x - beta) s + u - 1/2), 0, 255), s = 255 / max(|alpha|, 1e-8),
   optionally fused with an elementwise op whose output it also writes (GELU).

Extra memory: 3 * G * chunks fp32 partials. Codes are written contiguous in the (outer, D, inner) order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _runtime as rt

OP_NONE, OP_GELU = 0, 1  # the elementwise op fused into the quantise / dequantise passes


def block_size() -> int:
    """Elements per program: 32 under the interpreter (small shapes cross chunk borders), 2048 on the GPU."""
    return 32 if rt.interpreting() else 2048


@triton.jit
def group_offsets(e, g, Dg, inner, stride_o, stride_d, stride_i):
    """Memory offset (int64) of element ``e`` of group ``g`` for strides (stride_o, stride_d, stride_i)."""
    o = e // (Dg * inner)
    d = g * Dg + (e // inner) % Dg
    i = e % inner
    return o * stride_o + d * stride_d + i * stride_i


@triton.jit
def tile(c, g, Dg, inner, outer, n_group, LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Coordinates (o, d, i) and validity of the BLOCK elements of program (g, c).

    Grouped last axis (LAST, inner == 1): the program holds BLOCK // BLOCK_D whole rows of the group's
    Dg columns (padded to BLOCK_D, a power of two), so no division by a runtime value is needed.
    Otherwise: elements [c * BLOCK, (c + 1) * BLOCK) of the group in (o, d, i) order."""
    idx = tl.arange(0, BLOCK)
    if LAST:
        o = c * (BLOCK // BLOCK_D) + (idx // BLOCK_D).to(tl.int64)
        j = (idx % BLOCK_D).to(tl.int64)
        live = (o < outer) & (j < Dg)
        d = g * Dg + j
        i = tl.zeros((BLOCK,), tl.int64)
    else:
        e = c * BLOCK + idx.to(tl.int64)
        live = e < n_group
        o = e // (Dg * inner)
        d = g * Dg + (e // inner) % Dg
        i = e % inner
    return o, d, i, live


@triton.jit
def round_half_even(v):
    """rint for v >= 0 from core ops (the interpreter has no libdevice)."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def group_scale(range_ptr, min_ptr, g):
    """(s_g, beta_g) from the fp32 (G,) state."""
    alpha = tl.load(range_ptr + g)
    beta = tl.load(min_ptr + g)
    return 255.0 / tl.maximum(tl.abs(alpha), 1e-8), beta


@triton.jit
def gelu_prime(x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _minmax_kernel(
    x_ptr, stride_o, stride_d, stride_i,   # the (outer, D, inner) view of x
    part_ptr,                              # out (3, G, chunks) fp32: min, max, non-finite count
    Dg, inner, outer, n_group, chunks, G,
    LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    o, d, i, live = tile(c, g, Dg, inner, outer, n_group, LAST, BLOCK, BLOCK_D)
    x = tl.load(x_ptr + o * stride_o + d * stride_d + i * stride_i, mask=live, other=0.0)
    x = x.to(tl.float32)
    bad = tl.sum(tl.where(live & ((x - x) != 0.0), 1.0, 0.0), axis=0)  # x - x is NaN for NaN and +-inf
    lo = tl.min(tl.where(live, x, float("inf")), axis=0)
    hi = tl.max(tl.where(live, x, float("-inf")), axis=0)
    slot = g * chunks + c
    tl.store(part_ptr + slot, lo)
    tl.store(part_ptr + G * chunks + slot, hi)
    tl.store(part_ptr + 2 * G * chunks + slot, bad)


@triton.jit
def _state_kernel(
    part_ptr, plane,               # partials: min at part_ptr, max at + plane, non-finite count at + 2 * plane
    p_stride_o, p_stride_d, p_stride_i, Dg, inner, n_group,  # where partial e of group g sits (group_offsets)
    old_range_ptr, old_min_ptr,    # (G,) running state, any float dtype, contiguous
    new_range_ptr, new_min_ptr,    # out (G,) fp32
    momentum,
    FIRST: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    bad = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_group, BLOCK):
        e = start + tl.arange(0, BLOCK).to(tl.int64)
        live = e < n_group
        slot = group_offsets(e, g, Dg, inner, p_stride_o, p_stride_d, p_stride_i)
        lo = tl.minimum(lo, tl.load(part_ptr + slot, mask=live, other=float("inf")))
        hi = tl.maximum(hi, tl.load(part_ptr + plane + slot, mask=live, other=float("-inf")))
        bad += tl.load(part_ptr + 2 * plane + slot, mask=live, other=0.0)
    lo_g = tl.min(lo, axis=0)
    span = tl.max(hi, axis=0) - lo_g
    n_bad = tl.sum(bad, axis=0)
    if FIRST:
        new_range = span
        new_min = lo_g
    else:
        old_range = tl.load(old_range_ptr + g).to(tl.float32)
        old_min = tl.load(old_min_ptr + g).to(tl.float32)
        n_bad += tl.where(((old_range - old_range) != 0.0) | ((old_min - old_min) != 0.0), 1.0, 0.0)
        new_range = (1.0 - momentum) * old_range + momentum * span
        new_min = (1.0 - momentum) * old_min + momentum * lo_g
    tl.store(new_range_ptr + g, tl.where(n_bad > 0.0, float("nan"), new_range))
    tl.store(new_min_ptr + g, tl.where(n_bad > 0.0, float("nan"), new_min))


@triton.jit
def _quantize_kernel(
    x_ptr, stride_o, stride_d, stride_i,      # the (outer, D, inner) view of x
    u_ptr, u_stride_o, u_stride_d, u_stride_i,  # rounding noise in [0, 1), read when HAS_NOISE
    range_ptr, min_ptr,                       # (G,) fp32 state used for this step
    q_ptr,                                    # out uint8 codes, contiguous (outer, D, inner)
    y_ptr,                                    # out op(x), contiguous (outer, D, inner), written when OP != 0
    Dg, inner, D, outer, n_group,
    HAS_NOISE: tl.constexpr, OP: tl.constexpr, WRITE_Q: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    o, d, i, live = tile(c, g, Dg, inner, outer, n_group, LAST, BLOCK, BLOCK_D)
    x = tl.load(x_ptr + o * stride_o + d * stride_d + i * stride_i, mask=live, other=0.0)
    x = x.to(tl.float32)
    out = (o * D + d) * inner + i
    if WRITE_Q:
        s, beta = group_scale(range_ptr, min_ptr, g)
        if HAS_NOISE:
            u = tl.load(u_ptr + o * u_stride_o + d * u_stride_d + i * u_stride_i, mask=live,
                        other=0.5).to(tl.float32)
        else:
            u = 0.5
        v = tl.minimum(tl.maximum((x - beta) * s + (u - 0.5), 0.0), 255.0)
        tl.store(q_ptr + out, round_half_even(v).to(tl.uint8), mask=live)
    if OP == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _dequantize_kernel(
    q_ptr,                                    # uint8 codes, contiguous (outer, D, inner)
    range_ptr, min_ptr,                       # (G,) fp32 state the codes were made with
    g_ptr, g_stride_o, g_stride_d, g_stride_i,  # upstream gradient (OP == 1)
    out_ptr,                                  # out, contiguous (outer, D, inner): x_hat (OP 0) or dx (OP 1)
    Dg, inner, D, outer, n_group,
    OP: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    o, d, i, live = tile(c, g, Dg, inner, outer, n_group, LAST, BLOCK, BLOCK_D)
    out = (o * D + d) * inner + i
    s, beta = group_scale(range_ptr, min_ptr, g)
    x_hat = tl.load(q_ptr + out, mask=live, other=0).to(tl.float32) / s + beta
    if OP == 1:
        gy = tl.load(g_ptr + o * g_stride_o + d * g_stride_d + i * g_stride_i, mask=live,
                     other=0.0).to(tl.float32)
        x_hat = gy * gelu_prime(x_hat)
    tl.store(out_ptr + out, x_hat.to(out_ptr.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------------------- host


def view3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as (outer, D, inner) around axis ``dim``: a view when the strides allow, else a copy."""
    outer = 1
    for n in x.shape[:dim]:
        outer *= n
    inner = 1
    for n in x.shape[dim + 1:]:
        inner *= n
    return x.reshape(outer, x.shape[dim], inner)


def tiling(outer: int, dg: int, inner: int) -> tuple[dict, int]:
    """Launch constants of the (G, chunks) kernels and the number of chunks per group."""
    block = block_size()
    if inner == 1:
        block_d = triton.next_power_of_2(dg)
        block = max(block, block_d)
        return dict(LAST=True, BLOCK=block, BLOCK_D=block_d), triton.cdiv(outer, block // block_d)
    return dict(LAST=False, BLOCK=block, BLOCK_D=1), triton.cdiv(outer * dg * inner, block)


def update_state(x3: torch.Tensor, running_range, running_min, groups: int, momentum: float, training: bool,
                 first_step: bool):
    """The running (range, min) after this step, fp32 (G,), computed on the device."""
    if not training:
        return running_range.float().clone(), running_min.float().clone()
    outer, d, inner = x3.shape
    dg = d // groups
    n_group = outer * dg * inner
    cfg, chunks = tiling(outer, dg, inner)
    part = torch.empty((3, groups, chunks), device=x3.device, dtype=torch.float32)
    _minmax_kernel[(groups, chunks)](x3, x3.stride(0), x3.stride(1), x3.stride(2), part, dg, inner, outer, n_group,
                                     chunks, groups, **cfg)
    # partial c of group g sits at g * chunks + c: the (1, G, chunks) layout in group_offsets' terms
    return fold_state(part, groups * chunks, (0, chunks, 1), 1, chunks, chunks, running_range, running_min,
                      groups, momentum, first_step)


def fold_state(part, plane: int, strides, dg: int, inner: int, n_group: int, running_range, running_min,
               groups: int, momentum: float, first_step: bool):
    """Run `_state_kernel` over partial (min, max, non-finite) triples; returns the fp32 (G,) new state."""
    new_range = torch.empty(groups, device=part.device, dtype=torch.float32)
    new_min = torch.empty_like(new_range)
    _state_kernel[(groups,)](part, plane, strides[0], strides[1], strides[2], dg, inner, n_group,
                             running_range.contiguous(), running_min.contiguous(), new_range, new_min,
                             float(momentum), FIRST=bool(first_step), BLOCK=32 if rt.interpreting() else 1024)
    return new_range, new_min


def quantize(x3: torch.Tensor, new_range, new_min, noise3, groups: int, *, op: int = OP_NONE,
             write_q: bool = True, y_dtype=None):
    """uint8 codes (outer, D, inner) of ``x3`` (empty when not ``write_q``) and, for ``op``, op(x3)."""
    outer, d, inner = x3.shape
    dg = d // groups
    n_group = outer * dg * inner
    cfg, chunks = tiling(outer, dg, inner)
    q = torch.empty(x3.shape if write_q else (0,), device=x3.device, dtype=torch.uint8)
    y = torch.empty(x3.shape if op else (0,), device=x3.device, dtype=y_dtype or x3.dtype)
    if not write_q and not op:
        return q, y
    u = noise3 if noise3 is not None else x3
    _quantize_kernel[(groups, chunks)](
        x3, x3.stride(0), x3.stride(1), x3.stride(2), u, u.stride(0), u.stride(1), u.stride(2),
        new_range, new_min, q, y, dg, inner, d, outer, n_group,
        HAS_NOISE=noise3 is not None, OP=op, WRITE_Q=write_q, **cfg,
    )
    return q, y


def dequantize(q3: torch.Tensor, state_range, state_min, groups: int, out_dtype, *, grad3=None):
    """x_hat (or, given ``grad3``, grad * GELU'(x_hat)) as a contiguous (outer, D, inner) tensor."""
    outer, d, inner = q3.shape
    dg = d // groups
    n_group = outer * dg * inner
    cfg, chunks = tiling(outer, dg, inner)
    out = torch.empty(q3.shape, device=q3.device, dtype=out_dtype)
    gg = grad3 if grad3 is not None else out
    _dequantize_kernel[(groups, chunks)](
        q3, state_range, state_min, gg, gg.stride(0), gg.stride(1), gg.stride(2), out, dg, inner, d, outer,
        n_group, OP=OP_NONE if grad3 is None else OP_GELU, **cfg,
    )
    return out


# ------------------------------------------------------------------------------- host checks


def check_layer_input(x, name: str = "x") -> torch.Tensor:
    rt.check_tensor(x, name)
    if x.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one element")
    return x


def check_groups(x: torch.Tensor, groups, axis: int, name: str = "x") -> int:
    from ...reference._checks import check_int

    groups = check_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if x.shape[axis] % groups:
        raise ValueError(f"groups ({groups}) must divide {name}.shape[{axis}] = {x.shape[axis]}")
    return groups


def check_state(running_range, running_min, groups: int):
    for name, s in (("running_range", running_range), ("running_min", running_min)):
        rt.check_tensor(s, name)
        if not s.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
        if tuple(s.shape) != (groups,):
            raise ValueError(f"{name} must have shape ({groups},), one entry per group, got {tuple(s.shape)}")
    return running_range.detach(), running_min.detach()


def check_noise(noise, x: torch.Tensor):
    if noise is None:
        return None
    rt.check_tensor(noise, "noise")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.detach()


def check_step(momentum, training, first_step):
    from ...reference._checks import check_bool, check_real

    momentum = check_real(momentum, "momentum", low=0.0, high=1.0, low_open=True)
    training, first_step = check_bool(training, "training"), check_bool(first_step, "first_step")
    if first_step and not training:
        raise ValueError("first_step=True needs training=True: eval mode before any running statistic exists")
    return momentum, training, first_step
