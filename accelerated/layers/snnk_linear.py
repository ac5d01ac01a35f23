"""SNNK linear layer (P44) as Triton kernels: the random-feature map fused between two matmuls.
See `twinops.reference.layers.snnk_linear` for the definition.

Rows are x flattened to (N, d); G is the (m, d) projection, Psi the (o, m) weight.

Forward, one program per (BLOCK_N rows, BLOCK_O outputs), FlashAttention-style chaining:
    for each chunk of BLOCK_M features:
        S = x G_chunk^T           (tl.dot over d in BLOCK_K steps; ||x||^2 from the same x tiles)
        phi = relu or exp map of S (fp32 epilogue, kept in registers)
        acc += phi Psi_chunk^T    (tl.dot)
    y = acc + bias
    The (N, m) feature matrix is never written. With o > BLOCK_O the feature tiles are recomputed
    once per output tile (the first matmul costs ceil(o / BLOCK_O) times more).
Backward:
    1. one program per (BLOCK_N rows, BLOCK_M features): recompute S and phi, H = dY Psi_chunk
       (tl.dot over o); write phi and the coefficient V of the x gradient (relu: H [S > c] / sqrt(m);
       exp: U a with U = H phi) as (N, m) in the input dtype, and for exp the partial row sums
       sum_i U_i a_i^2 of the feature chunk (fp32, (N, ceil(m / BLOCK_M))).
    2. a tiled matmul kernel: dx = V G  (- r x for exp, in its epilogue) and dPsi = dY^T phi.
    d bias = column sums of dY. Extra memory: two (N, m) matrices, only in the backward.
Nothing runs for inputs that do not require grad (phi / V are skipped when unused).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from ...reference.layers.snnk_linear import FEATURES
from .. import _runtime as rt

__all__ = ["snnk_linear", "SNNKLinear"]

HAS_TRITON_BACKWARD = True

# Tile sizes; untuned guesses pending a GPU sweep. 16 under the interpreter so small shapes cross tiles.
GPU_BLOCKS = dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, BLOCK_O=128, num_warps=4, num_stages=2)
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=16, BLOCK_O=16)
GPU_MATMUL = dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=3)
INTERPRETER_MATMUL = dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16)
EXP, RELU = 1, 0


def _blocks() -> dict:
    return dict(INTERPRETER_BLOCKS) if rt.interpreting() else dict(GPU_BLOCKS)


def _matmul_blocks() -> dict:
    return dict(INTERPRETER_MATMUL) if rt.interpreting() else dict(GPU_MATMUL)


@triton.jit
def _preactivation(
    x_ptr, stride_xn, stride_xd, g_ptr, stride_gm, stride_gd, rows, feats, row_mask, feat_mask, D,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """S = x[rows] G[feats]^T (fp32, (BLOCK_N, BLOCK_M)) and ||x[rows]||^2 (fp32, (BLOCK_N,))."""
    s = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xd,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        gt = tl.load(g_ptr + feats[None, :] * stride_gm + ks[:, None] * stride_gd,  # G^T tile (BLOCK_K, BLOCK_M)
                     mask=k_mask[:, None] & feat_mask[None, :], other=0.0)
        s = tl.dot(xt, gt, s, input_precision=PRECISION)
        xf = xt.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    return s, sq


@triton.jit
def _feature_map(s, sq, rate, amp, floor, inv_sqrt_m, FEATURE: tl.constexpr):
    """phi from the pre-activations: relu max(S, c) / sqrt(m) (NaN kept) or A / sqrt(m) exp(a S - a^2 |x|^2 / 2)."""
    if FEATURE == 1:
        return amp[None, :] * inv_sqrt_m * tl.exp(rate[None, :] * s - rate[None, :] * rate[None, :] * sq[:, None] * 0.5)
    else:
        return tl.where(s < floor, floor, s) * inv_sqrt_m


@triton.jit
def _forward_kernel(
    x_ptr, stride_xn, stride_xd,    # (N, d) input rows
    g_ptr, stride_gm, stride_gd,    # (m, d) projection G
    w_ptr, stride_wo, stride_wm,    # (o, m) weight Psi
    b_ptr,                          # (o,) bias (contiguous; unused without HAS_BIAS)
    rate_ptr, amp_ptr,              # (m,) fp32 contiguous URF coefficients a and A (unused for relu)
    y_ptr, stride_yn, stride_yo,    # out (N, o) in the input dtype
    N, D, M, O, floor, inv_sqrt_m,
    FEATURE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    outs = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    row_mask, out_mask = rows < N, outs < O
    acc = tl.zeros((BLOCK_N, BLOCK_O), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        feats = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        feat_mask = feats < M
        s, sq = _preactivation(x_ptr, stride_xn, stride_xd, g_ptr, stride_gm, stride_gd, rows, feats,
                               row_mask, feat_mask, D, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        rate = tl.load(rate_ptr + feats, mask=feat_mask, other=0.0)
        amp = tl.load(amp_ptr + feats, mask=feat_mask, other=0.0)
        phi = _feature_map(s, sq, rate, amp, floor, inv_sqrt_m, FEATURE)
        phi = tl.where(feat_mask[None, :], phi, 0.0)
        wt = tl.load(w_ptr + outs[None, :] * stride_wo + feats[:, None] * stride_wm,  # Psi^T tile (BLOCK_M, BLOCK_O)
                     mask=feat_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(phi.to(wt.dtype), wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + outs[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _backward_features_kernel(
    x_ptr, stride_xn, stride_xd,    # (N, d) input rows
    g_ptr, stride_gm, stride_gd,    # (m, d) projection G
    w_ptr, stride_wo, stride_wm,    # (o, m) weight Psi
    dy_ptr, stride_dn, stride_do,   # (N, o) upstream gradient
    rate_ptr, amp_ptr,              # (m,) fp32 contiguous URF coefficients
    phi_ptr,                        # out (N, m) contiguous, input dtype: the features (when WANT_PHI)
    v_ptr,                          # out (N, m) contiguous, input dtype: coefficient of G in dx (when WANT_V)
    r_ptr,                          # out (N, M_TILES) fp32 contiguous: partial sum_i U_i a_i^2 (exp, WANT_V)
    N, D, M, O, M_TILES, floor, inv_sqrt_m,
    FEATURE: tl.constexpr, WANT_PHI: tl.constexpr, WANT_V: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_tile = tl.program_id(1).to(tl.int64)
    feats = m_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask, feat_mask = rows < N, feats < M
    s, sq = _preactivation(x_ptr, stride_xn, stride_xd, g_ptr, stride_gm, stride_gd, rows, feats,
                           row_mask, feat_mask, D, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
    rate = tl.load(rate_ptr + feats, mask=feat_mask, other=0.0)
    amp = tl.load(amp_ptr + feats, mask=feat_mask, other=0.0)
    phi = _feature_map(s, sq, rate, amp, floor, inv_sqrt_m, FEATURE)
    phi = tl.where(feat_mask[None, :], phi, 0.0)
    tile_mask = row_mask[:, None] & feat_mask[None, :]
    offs = rows[:, None] * M + feats[None, :]
    if WANT_PHI:
        tl.store(phi_ptr + offs, phi.to(phi_ptr.dtype.element_ty), mask=tile_mask)
    if WANT_V:
        h = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # H = dY Psi[:, feats]
        for o0 in range(0, O, BLOCK_O):
            os = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
            o_mask = os < O
            dy = tl.load(dy_ptr + rows[:, None] * stride_dn + os[None, :] * stride_do,
                         mask=row_mask[:, None] & o_mask[None, :], other=0.0)
            w = tl.load(w_ptr + os[:, None] * stride_wo + feats[None, :] * stride_wm,
                        mask=o_mask[:, None] & feat_mask[None, :], other=0.0)
            h = tl.dot(dy.to(w.dtype), w, h, input_precision=PRECISION)
        if FEATURE == 1:
            u = h * phi
            v = u * rate[None, :]
            tl.store(r_ptr + rows * M_TILES + m_tile, tl.sum(v * rate[None, :], axis=1), mask=row_mask)
        else:
            v = tl.where(s > floor, h, 0.0) * inv_sqrt_m
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _matmul_kernel(
    a_ptr, stride_ar, stride_ak,    # (R, K) left factor
    b_ptr, stride_bk, stride_bc,    # (K, C) right factor
    r_ptr,                          # (R,) fp32 contiguous row coefficients (when HAS_EPILOGUE)
    e_ptr, stride_er, stride_ec,    # (R, C) epilogue matrix: out -= r[:, None] * E (when HAS_EPILOGUE)
    c_ptr, stride_cr, stride_cc,    # out (R, C)
    R, C, K,
    HAS_EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r_mask, c_mask = rs < R, cs < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < K
        a = tl.load(a_ptr + rs[:, None] * stride_ar + ks[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cs[None, :] * stride_bc,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    out_mask = r_mask[:, None] & c_mask[None, :]
    if HAS_EPILOGUE:
        coef = tl.load(r_ptr + rs, mask=r_mask, other=0.0)
        e = tl.load(e_ptr + rs[:, None] * stride_er + cs[None, :] * stride_ec, mask=out_mask, other=0.0)
        acc -= coef[:, None] * e.to(tl.float32)
    tl.store(c_ptr + rs[:, None] * stride_cr + cs[None, :] * stride_cc, acc.to(c_ptr.dtype.element_ty),
             mask=out_mask)


def _matmul(a, b, out, precision, coef=None, epilogue=None):
    """out = a @ b (- coef[:, None] * epilogue), a (R, K) and b (K, C) as strided views."""
    r, k = a.shape
    c = b.shape[1]
    if r == 0 or c == 0:
        return out
    if k == 0:
        return out.zero_() if coef is None else out.copy_(-coef[:, None] * epilogue)
    blocks = _matmul_blocks()
    e = epilogue if epilogue is not None else out
    _matmul_kernel[(triton.cdiv(r, blocks["BLOCK_R"]), triton.cdiv(c, blocks["BLOCK_C"]))](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1),
        coef if coef is not None else out, e, e.stride(0), e.stride(1), out, out.stride(0), out.stride(1),
        r, c, k, HAS_EPILOGUE=coef is not None, PRECISION=precision, **blocks,
    )
    return out


def _coefficients(m, device, rate, amplitude):
    one = torch.ones(m, device=device, dtype=torch.float32)
    rate = one if rate is None else rate.to(torch.float32).contiguous()
    amplitude = one if amplitude is None else amplitude.to(torch.float32).contiguous()
    return rate, amplitude


@torch.library.custom_op("twinops::snnk_linear", mutates_args=())
def _snnk_linear(
    x: torch.Tensor, projection: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    rate: Optional[torch.Tensor], amplitude: Optional[torch.Tensor], feature: str, floor: float,
) -> torch.Tensor:
    n, d = x.shape
    m, o = projection.shape[0], weight.shape[0]
    y = torch.empty((n, o), device=x.device, dtype=x.dtype)
    if n == 0 or o == 0:
        return y
    a, amp = _coefficients(m, x.device, rate, amplitude)
    bias_c = bias.contiguous() if bias is not None else y
    blocks = _blocks()
    _forward_kernel[(triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(o, blocks["BLOCK_O"]))](
        x, x.stride(0), x.stride(1), projection, projection.stride(0), projection.stride(1),
        weight, weight.stride(0), weight.stride(1), bias_c, a, amp, y, y.stride(0), y.stride(1),
        n, d, m, o, floor, 1.0 / math.sqrt(m),
        FEATURE=EXP if feature == "exp" else RELU, HAS_BIAS=bias is not None,
        PRECISION=rt.dot_precision(x.dtype), **blocks,
    )
    return y


@_snnk_linear.register_fake
def _(x, projection, weight, bias, rate, amplitude, feature, floor):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("twinops::snnk_linear_backward", mutates_args=())
def _snnk_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, projection: torch.Tensor, weight: torch.Tensor,
    rate: Optional[torch.Tensor], amplitude: Optional[torch.Tensor], feature: str, floor: float,
    need_x: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    m, o = projection.shape[0], weight.shape[0]
    dx = torch.empty((n, d) if need_x else (0,), device=x.device, dtype=x.dtype)
    dw = torch.empty((o, m) if need_weight else (0,), device=x.device, dtype=weight.dtype)
    if not (need_x or need_weight):
        return dx, dw
    if n == 0 or o == 0:
        dx.zero_()
        dw.zero_()
        return dx, dw
    precision = rt.dot_precision(x.dtype)
    a, amp = _coefficients(m, x.device, rate, amplitude)
    blocks = _blocks()
    m_tiles = triton.cdiv(m, blocks["BLOCK_M"])
    phi = torch.empty((n, m) if need_weight else (0,), device=x.device, dtype=x.dtype)
    v = torch.empty((n, m) if need_x else (0,), device=x.device, dtype=x.dtype)
    exp = feature == "exp"
    r = torch.empty((n, m_tiles) if (need_x and exp) else (0,), device=x.device, dtype=torch.float32)
    _backward_features_kernel[(triton.cdiv(n, blocks["BLOCK_N"]), m_tiles)](
        x, x.stride(0), x.stride(1), projection, projection.stride(0), projection.stride(1),
        weight, weight.stride(0), weight.stride(1), grad, grad.stride(0), grad.stride(1), a, amp,
        phi, v, r, n, d, m, o, m_tiles, floor, 1.0 / math.sqrt(m),
        FEATURE=EXP if exp else RELU, WANT_PHI=need_weight, WANT_V=need_x, PRECISION=precision, **blocks,
    )
    if need_x:
        if exp:
            _matmul(v, projection, dx, precision, coef=r.sum(dim=1), epilogue=x)
        else:
            _matmul(v, projection, dx, precision)
    if need_weight:
        _matmul(grad.t(), phi, dw, precision)
    return dx, dw


@_snnk_linear_backward.register_fake
def _(grad, x, projection, weight, rate, amplitude, feature, floor, need_x, need_weight):
    dx = x.new_empty(tuple(x.shape) if need_x else (0,))
    dw = weight.new_empty(tuple(weight.shape) if need_weight else (0,))
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, projection, weight, bias, rate, amplitude, feature, floor = inputs
    ctx.save_for_backward(x, projection, weight, rate, amplitude)
    ctx.feature, ctx.floor, ctx.has_bias = feature, floor, bias is not None


def _backward(ctx, grad):
    x, projection, weight, rate, amplitude = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    need_bias = ctx.has_bias and ctx.needs_input_grad[3]
    dx = dw = db = None
    if need_x or need_weight:
        gx, gw = _snnk_linear_backward(grad, x, projection, weight, rate, amplitude, ctx.feature, ctx.floor,
                                       need_x, need_weight)
        dx = gx if need_x else None
        dw = gw if need_weight else None
    if need_bias:
        db = grad.sum(dim=0, dtype=torch.float32).to(grad.dtype)
    return dx, None, dw, db, None, None, None, None


_snnk_linear.register_autograd(_backward, setup_context=_setup_context)


def _check_frozen(t, name):
    if t is not None and t.requires_grad:
        raise ValueError(f"{name} is a frozen input of snnk_linear and carries no gradient; pass {name}.detach()")


def snnk_linear(x, projection, weight, bias=None, rate=None, amplitude=None, *, feature="relu", floor=0.0):
    """``phi(x) @ weight.T + bias`` with the random-feature map ``phi`` of ``projection``; (..., out).

    Same arguments and semantics as `twinops.reference.layers.snnk_linear`; returns x's dtype.
    ``projection``, ``weight`` and ``bias`` must have x's dtype; ``rate`` / ``amplitude`` any float dtype.
    """
    rt.check_tensor(x, "x")
    if x.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, d) with at least 2 dimensions, got {x.ndim} dimensions "
                         f"{tuple(x.shape)}")
    d = x.shape[-1]
    rt.check_float_tensor(projection, "projection", 2, "(m, d)")
    if projection.shape[0] < 1:
        raise ValueError(f"projection must have at least one row (m >= 1 random features), "
                         f"got shape {tuple(projection.shape)}")
    if projection.shape[1] != d:
        raise ValueError(f"projection must have shape (m, {d}) to match x's last dimension, "
                         f"got {tuple(projection.shape)}")
    m = projection.shape[0]
    rt.check_float_tensor(weight, "weight", 2, "(out, m)")
    if weight.shape[1] != m:
        raise ValueError(f"weight must have shape (out, {m}) (one column per random feature), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        rt.check_float_tensor(bias, "bias", 1, "(out,)")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    check_choice(feature, "feature", FEATURES)
    floor = check_real(floor, "floor")
    if feature == "relu" and (rate is not None or amplitude is not None):
        raise ValueError("rate and amplitude apply to feature='exp' only; pass None with feature='relu'")
    for name, t in (("rate", rate), ("amplitude", amplitude)):
        if t is not None:
            rt.check_float_tensor(t, name, 1, "(m,)")
            if tuple(t.shape) != (m,):
                raise ValueError(f"{name} must have shape ({m},), one entry per random feature, got {tuple(t.shape)}")
    for name, t in (("projection", projection), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("projection", projection), ("rate", rate), ("amplitude", amplitude)):
        _check_frozen(t, name)
    rt.check_device(("x", x), ("projection", projection), ("weight", weight), ("bias", bias), ("rate", rate),
                    ("amplitude", amplitude))
    y = _snnk_linear(x.reshape(-1, d), projection, weight, bias, rate, amplitude, feature, floor)
    return y.reshape(tuple(x.shape[:-1]) + (weight.shape[0],))


def orthogonal_projection(m: int, d: int, *, generator: torch.Generator | None = None,
                          dtype=torch.float32, device=None) -> torch.Tensor:
    """Block-orthogonal (m, d) rows with chi(d) norms (Performer's ``gaussian_orthogonal_random_matrix``
    with ``scaling=0``), drawn on the CPU from ``generator``."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn((d, d), generator=generator, dtype=torch.float64))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:m]
    norms = torch.randn((m, d), generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).to(device=device, dtype=dtype)


