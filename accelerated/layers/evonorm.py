"""EvoNorm-S0 and EvoNorm-B0 (P51) as bandwidth-bound Triton kernels. See
`twinops.reference.layers.evonorm` for the definition.

Every kernel works on a 2-D tile of ``BLOCK_C`` channels x ``BLOCK_HW`` spatial positions of one
sample, addressed through the input's own strides, so NCHW, channels_last (NHWC) and strided views
are read in place (no copies). When the H and W strides merge (``stride_h == W * stride_w``, true
for NCHW and NHWC) the spatial index is used directly; otherwise it is split into (h, w).

Statistics are fp32 and merged tile by tile (Chan's parallel update: each tile's own mean and sum
of squared deviations, then ``M2 += M2_t + delta^2 n n_t / (n + n_t)``), so a large mean does not
cancel the variance as E[x^2] - E[x]^2 would.

S0, one program per (sample n, group g), the group's C/G channels walked in BLOCK_C chunks:
    forward   sweep 1: group mean and variance; sweep 2: y = weight x sigmoid(v x) / s + bias.
              Saves (mean, 1 / s) per (n, g): 8 bytes.
    backward  sweep 1: sum over the group of u h (u = weight * grad, h = x sigmoid(v x)) and the
              per-(n, c) partial sums of dv, dweight, dbias; sweep 2 (only when x needs a gradient):
              dx = u h' / s - (x - mean) / (M s^3) sum u h.
    The parameter gradients are the (N, C) fp32 partials summed over N on the host.
B0, one program per (sample n, block of BLOCK_C channels):
    forward   kernel 1: instance mean and variance per (n, c) into (N, C) fp32 buffers; kernel 2, one
              program per channel block: the batch mean and variance by merging the N instance
              statistics (equal counts), a_c, and the new running variance (evaluation: a_c from
              ``running_var``); kernel 3: y = weight x / max(a_c, v x + s_nc) + bias.
    backward  kernel 1: per (n, c) sums of the branch-weighted d = -u x / m^2 and the parameter
              partials; the per-channel sum for a_c is a sum over N on the host; kernel 2: dx.
Byte model (the spec's): forward reads x and writes y; backward reads x and grad, writes dx. The
second sweep over a group or channel re-reads x (and grad); at the benchmark shape one (n, g) group
is 50 KB (bf16), small enough to be served from L2 between the sweeps while a few programs per SM
are in flight. Not yet measured on a GPU: the block sizes below are untuned.
Extra memory: O(N G) (S0) or O(N C) (B0) fp32 statistics and partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_int, check_real
from .. import _runtime as rt

__all__ = ["evonorm_s0", "evonorm_b0", "EvoNorm2dS0", "EvoNorm2dB0"]

HAS_TRITON_BACKWARD = True

# Elements of one (channels x positions) tile on the GPU; untuned pending a GPU sweep.
GPU_TILE = 4096
GPU_WARPS = 8
# Under the interpreter: 2 channels x 16 positions, so small test shapes cross both tile edges.
INTERPRETER_BLOCK_C = 2
INTERPRETER_BLOCK_HW = 16


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _blocks(channels: int, hw: int, channels_fast: bool, max_c: int) -> dict:
    """BLOCK_C (channels per tile), BLOCK_HW (positions per tile) and num_warps."""
    if rt.interpreting():
        return {"BLOCK_C": INTERPRETER_BLOCK_C, "BLOCK_HW": INTERPRETER_BLOCK_HW}
    block_c = min(_pow2(channels), max_c if channels_fast else min(max_c, 16))
    block_hw = max(16, min(_pow2(hw), GPU_TILE // block_c))
    return {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": GPU_WARPS if block_c * block_hw >= 2048 else 4}


def _strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_h, stride_w) of a 4-D tensor and whether H and W merge."""
    sn, sc, sh, sw = t.stride()
    w = t.shape[3]
    return (sn, sc, sh, sw), (sh == w * sw or t.shape[2] == 1)


