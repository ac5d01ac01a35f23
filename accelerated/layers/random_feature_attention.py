"""Random-feature attention (P47) as Triton kernels. See
`twinops.reference.layers.random_feature_attention` for the definition.

Shapes: query (B, d), keys (B, N, d), frozen weights W (M, d, d), trainable values V (M, d, D).

Forward, three launches:
    1. Q[b, m, :] = x0_b^T W_m          a batched tiled matmul (grid axis 2 over heads), fp32 (B, M, d)
    2. one program per (query b, BLOCK_H heads), FlashAttention-style over the keys:
           for each tile of BLOCK_N keys X:   S = Q_h X^T (tl.dot over d), A = sigma(S),
                                              acc += A X (tl.dot over the key tile)
           Phi[b, h, :] = acc / N            fp32 (B, M, d); the (B, M, N) score tensor never exists
       (d is held whole in one tile: BLOCK_D = next power of two >= d).
    3. f = Phi_flat V_flat                  the tiled matmul over K = M d (head and feature split
                                            by index arithmetic, so V may be any strided view);
                                            Phi stays fp32 (16-bit V is upcast: these products are
                                            O(B M d D), small next to the scores' O(B M N d))
Backward (values only): dV = Phi_flat^T g, the same tiled matmul on the saved Phi.
Extra memory: Q and Phi, two fp32 (B, M, d) buffers (Phi is saved for the backward; it is the
layer's feature matrix, which the values' gradient needs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice
from ...reference.layers.random_feature_attention import ACTIVATIONS
from .. import _runtime as rt

__all__ = ["random_feature_attention", "RandomFeatureAttention"]

HAS_TRITON_BACKWARD = True

# Untuned guesses pending a GPU sweep; 16 under the interpreter so small shapes cross tiles.
GPU_ATTN = dict(BLOCK_H=64, BLOCK_N=64, num_warps=4, num_stages=2)
INTERPRETER_ATTN = dict(BLOCK_H=16, BLOCK_N=16)
GPU_MATMUL = dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=3)
INTERPRETER_MATMUL = dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16)
EXP, RELU = 1, 0


def _attn_blocks() -> dict:
    return dict(INTERPRETER_ATTN) if rt.interpreting() else dict(GPU_ATTN)


def _matmul_blocks() -> dict:
    return dict(INTERPRETER_MATMUL) if rt.interpreting() else dict(GPU_MATMUL)


@triton.jit
def _matmul_kernel(
    a_ptr, stride_ab, stride_ar, stride_ak1, stride_ak2,  # A (batch, R, K); k at (k // KD) * ak1 + (k % KD) * ak2
    b_ptr, stride_bb, stride_bk1, stride_bk2, stride_bc,  # B (batch, K, C); same split of k
    c_ptr, stride_cb, stride_cr, stride_cc,               # out C (batch, R, C) = A B
    R, C, K, KD,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A batched tiled matmul whose reduction index k may span two tensor axes (k = k1 * KD + k2)."""
    batch = tl.program_id(2).to(tl.int64)
    rs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r_mask, c_mask = rs < R, cs < C
    a_ptr += batch * stride_ab
    b_ptr += batch * stride_bb
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < K
        k1, k2 = ks // KD, ks % KD
        a = tl.load(a_ptr + rs[:, None] * stride_ar + (k1 * stride_ak1 + k2 * stride_ak2)[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + (k1 * stride_bk1 + k2 * stride_bk2)[:, None] + cs[None, :] * stride_bc,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        if UPCAST:  # an fp32 operand (the features) meets a 16-bit one: multiply exactly in fp32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    tl.store(c_ptr + batch * stride_cb + rs[:, None] * stride_cr + cs[None, :] * stride_cc,
             acc.to(c_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])


def _matmul(a, a_k, b, b_k, out, *, r, c, k, kd, precision, batch=1, a_batch=0, b_batch=0, out_batch=0):
    """out[batch] = A B with A = (tensor, row stride), K strides ``a_k`` = (k1, k2), B likewise with
    its column stride (strides in elements; ``kd`` splits k). Mixed fp32 / 16-bit operands are
    multiplied in exact fp32."""
    if r == 0 or c == 0 or batch == 0:
        return
    blocks = _matmul_blocks()
    grid = (triton.cdiv(r, blocks["BLOCK_R"]), triton.cdiv(c, blocks["BLOCK_C"]), batch)
    _matmul_kernel[grid](
        a[0], a_batch, a[1], a_k[0], a_k[1], b[0], b_batch, b_k[0], b_k[1], b[1],
        out[0], out_batch, out[1], out[2], r, c, k, kd,
        UPCAST=a[0].dtype != b[0].dtype, PRECISION=precision, **blocks,
    )


@triton.jit
def _features_kernel(
    q_ptr,                                     # (B, M, d) fp32 contiguous: x0_b^T W_m
    k_ptr, stride_kb, stride_kn, stride_kd,    # (B, N, d) keys
    phi_ptr,                                   # out (B, M, d) fp32 contiguous: the features
    M, N, D, inv_n,
    ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    ds = tl.arange(0, BLOCK_D).to(tl.int64)
    h_mask, d_mask = heads < M, ds < D
    hd_offs = b * M * D + heads[:, None] * D + ds[None, :]
    hd_mask = h_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + hd_offs, mask=hd_mask, other=0.0)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = ns < N
        x = tl.load(k_ptr + b * stride_kb + ns[:, None] * stride_kn + ds[None, :] * stride_kd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q.to(x.dtype), tl.trans(x), input_precision=PRECISION)  # (BLOCK_H, BLOCK_N) scores
        if ACTIVATION == 1:
            a = tl.exp(s)
        else:
            a = tl.where(s < 0.0, 0.0, s)  # NaN kept
        a = tl.where(n_mask[None, :], a, 0.0)
        acc = tl.dot(a.to(x.dtype), x, acc, input_precision=PRECISION)
    tl.store(phi_ptr + hd_offs, acc * inv_n, mask=hd_mask)


@torch.library.custom_op("twinops::random_feature_attention", mutates_args=())
def _random_feature_attention(
    query: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, d = query.shape
    n, m, out_dim = keys.shape[1], weights.shape[0], values.shape[2]
    out = torch.empty((bsz, out_dim), device=query.device, dtype=query.dtype)
    phi = torch.empty((bsz, m, d), device=query.device, dtype=torch.float32)
    if bsz == 0 or d == 0:
        out.zero_()
        phi.zero_()
        return out, phi
    precision = rt.dot_precision(query.dtype)
    q = torch.empty((bsz, m, d), device=query.device, dtype=torch.float32)
    # Q[:, m, :] = query @ W_m, one grid slice per head
    _matmul((query, query.stride(0)), (0, query.stride(1)), (weights, weights.stride(2)),
            (0, weights.stride(1)), (q, q.stride(0), q.stride(2)), r=bsz, c=d, k=d, kd=max(d, 1),
            precision=precision, batch=m, b_batch=weights.stride(0), out_batch=q.stride(1))
    blocks = _attn_blocks()
    block_d = max(16, triton.next_power_of_2(d))
    _features_kernel[(bsz, triton.cdiv(m, blocks["BLOCK_H"]))](
        q, keys, keys.stride(0), keys.stride(1), keys.stride(2), phi, m, n, d, 1.0 / n,
        ACTIVATION=EXP if activation == "exp" else RELU, PRECISION=precision, BLOCK_D=block_d, **blocks,
    )
    # f = Phi (B, M d) @ V (M d, D); the reduction index k = head * d + feature
    _matmul((phi, phi.stride(0)), (phi.stride(1), phi.stride(2)), (values, values.stride(2)),
            (values.stride(0), values.stride(1)), (out, out.stride(0), out.stride(1)),
            r=bsz, c=out_dim, k=m * d, kd=d, precision=precision)
    return out, phi


@_random_feature_attention.register_fake
def _(query, keys, weights, values, activation):
    bsz, d = query.shape
    return query.new_empty((bsz, values.shape[2])), query.new_empty((bsz, weights.shape[0], d), dtype=torch.float32)


@torch.library.custom_op("twinops::random_feature_attention_backward", mutates_args=())
def _random_feature_attention_backward(grad: torch.Tensor, phi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    bsz, m, d = phi.shape
    out_dim = values.shape[2]
    dv = torch.empty((m, d, out_dim), device=values.device, dtype=values.dtype)
    if bsz == 0:
        return dv.zero_()
    # dV[(m, e), :] = sum_b Phi[b, m, e] g[b, :]: rows of Phi^T, reduction over the batch
    _matmul((phi, phi.stride(2)), (0, phi.stride(0)), (grad, grad.stride(1)), (0, grad.stride(0)),
            (dv, dv.stride(1), dv.stride(2)), r=d, c=out_dim, k=bsz, kd=max(bsz, 1),
            precision=rt.dot_precision(values.dtype), batch=m, a_batch=phi.stride(1), out_batch=dv.stride(0))
    return dv


@_random_feature_attention_backward.register_fake
def _(grad, phi, values):
    return values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[3])


def _backward(ctx, grad, grad_phi):
    phi, values = ctx.saved_tensors
    if not ctx.needs_input_grad[3]:
        return None, None, None, None, None
    return None, None, None, _random_feature_attention_backward(grad, phi, values), None


_random_feature_attention.register_autograd(_backward, setup_context=_setup_context)


def random_feature_attention(query, keys, weights, values, *, activation="relu"):
    """``sum_m values[m]^T Phi_m`` for each query: (B, D).

    Same arguments and semantics as `twinops.reference.layers.random_feature_attention`; returns the
    query's dtype. Only ``values`` carries a gradient.
    """
    rt.check_float_tensor(query, "query", 2, "(B, d)")
    rt.check_float_tensor(keys, "keys", 3, "(B, N, d)")
    bsz, d = query.shape
    if keys.shape[0] != bsz or keys.shape[2] != d:
        raise ValueError(f"keys must have shape ({bsz}, N, {d}) to match query, got {tuple(keys.shape)}")
    if keys.shape[1] < 1:
        raise ValueError(f"keys must hold at least one key token (N >= 1), got shape {tuple(keys.shape)}")
    rt.check_float_tensor(weights, "weights", 3, "(M, d, d)")
    if weights.shape[0] < 1:
        raise ValueError(f"weights must hold at least one head (M >= 1), got shape {tuple(weights.shape)}")
    if tuple(weights.shape[1:]) != (d, d):
        raise ValueError(f"weights must have shape (M, {d}, {d}) to match query, got {tuple(weights.shape)}")
    rt.check_float_tensor(values, "values", 3, "(M, d, D)")
    if tuple(values.shape[:2]) != (weights.shape[0], d):
        raise ValueError(f"values must have shape ({weights.shape[0]}, {d}, D) to match weights, "
                         f"got {tuple(values.shape)}")
    check_choice(activation, "activation", ACTIVATIONS)
    for name, t in (("keys", keys), ("weights", weights), ("values", values)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
    for name, t in (("query", query), ("keys", keys), ("weights", weights)):
        if t.requires_grad:
            raise ValueError(f"{name} carries no gradient in random_feature_attention (only values is trained); "
                             f"pass {name}.detach()")
    rt.check_device(("query", query), ("keys", keys), ("weights", weights), ("values", values))
    return _random_feature_attention(query, keys, weights, values, activation)[0]


class RandomFeatureAttention(torch.nn.Module):
    """The paper's layer: ``num_heads`` frozen random query–key matrices and trainable values.

    Buffer ``weights`` (num_heads, dim, dim): ``mean * I + Z / sqrt(dim)`` with Z standard Gaussian,
    drawn once from a CPU generator seeded with ``seed`` (``mean`` > 0 is the paper's biased
    sampling). Parameter ``values`` (num_heads, dim, out_features), zero-initialised (the layer is
    linear in it; training is ridge regression). ``forward(query, keys)`` returns (B, out_features).
    Train and eval behave alike.
    """

    def __init__(self, dim: int, num_heads: int, out_features: int = 1, *, activation: str = "relu",
                 mean: float = 0.0, seed: int = 0, device=None, dtype=None):
        super().__init__()
        check_choice(activation, "activation", ACTIVATIONS)
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.dim, self.num_heads, self.out_features, self.activation = dim, num_heads, out_features, activation
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn((num_heads, dim, dim), generator=gen, dtype=torch.float64) / max(dim, 1) ** 0.5
        w = z + mean * torch.eye(dim, dtype=torch.float64)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weights", w.to(device=device, dtype=dtype))
        self.values = torch.nn.Parameter(torch.zeros((num_heads, dim, out_features), device=device, dtype=dtype))

    def forward(self, query, keys):
        return random_feature_attention(query, keys, self.weights, self.values, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, out_features={self.out_features}, "
                f"activation={self.activation!r}")