class SNNKLinear(torch.nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by an SNNK layer.

    Buffers: ``projection`` (num_features, in_features), drawn once at construction from a CPU
    generator seeded with ``seed`` (default 0, as the authors' code), Gaussian or block-orthogonal
    (``projection_kind``); ``rate`` / ``amplitude`` (num_features,), ones by default (URF only).
    Parameters: ``weight`` (out_features, num_features), initialised to phi(W) row by row for W drawn
    like ``nn.Linear``'s weight (the paper's initialisation), and ``bias`` (out_features,) like
    ``nn.Linear``'s. Train and eval behave alike (no state is updated).
    """

    def __init__(self, in_features: int, out_features: int, num_features: int, *, feature: str = "relu",
                 floor: float = 0.0, bias: bool = True, projection_kind: str = "gaussian", seed: int = 0,
                 device=None, dtype=None):
        super().__init__()
        check_choice(feature, "feature", FEATURES)
        check_choice(projection_kind, "projection_kind", ("gaussian", "orthogonal"))
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.in_features, self.out_features, self.num_features = in_features, out_features, num_features
        self.feature, self.floor = feature, check_real(floor, "floor")
        gen = torch.Generator().manual_seed(seed)
        dtype = dtype or torch.get_default_dtype()
        if projection_kind == "orthogonal":
            g = orthogonal_projection(num_features, in_features, generator=gen, dtype=torch.float64)
        else:
            g = torch.randn((num_features, in_features), generator=gen, dtype=torch.float64)
        self.register_buffer("projection", g.to(device=device, dtype=dtype))
        if feature == "exp":
            self.register_buffer("rate", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("amplitude", torch.ones(num_features, device=device, dtype=dtype))
        else:
            self.rate = self.amplitude = None
        w0 = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.float64)
        with torch.no_grad():
            s = w0.weight @ g.T
            if feature == "relu":
                psi = torch.clamp(s, min=self.floor) / math.sqrt(num_features)
            else:
                psi = torch.exp(s - (w0.weight ** 2).sum(1, keepdim=True) / 2) / math.sqrt(num_features)
        self.weight = torch.nn.Parameter(psi.to(device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(w0.bias.detach().to(device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        return snnk_linear(x, self.projection, self.weight, self.bias, self.rate, self.amplitude,
                           feature=self.feature, floor=self.floor)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_features={self.num_features}, feature={self.feature!r}, floor={self.floor}, "
                f"bias={self.bias is not None}")
