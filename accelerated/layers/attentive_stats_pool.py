"""Attentive statistics pooling (P61) as bandwidth-bound Triton kernels: one read of the features and
the attention logits forward, one read of each and one write of each gradient backward. See
`twinops.reference.layers.attentive_stats_pool` for the definition.

Forward, one program per (utterance b, block of BLOCK_C channels), walking T in BLOCK_T chunks.
Per channel it keeps the running softmax max ``m`` (as flash-attention does), the running softmax
mass ``n = sum_t exp(e_t - m)``, the weighted mean and the weighted sum of squared deviations
``M2 = sum_t w_t (x_t - mean)^2``. A chunk is first reduced on its own (mass n_b, mean_b, M2_b,
two passes over the chunk held in registers), then merged with Chan's parallel-variance rule,
weights rescaled by exp(m_old - m_new):

    n = n_a + n_b,   mean = (n_a mean_a + n_b mean_b) / n,   M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n.

Everything is computed on x - s, with the shift s the feature at the largest logit seen so far
(when a chunk raises the max, s moves there and the running mean is re-expressed; the older weights
shrink by the same move, so its rounding barely counts). The mean relative to s is then small
against the spread whether the attention is flat or peaked, and the variance v = M2 / n never forms
sum w x^2 - mean^2: in fp32 both would lose every digit when a channel's mean is large against its
spread, and the backward's (x - mu) / sigma with them. Frames with logit -inf carry weight 0; a chunk whose
logits are all -inf for a channel contributes nothing (the max is made finite before exp).

Backward, one program per (b, channel block, T chunk), elementwise given the saved statistics:
alpha = exp(e - lse), and with g_mu, g_sigma the two halves of the upstream gradient,

    dx = alpha (g_mu + g_sigma (x - mu) / sigma),
    de = alpha (g_mu (x - mu) + g_sigma ((x - mu)^2 - v) / (2 sigma)),

g_sigma set to 0 where the variance floor eps is active (v < eps). The softmax's own correction
term folds into ``(x - mu)`` and ``- v``, so no second reduction over T is needed.

Saved for the backward: (4, B, C) fp32 = the shift, the mean relative to it, unfloored variance v and the softmax log-normaliser
lse per channel (16 bytes per channel); no (B, C, T) intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt

__all__ = ["attentive_stats_pool", "AttentiveStatsPool"]

HAS_TRITON_BACKWARD = True

# Channel block x frame chunk per program; untuned guesses pending a GPU sweep (T = 200-400 frames is
# typical for speaker embeddings, so a 64-frame chunk wastes little on the last one).
GPU_BLOCKS = dict(BLOCK_C=16, BLOCK_T=64, num_warps=4)
INTERPRETER_BLOCKS = dict(BLOCK_C=16, BLOCK_T=16)


def _blocks() -> dict:
    return dict(INTERPRETER_BLOCKS) if rt.interpreting() else dict(GPU_BLOCKS)


@triton.jit
def _asp_forward_kernel(
    x_ptr, stride_xb, stride_xc, stride_xt,  # (B, C, T) features; (b, c, t) at b*stride_xb + c*stride_xc + t*stride_xt
    e_ptr, stride_eb, stride_ec, stride_et,  # (B, C, T) attention logits, same indexing
    out_ptr, stride_ob, stride_oc,           # out (B, 2C) input dtype: [b, c] = mean, [b, C + c] = deviation
    stats_ptr,                               # out (4, B, C) fp32 contiguous: shift s, mean - s, variance v, lse
    B, C, T, C_BLOCKS, eps,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * C_BLOCKS + channel block
    b = pid // C_BLOCKS
    cs = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    shift = tl.zeros((BLOCK_C,), tl.float32)            # the feature at the largest logit so far
    m = tl.full((BLOCK_C,), float("-inf"), tl.float32)  # running max of the logits
    n = tl.zeros((BLOCK_C,), tl.float32)                # running sum of exp(e - m)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)               # running sum of w (x - mean)^2
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        tile = c_mask[:, None] & (ts < T)[None, :]
        e = tl.load(e_ptr + b * stride_eb + cs[:, None] * stride_ec + ts[None, :] * stride_et,
                    mask=tile, other=float("-inf")).to(tl.float32)
        x = tl.load(x_ptr + b * stride_xb + cs[:, None] * stride_xc + ts[None, :] * stride_xt,
                    mask=tile, other=0.0).to(tl.float32)
        e_max = tl.max(e, axis=1)
        x_at_max = tl.max(tl.where(e == e_max[:, None], x, float("-inf")), axis=1)
        moves = (e_max > m) & (tl.abs(x_at_max) < float("inf"))
        new_shift = tl.where(moves, x_at_max, shift)
        mean = mean + (shift - new_shift)  # the running mean, re-expressed relative to the new shift
        shift = new_shift
        x = x - shift[:, None]
        m_new = tl.maximum(m, e_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: weights 0, not NaN
        w = tl.exp(e - m_safe[:, None])
        w = tl.where(tile, w, 0.0)
        scale = tl.exp(m - m_safe)
        n_a = n * scale
        n_b = tl.sum(w, axis=1)
        mean_b = tl.where(n_b == 0.0, 0.0, tl.sum(w * x, axis=1) / n_b)
        d = tl.where(tile, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(w * d * d, axis=1)
        n = n_a + n_b
        delta = mean_b - mean
        mean = tl.where(n == 0.0, 0.0, (n_a * mean + n_b * mean_b) / n)
        m2 = m2 * scale + m2_b + tl.where(n == 0.0, 0.0, delta * delta * (n_a * n_b / n))
        m = m_new
    mean = tl.where(n == 0.0, float("nan"), mean)  # every logit -inf: no weights, like torch.softmax
    mu = shift + mean
    var = m2 / n
    sigma = tl.sqrt(tl.maximum(var, eps))
    sigma = tl.where(var != var, var, sigma)  # keep NaN (maximum may drop it)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(n)
    tl.store(out_ptr + b * stride_ob + cs * stride_oc, mu.to(out_ptr.dtype.element_ty), mask=c_mask)
    tl.store(out_ptr + b * stride_ob + (C + cs) * stride_oc, sigma.to(out_ptr.dtype.element_ty), mask=c_mask)
    row = b * C + cs
    tl.store(stats_ptr + row, shift, mask=c_mask)
    tl.store(stats_ptr + B * C + row, mean, mask=c_mask)
    tl.store(stats_ptr + 2 * B * C + row, var, mask=c_mask)
    tl.store(stats_ptr + 3 * B * C + row, lse, mask=c_mask)


@triton.jit
def _asp_backward_kernel(
    g_ptr, stride_gb, stride_gc,                 # (B, 2C) upstream gradient: [b, c] for the mean, [b, C + c] for the deviation
    x_ptr, stride_xb, stride_xc, stride_xt,      # (B, C, T) features
    e_ptr, stride_eb, stride_ec, stride_et,      # (B, C, T) attention logits
    stats_ptr,                                   # (4, B, C) fp32 from the forward: shift s, mean - s, variance v, lse
    dx_ptr, stride_dxb, stride_dxc, stride_dxt,  # out (B, C, T) features' dtype (unused unless NEED_X)
    de_ptr, stride_deb, stride_dec, stride_det,  # out (B, C, T) logits' dtype (unused unless NEED_E)
    B, C, T, C_BLOCKS, eps,
    NEED_X: tl.constexpr, NEED_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * C_BLOCKS + channel block
    b = pid // C_BLOCKS
    cs = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    ts = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    c_mask = cs < C
    tile = c_mask[:, None] & (ts < T)[None, :]
    row = b * C + cs
    shift = tl.load(stats_ptr + row, mask=c_mask, other=0.0)
    mu = tl.load(stats_ptr + B * C + row, mask=c_mask, other=0.0)  # relative to the shift
    var = tl.load(stats_ptr + 2 * B * C + row, mask=c_mask, other=1.0)
    lse = tl.load(stats_ptr + 3 * B * C + row, mask=c_mask, other=0.0)
    g_mu = tl.load(g_ptr + b * stride_gb + cs * stride_gc, mask=c_mask, other=0.0).to(tl.float32)
    g_sigma = tl.load(g_ptr + b * stride_gb + (C + cs) * stride_gc, mask=c_mask, other=0.0).to(tl.float32)
    sigma = tl.sqrt(tl.maximum(var, eps))
    g_sigma = tl.where(var >= eps, g_sigma, 0.0)  # below the floor sigma is a constant
    x = tl.load(x_ptr + b * stride_xb + cs[:, None] * stride_xc + ts[None, :] * stride_xt,
                mask=tile, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + b * stride_eb + cs[:, None] * stride_ec + ts[None, :] * stride_et,
                mask=tile, other=0.0).to(tl.float32)
    alpha = tl.exp(e - lse[:, None])
    centred = (x - shift[:, None]) - mu[:, None]
    if NEED_X:
        dx = alpha * (g_mu[:, None] + g_sigma[:, None] * centred / sigma[:, None])
        tl.store(dx_ptr + b * stride_dxb + cs[:, None] * stride_dxc + ts[None, :] * stride_dxt,
                 dx.to(dx_ptr.dtype.element_ty), mask=tile)
    if NEED_E:
        de = alpha * (g_mu[:, None] * centred
                      + g_sigma[:, None] * (centred * centred - var[:, None]) / (2.0 * sigma[:, None]))
        tl.store(de_ptr + b * stride_deb + cs[:, None] * stride_dec + ts[None, :] * stride_det,
                 de.to(de_ptr.dtype.element_ty), mask=tile)


@torch.library.custom_op("twinops::attentive_stats_pool", mutates_args=())
def _asp_fwd(x: torch.Tensor, logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, t = x.shape
    out = torch.empty((b, 2 * c), device=x.device, dtype=x.dtype)
    stats = torch.empty((4, b, c), device=x.device, dtype=torch.float32)
    if b == 0 or c == 0:
        return out, stats
    blocks = _blocks()
    c_blocks = triton.cdiv(c, blocks["BLOCK_C"])
    _asp_forward_kernel[(b * c_blocks,)](
        x, x.stride(0), x.stride(1), x.stride(2), logits, logits.stride(0), logits.stride(1), logits.stride(2),
        out, out.stride(0), out.stride(1), stats, b, c, t, c_blocks, eps, **blocks,
    )
    return out, stats


@_asp_fwd.register_fake
def _(x, logits, eps):
    b, c, _ = x.shape
    return x.new_empty((b, 2 * c)), x.new_empty((4, b, c), dtype=torch.float32)


@torch.library.custom_op("twinops::attentive_stats_pool_backward", mutates_args=())
def _asp_bwd(
    grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, eps: float,
    need_x: bool, need_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, t = x.shape
    dx = torch.empty(x.shape if need_x else (0,), device=x.device, dtype=x.dtype)
    de = torch.empty(x.shape if need_logits else (0,), device=x.device, dtype=logits.dtype)
    if b * c * t == 0 or not (need_x or need_logits):
        return dx, de
    blocks = _blocks()
    c_blocks = triton.cdiv(c, blocks["BLOCK_C"])
    dx_s = dx.stride() if need_x else (0, 0, 0)
    de_s = de.stride() if need_logits else (0, 0, 0)
    _asp_backward_kernel[(b * c_blocks, triton.cdiv(t, blocks["BLOCK_T"]))](
        grad, grad.stride(0), grad.stride(1), x, x.stride(0), x.stride(1), x.stride(2),
        logits, logits.stride(0), logits.stride(1), logits.stride(2), stats,
        dx, *dx_s, de, *de_s, b, c, t, c_blocks, eps, NEED_X=need_x, NEED_E=need_logits, **blocks,
    )
    return dx, de


@_asp_bwd.register_fake
def _(grad, x, logits, stats, eps, need_x, need_logits):
    return (x.new_empty(x.shape if need_x else (0,)),
            logits.new_empty(x.shape if need_logits else (0,)))


def _setup_context(ctx, inputs, output):
    x, logits, eps = inputs
    ctx.save_for_backward(x, logits, output[1])
    ctx.eps = eps


def _backward(ctx, grad, grad_stats):
    x, logits, stats = ctx.saved_tensors
    need_x, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_logits):
        return None, None, None
    dx, de = _asp_bwd(grad, x, logits, stats, ctx.eps, need_x, need_logits)
    return (dx if need_x else None), (de if need_logits else None), None


_asp_fwd.register_autograd(_backward, setup_context=_setup_context)


def attentive_stats_pool(x, logits, *, eps=1e-9):
    """Attention-weighted mean and standard deviation over time, concatenated: (B, 2C).

    Same arguments and semantics as `twinops.reference.layers.attentive_stats_pool`; returns the
    features' dtype.
    """
    rt.check_float_tensor(x, "x", 3, "(B, C, T)")
    rt.check_float_tensor(logits, "logits", 3, "(B, C, T)")
    if tuple(logits.shape) != tuple(x.shape):
        raise ValueError(f"logits must have the shape of x {tuple(x.shape)} (B, C, T), got {tuple(logits.shape)}")
    if x.shape[2] == 0:
        raise ValueError("x must have at least one frame (T >= 1): a softmax over no frames has no weights")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    rt.check_device(("x", x), ("logits", logits))
    return _asp_fwd(x, logits, eps)[0]


class AttentiveStatsPool(torch.nn.Module):
    """The authors' channel-wise attentive statistics pooling layer (EfficientTDNN / ECAPA-TDNN head).

    ``pool(x)`` with x (B, C, T) computes the attention logits with two 1x1 convolutions,
    ``logits = conv2(tanh(conv1(x)))`` (``channels -> bottleneck -> channels``, no global-context
    input), then `attentive_stats_pool` (Triton) gives the (B, 2C) embedding. ``bias`` defaults to
    False as in the authors' layer (SpeechBrain's ECAPA head uses biases). ``eps`` floors the
    variance (default 1e-9, the authors' constant).
    """

    def __init__(self, channels: int, bottleneck: int = 128, *, bias: bool = False, eps: float = 1e-9,
                 device=None, dtype=None):
        super().__init__()
        self.eps = check_real(eps, "eps", low=0.0, low_open=True)
        self.conv1 = torch.nn.Conv1d(channels, bottleneck, kernel_size=1, bias=bias, device=device, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(bottleneck, channels, kernel_size=1, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        logits = self.conv2(torch.tanh(self.conv1(x)))
        return attentive_stats_pool(x, logits, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
