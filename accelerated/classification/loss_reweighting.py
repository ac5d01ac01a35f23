"""Loss-based sample reweighting (P15) as Triton kernels. See
`twinops.reference.classification.loss_reweighting` for the definitions.

``weighted_sequence_ce`` — logits (B, T, V), one program per token row (i, t) walking V in chunks:

    forward, per token:     m = max_k z_k,  s = sum_k exp(z_k - m),  ce_t = (m + log s) - z_y  (0 if ignored)
    forward, per sequence:  n_i = #active tokens,  l_i = sum_t ce_t / n_i  (0 when n_i = 0)
    backward, per token:    dz_k = (g_i / n_i) * (exp(z_k - m) / s - [k = y])  (0 if ignored)

where g_i is the gradient reaching l_i. The weighting ``scale * w_i * l_i`` and the reduction are
(B,)-sized torch operations on top of the per-sequence losses, so autograd hands the kernel
g_i = scale * w_i * (upstream gradient) — the per-sequence backward scale — and gives ``weights``
its gradient ``scale * l_i`` for free. The forward saves (m, s) per token, 8 bytes; the backward
reads the logits once more and writes the gradient once.

``loss_reweight_weights`` — one program over the n losses, three passes over them: min/max of
the active losses, online max and sum of exp(f / r) of the strategy values, and the write. It is
a stop-gradient quantity: forward only (no backward kernel, the losses are detached).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_choice, check_int, check_real
from ...reference.classification.loss_reweighting import RANGE_FLOOR, STRATEGIES
from .. import _runtime as rt
from ._rowwise import load_label, row_max_sumexp, store_softmax_grad

__all__ = ["weighted_sequence_ce", "WeightedSequenceCE", "loss_reweight_weights", "LossReweightWeights"]

# Only weighted_sequence_ce is trained through; loss_reweight_weights is a stop-gradient weight rule.
HAS_TRITON_BACKWARD = True

LAUNCH = rt.RowLaunch(block=4096, warps=8)  # vocabulary chunk x warps of a token-row program
SEQUENCE_BLOCK = 1024  # tokens one sequence program sums at a time (GPU)
# The weight rule runs as one program: wide chunks keep its three passes over an all-gathered batch
# (tens of thousands of losses) to a few iterations each. Not yet tuned on a GPU.
WEIGHT_LAUNCH = rt.RowLaunch(block=16384, warps=16)


# ---------------------------------------------------------------------------------- weighted_sequence_ce


@triton.jit
def _token_label(labels_ptr, stride_label_b, stride_label_t, i, t, T, V, ignore_index, SHIFT: tl.constexpr):
    """The label scored against logits[i, t]: labels[i, t + SHIFT]. Position t = T - 1 has none when
    shifting; it counts as ignored. Returns (y, ignored, valid, safe) as ``load_label``."""
    beyond = t + SHIFT >= T
    t_label = tl.where(beyond, 0, t + SHIFT)
    y, ignored, valid, safe = load_label(labels_ptr + i * stride_label_b, stride_label_t, t_label, V, ignore_index)
    return y, ignored | beyond, valid & (~beyond), safe


@triton.jit
def _token_ce_forward_kernel(
    logits_ptr, stride_b, stride_t, stride_v,  # (B, T, V) logits; element (i, t, k) at i*stride_b + t*stride_t + k*stride_v
    labels_ptr, stride_label_b, stride_label_t,  # (B, T) integer labels
    token_loss_ptr,                            # out (B*T,) fp32 contiguous: ce of token (i, t); 0 if ignored; NaN if label invalid
    stats_ptr,                                 # out (B*T, 2) fp32 contiguous: m and s of token (i, t), for the backward
    T, V, ignore_index,
    SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token row i*T + t
    i = row // T
    t = row % T
    row_ptr = logits_ptr + i * stride_b + t * stride_t
    y, ignored, valid, safe = _token_label(labels_ptr, stride_label_b, stride_label_t, i, t, T, V, ignore_index, SHIFT)

    m, s = row_max_sumexp(row_ptr, stride_v, V, 1.0, BLOCK_C)
    ce = (m - tl.load(row_ptr + safe * stride_v).to(tl.float32)) + tl.log(s)
    ce = tl.where(valid, ce, float("nan"))
    tl.store(token_loss_ptr + row, tl.where(ignored, 0.0, ce))
    tl.store(stats_ptr + row * 2, m)
    tl.store(stats_ptr + row * 2 + 1, s)


@triton.jit
def _sequence_mean_kernel(
    token_loss_ptr,                            # (B*T,) fp32 contiguous, from the forward kernel
    labels_ptr, stride_label_b, stride_label_t,  # (B, T) integer labels, as in the forward
    seq_loss_ptr,                              # out (B,) fp32: l_i = sum_t ce / n_i, 0 when n_i = 0
    count_ptr,                                 # out (B,) fp32: n_i, the number of active tokens
    T, ignore_index,
    SHIFT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    total = 0.0
    n = 0.0
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T).to(tl.int64)
        total += tl.sum(tl.load(token_loss_ptr + i * T + t, mask=t < T, other=0.0), axis=0)
        scored = t + SHIFT < T
        y = tl.load(labels_ptr + i * stride_label_b + (t + SHIFT) * stride_label_t, mask=scored, other=ignore_index)
        y = y.to(tl.int64)  # as load_label does, so uint8 labels compare the same way
        n += tl.sum(tl.where(scored & (y != ignore_index), 1.0, 0.0), axis=0)
    tl.store(seq_loss_ptr + i, tl.where(n > 0.0, total / tl.maximum(n, 1.0), 0.0))
    tl.store(count_ptr + i, n)


@triton.jit
def _token_ce_backward_kernel(
    grad_seq_ptr, stride_grad,                 # (B,) gradient reaching l_i (stride 0 when broadcast)
    count_ptr,                                 # (B,) fp32 n_i from the forward
    logits_ptr, stride_b, stride_t, stride_v,  # (B, T, V) logits, as in the forward
    labels_ptr, stride_label_b, stride_label_t,
    stats_ptr,                                 # (B*T, 2) fp32 saved by the forward: m, s
    grad_ptr, stride_grad_b, stride_grad_t, stride_grad_v,  # out (B, T, V) in the logits' dtype
    T, V, ignore_index,
    SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = row // T
    t = row % T
    row_ptr = logits_ptr + i * stride_b + t * stride_t
    out_ptr = grad_ptr + i * stride_grad_b + t * stride_grad_t
    y, ignored, valid, safe = _token_label(labels_ptr, stride_label_b, stride_label_t, i, t, T, V, ignore_index, SHIFT)

    m = tl.load(stats_ptr + row * 2)
    s = tl.load(stats_ptr + row * 2 + 1)
    # An active token implies n_i >= 1; ignored tokens never use the factor.
    factor = tl.load(grad_seq_ptr + i * stride_grad).to(tl.float32) / tl.maximum(tl.load(count_ptr + i), 1.0)
    factor = tl.where(valid, factor, float("nan"))
    store_softmax_grad(row_ptr, stride_v, out_ptr, stride_grad_v, V, y, m, s, factor, ignored, BLOCK_C)


def _sequence_block(t: int) -> int:
    cap = 16 if rt.interpreting() else SEQUENCE_BLOCK
    return max(16, min(cap, 1 << max(0, (t - 1).bit_length())))


@torch.library.custom_op("twinops::weighted_sequence_ce_rows", mutates_args=())
def _sequence_rows(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, v = logits.shape
    seq_loss = torch.zeros(b, device=logits.device, dtype=torch.float32)
    count = torch.zeros_like(seq_loss)
    stats = torch.empty((b * t, 2), device=logits.device, dtype=torch.float32)
    if b * t > 0:
        token_loss = torch.empty(b * t, device=logits.device, dtype=torch.float32)
        _token_ce_forward_kernel[(b * t,)](
            logits, *logits.stride(), labels, *labels.stride(), token_loss, stats,
            t, v, ignore_index, SHIFT=int(shift), **rt.row_launch(v, LAUNCH),
        )
        _sequence_mean_kernel[(b,)](
            token_loss, labels, *labels.stride(), seq_loss, count, t, ignore_index,
            SHIFT=int(shift), BLOCK_T=_sequence_block(t),
        )
    return seq_loss, count, stats


@_sequence_rows.register_fake
def _(logits, labels, shift, ignore_index):
    b, t, _ = logits.shape
    seq = logits.new_empty(b, dtype=torch.float32)
    return seq, torch.empty_like(seq), logits.new_empty((b * t, 2), dtype=torch.float32)


@torch.library.custom_op("twinops::weighted_sequence_ce_rows_backward", mutates_args=())
def _sequence_rows_backward(
    grad_seq: torch.Tensor, count: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
    stats: torch.Tensor, shift: bool, ignore_index: int,
) -> torch.Tensor:
    b, t, v = logits.shape
    grad = torch.empty((b, t, v), device=logits.device, dtype=logits.dtype)
    if b * t > 0:
        _token_ce_backward_kernel[(b * t,)](
            grad_seq, grad_seq.stride(0), count, logits, *logits.stride(), labels, *labels.stride(), stats,
            grad, *grad.stride(), t, v, ignore_index, SHIFT=int(shift), **rt.row_launch(v, LAUNCH),
        )
    return grad


@_sequence_rows_backward.register_fake
def _(grad_seq, count, logits, labels, stats, shift, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, shift, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1], output[2])
    ctx.shift, ctx.ignore_index = shift, ignore_index


def _backward(ctx, grad_seq, grad_count, grad_stats):
    logits, labels, count, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _sequence_rows_backward(grad_seq, count, logits, labels, stats, ctx.shift, ctx.ignore_index)
    return grad, None, None, None


_sequence_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_sequence_inputs(logits, labels, weights):
    rt.check_float_tensor(logits, "logits", 3, "(B, T, V)")
    b, t, v = logits.shape
    if v < 1:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    rt.check_int_tensor(labels, "labels", (b, t))
    if weights is not None:
        rt.check_float_tensor(weights, "weights", 1, "(B,)")
        if tuple(weights.shape) != (b,):
            raise ValueError(f"weights must have shape ({b},), one weight per sequence, got {tuple(weights.shape)}")
    rt.check_device(("logits", logits), ("labels", labels), ("weights", weights))


def weighted_sequence_ce(logits, labels, weights=None, *, scale=1.0, shift=True, ignore_index=-100,
                         reduction="sum"):
    """``scale * sum_i weights[i] * l_i``, with l_i the mean token cross-entropy of sequence i (P15).

    Same arguments and semantics as `twinops.reference.classification.loss_reweighting.weighted_sequence_ce`;
    returns the logits' dtype. ``reduction="none"`` gives the (B,) terms (the per-sequence losses
    with the defaults). A label outside [0, V) that is not ``ignore_index`` makes its sequence's
    loss NaN instead of raising, since checking it would synchronise the device.
    """
    _check_sequence_inputs(logits, labels, weights)
    scale = check_real(scale, "scale")
    shift = check_bool(shift, "shift")
    ignore_index = check_int(ignore_index, "ignore_index")
    rt.check_reduction(reduction)
    seq_loss, count, _ = _sequence_rows(logits, labels, shift, ignore_index)
    terms = seq_loss * scale if weights is None else (weights.float() * scale) * seq_loss
    if reduction == "none":
        out = terms
    elif reduction == "sum":
        out = terms.sum()
    else:
        out = terms.sum() / (count > 0).sum()
    return out.to(logits.dtype)


class WeightedSequenceCE(torch.nn.Module):
    """``nn.Module`` form of `weighted_sequence_ce`: ``forward(logits, labels, weights=None)``."""

    def __init__(self, *, scale=1.0, shift=True, ignore_index=-100, reduction="sum"):
        super().__init__()
        self.scale, self.shift, self.ignore_index, self.reduction = scale, shift, ignore_index, reduction

    def forward(self, logits, labels, weights=None):
        return weighted_sequence_ce(logits, labels, weights, scale=self.scale, shift=self.shift,
                                    ignore_index=self.ignore_index, reduction=self.reduction)


# ---------------------------------------------------------------------------------- loss_reweight_weights

_LINUPPER, _QUADRATIC, _EXTREMES, _UNIFORM, _README_UNIFORM = range(5)
_RANGE_FLOOR = tl.constexpr(RANGE_FLOOR)


@triton.jit
def _strategy_value(loss, lo, hi, delta, STRATEGY: tl.constexpr):
    """f of the normalised loss delta * ((l - lo) + (l - hi)) / max(hi - lo, RANGE_FLOOR)."""
    norm = delta * ((loss - lo) + (loss - hi)) / tl.maximum(hi - lo, _RANGE_FLOOR)
    if STRATEGY == 0:  # linupper
        f = tl.minimum(norm + delta, delta)
    elif STRATEGY == 1:  # quadratic
        f = 1.0 - (norm * norm) / (delta * delta)
    elif STRATEGY == 2:  # extremes
        f = tl.abs(norm)
    elif STRATEGY == 3:  # uniform
        f = norm * 0.0
    else:  # the README snippet's "uniform"
        f = norm
    return f


@triton.jit
def _load_losses(loss_ptr, stride_loss, active_ptr, stride_active, idx, n, HAS_ACTIVE: tl.constexpr):
    """Losses at ``idx`` in fp32 and whether each is an active entry (in range and, with a mask, set)."""
    inside = idx < n
    x = tl.load(loss_ptr + idx * stride_loss, mask=inside, other=0.0).to(tl.float32)
    act = inside
    if HAS_ACTIVE:
        act = act & (tl.load(active_ptr + idx * stride_active, mask=inside, other=0) != 0)
    return x, act


@triton.jit
def _reweight_kernel(
    loss_ptr, stride_loss,      # (n,) per-sequence losses
    active_ptr, stride_active,  # (n,) uint8 view of the boolean mask, read only when HAS_ACTIVE
    weight_ptr,                 # out (n,) contiguous, in the losses' dtype
    n, delta, temperature,
    STRATEGY: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Pass 1: range of the active losses; a non-finite active loss poisons every weight.
    lo = float("inf")
    hi = float("-inf")
    bad = 0.0
    for start in range(0, n, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x, act = _load_losses(loss_ptr, stride_loss, active_ptr, stride_active, idx, n, HAS_ACTIVE)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        lo = tl.minimum(lo, tl.min(tl.where(act & finite, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(act & finite, x, float("-inf")), axis=0))
        bad += tl.sum(tl.where(act & (~finite), 1.0, 0.0), axis=0)

    # Pass 2: online max mx of f over the active entries and s = sum exp((f - mx) / r).
    mx = float("-inf")
    s = 0.0
    for start in range(0, n, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x, act = _load_losses(loss_ptr, stride_loss, active_ptr, stride_active, idx, n, HAS_ACTIVE)
        f = tl.where(act, _strategy_value(x, lo, hi, delta, STRATEGY), float("-inf"))
        m_new = tl.maximum(mx, tl.max(f, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((mx - shift) / temperature) + tl.sum(tl.exp((f - shift) / temperature), axis=0)
        mx = m_new

    # Pass 3: the weights; 0 for inactive entries (and everywhere when none is active).
    for start in range(0, n, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x, act = _load_losses(loss_ptr, stride_loss, active_ptr, stride_active, idx, n, HAS_ACTIVE)
        f = _strategy_value(x, lo, hi, delta, STRATEGY)
        w = tl.where(act, tl.exp((f - mx) / temperature) / s, 0.0)
        w = tl.where(bad > 0.0, float("nan"), w)
        tl.store(weight_ptr + idx, w.to(weight_ptr.dtype.element_ty), mask=idx < n)


@torch.library.custom_op("twinops::loss_reweight_weights", mutates_args=())
def _reweight(losses: torch.Tensor, active: torch.Tensor | None, strategy: int, delta: float,
              temperature: float) -> torch.Tensor:
    n = losses.shape[0]
    weights = torch.empty(n, device=losses.device, dtype=losses.dtype)
    if n > 0:
        mask = active.view(torch.uint8) if active is not None else losses  # a dummy pointer without a mask
        _reweight_kernel[(1,)](
            losses, losses.stride(0), mask, mask.stride(0), weights, n, delta, temperature,
            STRATEGY=strategy, HAS_ACTIVE=active is not None, **rt.row_launch(n, WEIGHT_LAUNCH),
        )
    return weights


@_reweight.register_fake
def _(losses, active, strategy, delta, temperature):
    return losses.new_empty(losses.shape[0])


def loss_reweight_weights(losses, active=None, *, strategy="linupper", delta=1.0, temperature=1.0,
                          readme_uniform=False):
    """Per-sequence weights from per-sequence losses: normalise, strategy, tempered softmax (P15).

    Same arguments and semantics as `twinops.reference.classification.loss_reweighting.loss_reweight_weights`;
    returns the losses' dtype and never carries a gradient (the losses are detached). A NaN or
    infinite active loss makes every weight NaN instead of raising, since checking it would
    synchronise the device.
    """
    rt.check_float_tensor(losses, "losses", 1, "(n,)")
    if active is not None:
        rt.check_tensor(active, "active")
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a boolean mask, got dtype {active.dtype}")
        if tuple(active.shape) != tuple(losses.shape):
            raise ValueError(f"active must have shape ({losses.shape[0]},) to match losses, got {tuple(active.shape)}")
    check_choice(strategy, "strategy", STRATEGIES)
    delta = check_real(delta, "delta", low=0.0, low_open=True)
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    readme_uniform = check_bool(readme_uniform, "readme_uniform")
    rt.check_device(("losses", losses), ("active", active))
    code = STRATEGIES.index(strategy)
    if strategy == "uniform" and readme_uniform:
        code = _README_UNIFORM
    return _reweight(losses.detach(), active, code, delta, temperature)


class LossReweightWeights(torch.nn.Module):
    """``nn.Module`` form of `loss_reweight_weights`: ``forward(losses, active=None)``. ``temperature``
    is a plain attribute, so a warm-up schedule can set it between steps."""

    def __init__(self, *, strategy="linupper", delta=1.0, temperature=1.0, readme_uniform=False):
        super().__init__()
        self.strategy, self.delta, self.temperature, self.readme_uniform = strategy, delta, temperature, readme_uniform

    def forward(self, losses, active=None):
        return loss_reweight_weights(losses, active, strategy=self.strategy, delta=self.delta,
                                     temperature=self.temperature, readme_uniform=self.readme_uniform)