@triton.jit
def _spatial(hw, W, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Offset of flat spatial index hw = h W + w."""
    if MERGED_HW:
        return hw * stride_w
    return (hw // W) * stride_h + (hw % W) * stride_w


@triton.jit
def _merge(count, mean, m2, x, keep, n_t):
    """Chan's update of (count, mean, m2), per row of the tile, with the tile's kept entries."""
    t_mean = tl.sum(tl.where(keep, x, 0.0), axis=1) / n_t
    dev = tl.where(keep, x - t_mean[:, None], 0.0)
    t_m2 = tl.sum(dev * dev, axis=1)
    total = count + n_t
    delta = t_mean - mean
    mean = mean + delta * (n_t / total)
    m2 = m2 + t_m2 + delta * delta * (count * n_t / total)
    return total, mean, m2


# ---------------------------------------------------------------------------------------- S0


@triton.jit
def _s0_forward_kernel(
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input; (n, c, h, w) at n*sxn + c*sxc + h*sxh + w*sxw
    v_ptr, sv, w_ptr, sw, b_ptr, sb,    # (C,) v, weight, bias (any float dtype, read as fp32)
    y_ptr, syn, syc, syh, syw,          # out (N, C, H, W) in x's dtype, strides like x's
    stats_ptr,                          # out (N * G, 2) fp32 contiguous: group mean, 1 / sqrt(var + eps)
    G, CPG, W, HW, eps,                 # groups, channels per group, width, H * W
    MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    c_first = (pid % G) * CPG
    x_base = x_ptr + n * sxn
    y_base = y_ptr + n * syn
    # Sweep 1: the group's mean and variance, of x - x0 with x0 the group's first entry (so a
    # constant group gives exactly x - mean = 0); each row of the tile keeps its own running moments.
    x0 = tl.load(x_base + c_first * sxc).to(tl.float32)
    count = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cj = c0 + tl.arange(0, BLOCK_C)
        c = c_first + cj.to(tl.int64)
        c_ok = cj < CPG
        for p0 in range(0, HW, BLOCK_HW):
            hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
            keep = c_ok[:, None] & (hw < HW)[None, :]
            x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                        mask=keep, other=0.0).to(tl.float32) - x0
            n_t = tl.minimum(HW - p0, BLOCK_HW) * 1.0
            new_count, new_mean, new_m2 = _merge(count, mean, m2, x, keep, n_t)
            count = tl.where(c_ok, new_count, count)  # rows past the group's last channel keep theirs
            mean = tl.where(c_ok, new_mean, mean)
            m2 = tl.where(c_ok, new_m2, m2)
    # Merge the rows (all rows that saw data hold the same count).
    total = tl.sum(count, axis=0)
    g_mean = tl.sum(mean * count, axis=0) / total
    dm = tl.where(count > 0, mean - g_mean, 0.0)
    var = (tl.sum(m2, axis=0) + tl.sum(count * dm * dm, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(stats_ptr + pid * 2, x0 + g_mean)
    tl.store(stats_ptr + pid * 2 + 1, rstd)
    # Sweep 2: y = weight * x * sigmoid(v x) / s + bias.
    for c0 in range(0, CPG, BLOCK_C):
        cj = c0 + tl.arange(0, BLOCK_C)
        c = c_first + cj.to(tl.int64)
        c_ok = cj < CPG
        v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        wt = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)[:, None] * rstd
        bs = tl.load(b_ptr + c * sb, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        for p0 in range(0, HW, BLOCK_HW):
            hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
            keep = c_ok[:, None] & (hw < HW)[None, :]
            x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                        mask=keep, other=0.0).to(tl.float32)
            y = wt * x / (1.0 + tl.exp(-v * x)) + bs
            tl.store(y_base + c[:, None] * syc + _spatial(hw, W, syh, syw, MERGED_HW)[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _s0_backward_kernel(
    g_ptr, sgn, sgc, sgh, sgw,          # (N, C, H, W) upstream gradient
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input, as in the forward
    v_ptr, sv, w_ptr, sw,               # (C,) v, weight
    stats_ptr,                          # (N * G, 2) fp32 from the forward: group mean, 1 / s
    dx_ptr, sdn, sdc, sdh, sdw,         # out (N, C, H, W) in x's dtype (written when COMPUTE_DX)
    part_ptr,                           # out (3, N, C) fp32 contiguous: per-(n, c) sums for dv, dweight, dbias
    N, C, G, CPG, W, HW,
    COMPUTE_DX: tl.constexpr, MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    c_first = (pid % G) * CPG
    g_base = g_ptr + n * sgn
    x_base = x_ptr + n * sxn
    mean = tl.load(stats_ptr + pid * 2)
    rstd = tl.load(stats_ptr + pid * 2 + 1)
    NC = N * C
    # Sweep 1: sum over the group of u h, and the per-channel parameter sums.
    uh = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cj = c0 + tl.arange(0, BLOCK_C)
        c = c_first + cj.to(tl.int64)
        c_ok = cj < CPG
        v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        w_vec = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)
        wt = w_vec[:, None]
        dv = tl.zeros((BLOCK_C,), tl.float32)
        dw = tl.zeros((BLOCK_C,), tl.float32)
        db = tl.zeros((BLOCK_C,), tl.float32)
        for p0 in range(0, HW, BLOCK_HW):
            hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
            keep = c_ok[:, None] & (hw < HW)[None, :]
            x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                        mask=keep, other=0.0).to(tl.float32)
            g = tl.load(g_base + c[:, None] * sgc + _spatial(hw, W, sgh, sgw, MERGED_HW)[None, :],
                        mask=keep, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-v * x))
            h = x * sig
            gh = g * h
            uh += tl.sum(wt * gh, axis=1)
            dw += tl.sum(gh, axis=1)
            db += tl.sum(g, axis=1)
            dv += tl.sum(g * x * x * sig * (1.0 - sig), axis=1)
        part = part_ptr + n * C + c
        tl.store(part, dv * w_vec * rstd, mask=c_ok)
        tl.store(part + NC, dw * rstd, mask=c_ok)
        tl.store(part + 2 * NC, db, mask=c_ok)
    if COMPUTE_DX:
        # Sweep 2: dx = u h' / s - (x - mean) / (M s^3) * sum(u h).
        coef = tl.sum(uh, axis=0) * rstd * rstd * rstd / (CPG * HW * 1.0)
        d_base = dx_ptr + n * sdn
        for c0 in range(0, CPG, BLOCK_C):
            cj = c0 + tl.arange(0, BLOCK_C)
            c = c_first + cj.to(tl.int64)
            c_ok = cj < CPG
            v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            wt = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            for p0 in range(0, HW, BLOCK_HW):
                hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
                keep = c_ok[:, None] & (hw < HW)[None, :]
                x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                            mask=keep, other=0.0).to(tl.float32)
                g = tl.load(g_base + c[:, None] * sgc + _spatial(hw, W, sgh, sgw, MERGED_HW)[None, :],
                            mask=keep, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-v * x))
                dh = sig + v * x * sig * (1.0 - sig)
                dx = wt * g * dh * rstd - (x - mean) * coef
                tl.store(d_base + c[:, None] * sdc + _spatial(hw, W, sdh, sdw, MERGED_HW)[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=keep)


# ---------------------------------------------------------------------------------------- B0


@triton.jit
def _b0_instance_kernel(
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input
    mean_ptr, var_ptr,                  # out (N, C) fp32 contiguous: instance mean and biased variance
    C, W, HW,
    MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    x_base = x_ptr + n * sxn
    x0 = tl.load(x_base + c * sxc, mask=c_ok, other=0.0).to(tl.float32)[:, None]  # shift: see the S0 kernel
    count = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, HW, BLOCK_HW):
        hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
        keep = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32) - x0
        n_t = tl.minimum(HW - p0, BLOCK_HW) * 1.0
        count, mean, m2 = _merge(count, mean, m2, x, keep, n_t)
    tl.store(mean_ptr + n * C + c, tl.reshape(x0, (BLOCK_C,)) + mean, mask=c_ok)
    tl.store(var_ptr + n * C + c, m2 / count, mask=c_ok)


@triton.jit
def _b0_batch_kernel(
    mean_ptr, var_ptr,                  # (N, C) fp32 instance statistics (read when TRAINING)
    rv_ptr, srv,                        # (C,) running variance (read when HAS_RUNNING)
    new_rv_ptr,                         # out (C,) new running variance, running_var's dtype (when HAS_RUNNING)
    bmean_ptr, bstd_ptr,                # out (C,) fp32: batch mean (0 in evaluation) and a_c
    N, C, momentum, eps,
    TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    c_ok = c < C
    if HAS_RUNNING:
        rv = tl.load(rv_ptr + c * srv, mask=c_ok, other=1.0).to(tl.float32)
        rv_ok = (rv >= 0.0) & (rv < float("inf"))  # NaN fails both
    if TRAINING:
        # Equal counts per instance: batch mean = mean of the means; batch variance = mean of the
        # variances + variance of the means (both biased).
        m0 = tl.load(mean_ptr + c, mask=c_ok, other=0.0)  # shift by the first instance's mean
        total = tl.zeros((BLOCK,), tl.float32)
        for n in range(0, N):
            total += tl.load(mean_ptr + n * C + c, mask=c_ok, other=0.0) - m0
        b_mean = m0 + total / N
        acc = tl.zeros((BLOCK,), tl.float32)
        for n in range(0, N):
            m = tl.load(mean_ptr + n * C + c, mask=c_ok, other=0.0)
            v = tl.load(var_ptr + n * C + c, mask=c_ok, other=0.0)
            acc += v + (m - b_mean) * (m - b_mean)
        b_var = acc / N
        tl.store(bmean_ptr + c, b_mean, mask=c_ok)
        tl.store(bstd_ptr + c, tl.sqrt(b_var + eps), mask=c_ok)
        if HAS_RUNNING:
            new_rv = tl.where(rv_ok, (1.0 - momentum) * rv + momentum * b_var, float("nan"))
            tl.store(new_rv_ptr + c, new_rv.to(new_rv_ptr.dtype.element_ty), mask=c_ok)
    else:
        tl.store(bmean_ptr + c, tl.zeros((BLOCK,), tl.float32), mask=c_ok)
        tl.store(bstd_ptr + c, tl.where(rv_ok, tl.sqrt(rv + eps), float("nan")), mask=c_ok)
        tl.store(new_rv_ptr + c, tl.where(rv_ok, rv, float("nan")).to(new_rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _b0_den(x, v, s, a):
    """max(a, v x + s) with NaN propagated from either side, and the weight of the b = v x + s
    branch (1, 1/2 at a tie, 0)."""
    b = v * x + s
    den = tl.where((b > a) | (b != b), b, a)
    wb = tl.where(b > a, 1.0, tl.where(b == a, 0.5, 0.0))
    return den, wb


@triton.jit
def _b0_forward_kernel(
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input
    v_ptr, sv, w_ptr, sw, b_ptr, sb,    # (C,) v, weight, bias
    mean_ptr, var_ptr,                  # (N, C) fp32 instance mean and variance
    bstd_ptr,                           # (C,) fp32 a_c
    y_ptr, syn, syc, syh, syw,          # out (N, C, H, W) in x's dtype
    C, W, HW, eps,
    MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    x_base = x_ptr + n * sxn
    y_base = y_ptr + n * syn
    v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    wt = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    bs = tl.load(b_ptr + c * sb, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    s = tl.sqrt(tl.load(var_ptr + n * C + c, mask=c_ok, other=0.0) + eps)[:, None]
    a = tl.load(bstd_ptr + c, mask=c_ok, other=1.0)[:, None]
    for p0 in range(0, HW, BLOCK_HW):
        hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
        keep = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        den, _ = _b0_den(x, v, s, a)
        y = wt * x / den + bs
        tl.store(y_base + c[:, None] * syc + _spatial(hw, W, syh, syw, MERGED_HW)[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _b0_backward_sums_kernel(
    g_ptr, sgn, sgc, sgh, sgw,          # (N, C, H, W) upstream gradient
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input
    v_ptr, sv, w_ptr, sw,               # (C,) v, weight
    var_ptr, bstd_ptr,                  # (N, C) fp32 instance variance; (C,) fp32 a_c
    part_ptr,                           # out (5, N, C) fp32 contiguous: per (n, c) sums of wb d, (1 - wb) d,
                                        # wb d x (dv), g x / m (dweight), g (dbias)
    N, C, W, HW, eps,
    MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    g_base = g_ptr + n * sgn
    x_base = x_ptr + n * sxn
    v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    wt = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    s = tl.sqrt(tl.load(var_ptr + n * C + c, mask=c_ok, other=0.0) + eps)[:, None]
    a = tl.load(bstd_ptr + c, mask=c_ok, other=1.0)[:, None]
    sum_b = tl.zeros((BLOCK_C,), tl.float32)
    sum_a = tl.zeros((BLOCK_C,), tl.float32)
    dv = tl.zeros((BLOCK_C,), tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, HW, BLOCK_HW):
        hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
        keep = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        g = tl.load(g_base + c[:, None] * sgc + _spatial(hw, W, sgh, sgw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        den, wb = _b0_den(x, v, s, a)
        gx = g * x / den
        d = -wt * gx / den                  # d L / d den
        sum_b += tl.sum(wb * d, axis=1)
        sum_a += tl.sum((1.0 - wb) * d, axis=1)
        dv += tl.sum(wb * d * x, axis=1)
        dw += tl.sum(gx, axis=1)
        db += tl.sum(g, axis=1)
    NC = N * C
    part = part_ptr + n * C + c
    tl.store(part, sum_b, mask=c_ok)
    tl.store(part + NC, sum_a, mask=c_ok)
    tl.store(part + 2 * NC, dv, mask=c_ok)
    tl.store(part + 3 * NC, dw, mask=c_ok)
    tl.store(part + 4 * NC, db, mask=c_ok)


@triton.jit
def _b0_backward_dx_kernel(
    g_ptr, sgn, sgc, sgh, sgw,          # (N, C, H, W) upstream gradient
    x_ptr, sxn, sxc, sxh, sxw,          # (N, C, H, W) input
    v_ptr, sv, w_ptr, sw,               # (C,) v, weight
    mean_ptr, var_ptr,                  # (N, C) fp32 instance mean and variance
    bmean_ptr, bstd_ptr,                # (C,) fp32 batch mean and a_c
    part_ptr,                           # (5, N, C) fp32 from _b0_backward_sums_kernel (row 0: sum of wb d)
    suma_ptr,                           # (C,) fp32: sum over the batch of (1 - wb) d (read when TRAINING)
    dx_ptr, sdn, sdc, sdh, sdw,         # out (N, C, H, W) in x's dtype
    N, C, W, HW, eps,
    TRAINING: tl.constexpr, MERGED_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    g_base = g_ptr + n * sgn
    x_base = x_ptr + n * sxn
    d_base = dx_ptr + n * sdn
    v = tl.load(v_ptr + c * sv, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    wt = tl.load(w_ptr + c * sw, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    mu = tl.load(mean_ptr + n * C + c, mask=c_ok, other=0.0)[:, None]
    s = tl.sqrt(tl.load(var_ptr + n * C + c, mask=c_ok, other=0.0) + eps)[:, None]
    a = tl.load(bstd_ptr + c, mask=c_ok, other=1.0)[:, None]
    # d/dx of s_nc and a_c: (x - mean) / (count * std), times the summed d of the branch.
    coef_s = tl.load(part_ptr + n * C + c, mask=c_ok, other=0.0)[:, None] / (s * HW)
    if TRAINING:
        b_mu = tl.load(bmean_ptr + c, mask=c_ok, other=0.0)[:, None]
        coef_a = tl.load(suma_ptr + c, mask=c_ok, other=0.0)[:, None] / (a * (N * HW * 1.0))
    for p0 in range(0, HW, BLOCK_HW):
        hw = p0 + tl.arange(0, BLOCK_HW).to(tl.int64)
        keep = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(x_base + c[:, None] * sxc + _spatial(hw, W, sxh, sxw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        g = tl.load(g_base + c[:, None] * sgc + _spatial(hw, W, sgh, sgw, MERGED_HW)[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        den, wb = _b0_den(x, v, s, a)
        u = wt * g
        d = -u * x / (den * den)
        dx = u / den + v * wb * d + (x - mu) * coef_s
        if TRAINING:
            dx += (x - b_mu) * coef_a
        tl.store(d_base + c[:, None] * sdc + _spatial(hw, W, sdh, sdw, MERGED_HW)[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=keep)


# ------------------------------------------------------------------------------------- host side


def _check_inputs(x, v, weight, bias):
    rt.check_float_tensor(x, "x", 4, "(N, C, H, W)")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, p in (("v", v), ("weight", weight), ("bias", bias)):
        _check_param(p, name, c)
    rt.check_device(("x", x), ("v", v), ("weight", weight), ("bias", bias))


def _check_param(p, name: str, c: int):
    rt.check_tensor(p, name)
    if p.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {p.dtype}")
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), one entry per channel of x, got {tuple(p.shape)}")


def _x_args(t):
    return (t, *t.stride())


@torch.library.custom_op("twinops::evonorm_s0", mutates_args=())
def _s0_forward(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    cpg = c // groups
    y = torch.empty_like(x)
    stats = torch.empty((n * groups, 2), device=x.device, dtype=torch.float32)
    (_, merged), (_, merged_y) = _strides(x), _strides(y)
    channels_fast = x.stride(1) <= x.stride(3)
    _s0_forward_kernel[(n * groups,)](
        *_x_args(x), v, v.stride(0), weight, weight.stride(0), bias, bias.stride(0),
        *_x_args(y), stats, groups, cpg, w, h * w, eps,
        MERGED_HW=merged and merged_y, **_blocks(cpg, h * w, channels_fast, 64),
    )
    return y, stats


@_s0_forward.register_fake
def _(x, v, weight, bias, groups, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0] * groups, 2), dtype=torch.float32)


@torch.library.custom_op("twinops::evonorm_s0_backward", mutates_args=())
def _s0_backward(grad: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor,
                 groups: int, need_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (empty unless ``need_x``) and the (3, C) fp32 sums for dv, dweight, dbias."""
    n, c, h, w = x.shape
    cpg = c // groups
    dx = torch.empty_like(x) if need_x else x.new_empty((1, 1, 1, 1))
    part = torch.empty((3, n, c), device=x.device, dtype=torch.float32)
    merged = _strides(x)[1] and _strides(grad)[1] and (_strides(dx)[1] or not need_x)
    channels_fast = x.stride(1) <= x.stride(3)
    _s0_backward_kernel[(n * groups,)](
        *_x_args(grad), *_x_args(x), v, v.stride(0), weight, weight.stride(0), stats, *_x_args(dx), part,
        n, c, groups, cpg, w, h * w,
        COMPUTE_DX=need_x, MERGED_HW=merged, **_blocks(cpg, h * w, channels_fast, 64),
    )
    return dx if need_x else x.new_empty((0,)), part.sum(dim=1)


@_s0_backward.register_fake
def _(grad, x, v, weight, stats, groups, need_x):
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    return dx, x.new_empty((3, x.shape[1]), dtype=torch.float32)


def _s0_setup_context(ctx, inputs, output):
    x, v, weight, bias, groups, eps = inputs
    ctx.save_for_backward(x, v, weight, output[1])
    ctx.groups = groups
    ctx.param_dtypes = (v.dtype, weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(output[1])


def _s0_backward_autograd(ctx, grad_y, grad_stats):
    x, v, weight, stats = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    dx, sums = _s0_backward(grad_y, x, v, weight, stats, ctx.groups, need_x)
    grads = [dx if need_x else None]
    for i, dtype in enumerate(ctx.param_dtypes):
        grads.append(sums[i].to(dtype) if ctx.needs_input_grad[1 + i] else None)
    return (*grads, None, None)


_s0_forward.register_autograd(_s0_backward_autograd, setup_context=_s0_setup_context)


def evonorm_s0(x, v, weight, bias, *, groups=32, eps=1e-5):
    """EvoNorm-S0 of P51 on the GPU: ``weight * x * sigmoid(v x) / group_std(x) + bias``.

    Same arguments and semantics as `twinops.reference.layers.evonorm.evonorm_s0`. ``x`` is
    (N, C, H, W) in any layout (NCHW, channels_last, strided views: read in place); ``v``,
    ``weight``, ``bias`` are (C,) (any float dtype). Returns x's dtype, in x's memory format.
    """
    _check_inputs(x, v, weight, bias)
    groups = check_int(groups, "groups")
    c = x.shape[1]
    if groups < 1 or c % groups:
        raise ValueError(f"groups must be >= 1 and divide the {c} channels of x, got groups={groups}")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    return _s0_forward(x, v, weight, bias, groups, eps)[0]


@torch.library.custom_op("twinops::evonorm_b0", mutates_args=())
def _b0_forward(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                running_var: torch.Tensor | None, training: bool, momentum: float, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y, the new running variance (empty without ``running_var``), and for the backward the
    (N, C) instance mean and variance and the (C,) batch mean and a_c."""
    n, c, h, w = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    inst_mean, inst_var = torch.empty((n, c), **f32), torch.empty((n, c), **f32)
    b_mean, b_std = torch.empty(c, **f32), torch.empty(c, **f32)
    has_running = running_var is not None
    new_rv = torch.empty(c if has_running else 0, device=x.device,
                         dtype=running_var.dtype if has_running else torch.float32)
    y = torch.empty_like(x)
    (_, merged), (_, merged_y) = _strides(x), _strides(y)
    blocks = _blocks(c, h * w, x.stride(1) <= x.stride(3), 32)
    grid = (n, triton.cdiv(c, blocks["BLOCK_C"]))
    _b0_instance_kernel[grid](*_x_args(x), inst_mean, inst_var, c, w, h * w, MERGED_HW=merged, **blocks)
    rv = running_var if has_running else b_std  # a placeholder pointer, never read
    block = 16 if rt.interpreting() else 256
    _b0_batch_kernel[(triton.cdiv(c, block),)](
        inst_mean, inst_var, rv, rv.stride(0), new_rv if has_running else b_std, b_mean, b_std,
        n, c, momentum, eps, TRAINING=training, HAS_RUNNING=has_running, BLOCK=block,
    )
    _b0_forward_kernel[grid](
        *_x_args(x), v, v.stride(0), weight, weight.stride(0), bias, bias.stride(0),
        inst_mean, inst_var, b_std, *_x_args(y), c, w, h * w, eps,
        MERGED_HW=merged and merged_y, **blocks,
    )
    return y, new_rv, inst_mean, inst_var, b_mean, b_std


@_b0_forward.register_fake
def _(x, v, weight, bias, running_var, training, momentum, eps):
    n, c = x.shape[:2]
    new_rv = running_var.new_empty(c) if running_var is not None else x.new_empty(0, dtype=torch.float32)
    stats = x.new_empty((n, c), dtype=torch.float32)
    return (torch.empty_like(x), new_rv, stats, torch.empty_like(stats),
            x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32))


@torch.library.custom_op("twinops::evonorm_b0_backward", mutates_args=())
def _b0_backward(grad: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                 inst_mean: torch.Tensor, inst_var: torch.Tensor, b_mean: torch.Tensor, b_std: torch.Tensor,
                 training: bool, eps: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (empty unless ``need_x``) and the (3, C) fp32 sums for dv, dweight, dbias."""
    n, c, h, w = x.shape
    part = torch.empty((5, n, c), device=x.device, dtype=torch.float32)
    blocks = _blocks(c, h * w, x.stride(1) <= x.stride(3), 32)
    grid = (n, triton.cdiv(c, blocks["BLOCK_C"]))
    merged = _strides(x)[1] and _strides(grad)[1]
    _b0_backward_sums_kernel[grid](
        *_x_args(grad), *_x_args(x), v, v.stride(0), weight, weight.stride(0), inst_var, b_std, part,
        n, c, w, h * w, eps, MERGED_HW=merged, **blocks,
    )
    sums = part[2:].sum(dim=1)
    if not need_x:
        return x.new_empty((0,)), sums
    sum_a = part[1].sum(dim=0) if training else b_std  # b_std: a placeholder, never read
    dx = torch.empty_like(x)
    _b0_backward_dx_kernel[grid](
        *_x_args(grad), *_x_args(x), v, v.stride(0), weight, weight.stride(0), inst_mean, inst_var,
        b_mean, b_std, part, sum_a, *_x_args(dx), n, c, w, h * w, eps,
        TRAINING=training, MERGED_HW=merged and _strides(dx)[1], **blocks,
    )
    return dx, sums


@_b0_backward.register_fake
def _(grad, x, v, weight, inst_mean, inst_var, b_mean, b_std, training, eps, need_x):
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    return dx, x.new_empty((3, x.shape[1]), dtype=torch.float32)


def _b0_setup_context(ctx, inputs, output):
    x, v, weight, bias, running_var, training, momentum, eps = inputs
    ctx.save_for_backward(x, v, weight, *output[2:])
    ctx.training, ctx.eps = training, eps
    ctx.param_dtypes = (v.dtype, weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(*output[1:])


def _b0_backward_autograd(ctx, grad_y, *unused):
    x, v, weight, inst_mean, inst_var, b_mean, b_std = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    dx, sums = _b0_backward(grad_y, x, v, weight, inst_mean, inst_var, b_mean, b_std, ctx.training, ctx.eps, need_x)
    grads = [dx if need_x else None]
    for i, dtype in enumerate(ctx.param_dtypes):
        grads.append(sums[i].to(dtype) if ctx.needs_input_grad[1 + i] else None)
    return (*grads, None, None, None, None)


_b0_forward.register_autograd(_b0_backward_autograd, setup_context=_b0_setup_context)


def evonorm_b0(x, v, weight, bias, running_var, *, training=True, momentum=0.1, eps=1e-5):
    """EvoNorm-B0 of P51 on the GPU; returns ``(y, new_running_var)``.

    Same arguments and semantics as `twinops.reference.layers.evonorm.evonorm_b0`. ``y`` has x's
    dtype and memory format; ``new_running_var`` (detached) has ``running_var``'s dtype, and is
    ``None`` when ``running_var`` is None (training only). ``running_var`` is only read: the caller
    stores the new value (the `EvoNorm2dB0` module does). Its values are checked on the device: a
    negative or non-finite entry gives NaN in the new running variance (and, in evaluation, in
    its channel of ``y``) instead of an error.
    """
    _check_inputs(x, v, weight, bias)
    training = check_bool(training, "training")
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    if running_var is None:
        if not training:
            raise ValueError("running_var is required in eval mode (training=False): it gives the batch std there")
    else:
        _check_param(running_var, "running_var", x.shape[1])
        rt.check_device(("x", x), ("running_var", running_var))
    out = _b0_forward(x, v, weight, bias, running_var, training, momentum, eps)
    return out[0], (out[1] if running_var is not None else None)


class EvoNorm2dS0(torch.nn.Module):
    """EvoNorm-S0 layer (`evonorm_s0`) with parameters ``v`` (init 1), ``weight`` (init 1) and
    ``bias`` (init 0), each of shape (num_features,)."""

    def __init__(self, num_features: int, *, groups: int = 32, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        num_features = check_int(num_features, "num_features")
        groups = check_int(groups, "groups")
        if num_features < 1 or groups < 1 or num_features % groups:
            raise ValueError(f"groups must be >= 1 and divide num_features={num_features}, got groups={groups}")
        self.num_features, self.groups, self.eps = num_features, groups, check_real(eps, "eps", low=0.0, low_open=True)
        kw = dict(device=device, dtype=dtype)
        self.v = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))

    def forward(self, x):
        return evonorm_s0(x, self.v, self.weight, self.bias, groups=self.groups, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"


class EvoNorm2dB0(torch.nn.Module):
    """EvoNorm-B0 layer (`evonorm_b0`) with parameters ``v`` (init 1), ``weight`` (init 1), ``bias``
    (init 0) and a ``running_var`` buffer (fp32, init 1, like BatchNorm), each of shape
    (num_features,). In training mode the buffer is replaced by the op's new running variance;
    in eval mode it is read (before any training step: 1)."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        num_features = check_int(num_features, "num_features")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        self.eps = check_real(eps, "eps", low=0.0, low_open=True)
        kw = dict(device=device, dtype=dtype)
        self.v = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x):
        y, new_rv = evonorm_b0(x, self.v, self.weight, self.bias, self.running_var, training=self.training,
                               momentum=self.momentum, eps=self.eps)
        if self.training:
            with torch.no_grad():
                self.running_var.copy_(new_rv)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"
