"""The DDS surrogate loss (P3, ED-NeRF) as elementwise Triton kernels. See
`twinops.reference.classification.dds_loss` for the definition.

Forward, one program per (sample b, channel c, BLOCK pixels of the h x w plane): read z_tgt and the
four noise predictions (and the mask when given) once, form the guided predictions and the DDS
direction

    g = weight_b * mask * ((e_tu + w (e_tc - e_tu)) - (e_su + w (e_sc - e_su)))

in fp32 (whatever the UNet's dtype), and store one fp32 partial sum of z_tgt * g per program. A
one-program-per-row finishing kernel adds each sample's partials in a fixed order (no atomics) and
divides by h*w (and by B for the mean). Backward recomputes g from the noise predictions (z_tgt is
not read) and writes d L / d z_tgt = upstream_b * g / (h w): 5 reads + 1 write per element, nothing
saved but the inputs. A non-finite noise prediction makes g, hence the loss and that gradient entry,
NaN (the reference raises; device code cannot without a synchronisation).

Every tensor is addressed through its own four strides, so channels-last or sliced latents are read
in place, and a mask given as (B, 1, h, w) or (h, w) is expanded to stride-0 views, never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from ...reference.classification.dds_loss import NOISE, REDUCTIONS
from .. import _runtime as rt
from .._partials import sum_partials

__all__ = ["dds_loss", "DDSLoss"]

HAS_TRITON_BACKWARD = True


def _block(hw: int) -> dict:
    """Pixels per program: 16 under the interpreter (small planes cross block edges), up to 1024 on the GPU."""
    if rt.interpreting():
        return dict(BLOCK=16)
    return dict(BLOCK=max(16, min(1024, triton.next_power_of_2(hw))), num_warps=4)


@triton.jit
def _offsets(s0, s1, s2, s3, b, c, y, x):
    return b * s0 + c * s1 + y * s2 + x * s3


@triton.jit
def _direction(
    su_ptr, su0, su1, su2, su3,  # (B, C, h, w) unconditional prediction for the source latent
    sc_ptr, sc0, sc1, sc2, sc3,  # (B, C, h, w) conditional prediction for the source latent
    tu_ptr, tu0, tu1, tu2, tu3,  # (B, C, h, w) unconditional prediction for the target latent
    tc_ptr, tc0, tc1, tc2, tc3,  # (B, C, h, w) conditional prediction for the target latent
    m_ptr, m0, m1, m2, m3,       # mask expanded to (B, C, h, w) (stride 0 along broadcast axes)
    w_ptr, s_w,                  # (B,) per-sample weight
    b, c, y, x, mask, guidance,
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """The DDS direction g at pixels (y, x) of plane (b, c), NaN where a prediction is not finite."""
    e_su = tl.load(su_ptr + _offsets(su0, su1, su2, su3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    e_sc = tl.load(sc_ptr + _offsets(sc0, sc1, sc2, sc3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    e_tu = tl.load(tu_ptr + _offsets(tu0, tu1, tu2, tu3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    e_tc = tl.load(tc_ptr + _offsets(tc0, tc1, tc2, tc3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    src = e_su + guidance * (e_sc - e_su)
    tgt = e_tu + guidance * (e_tc - e_tu)
    scale = 1.0
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + b * s_w).to(tl.float32)
    if HAS_MASK:
        scale = scale * tl.load(m_ptr + _offsets(m0, m1, m2, m3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    g = scale * (tgt - src)
    # x - x is 0 for finite x and NaN for NaN or +-inf
    finite = ((e_su - e_su) == 0.0) & ((e_sc - e_sc) == 0.0) & ((e_tu - e_tu) == 0.0) & ((e_tc - e_tc) == 0.0)
    return tl.where(finite, g, float("nan"))


@triton.jit
def _dds_forward_kernel(
    z_ptr, z0, z1, z2, z3,       # (B, C, h, w) target latents; (b, c, y, x) at b*z0 + c*z1 + y*z2 + x*z3
    su_ptr, su0, su1, su2, su3,  # the four noise predictions, each with its own strides
    sc_ptr, sc0, sc1, sc2, sc3,
    tu_ptr, tu0, tu1, tu2, tu3,
    tc_ptr, tc0, tc1, tc2, tc3,
    m_ptr, m0, m1, m2, m3,       # mask view (read only when HAS_MASK)
    w_ptr, s_w,                  # per-sample weight (read only when HAS_WEIGHT)
    partials_ptr,                # out (B, C * HW_BLOCKS) fp32 contiguous: sum of z * g per program
    C, W, HW, HW_BLOCKS, guidance,
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    block = tl.program_id(1).to(tl.int64)
    b = plane // C
    c = plane % C
    pixels = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = pixels < HW
    y = pixels // W
    x = pixels % W
    g = _direction(su_ptr, su0, su1, su2, su3, sc_ptr, sc0, sc1, sc2, sc3, tu_ptr, tu0, tu1, tu2, tu3,
                   tc_ptr, tc0, tc1, tc2, tc3, m_ptr, m0, m1, m2, m3, w_ptr, s_w, b, c, y, x, mask, guidance,
                   HAS_MASK, HAS_WEIGHT)
    z = tl.load(z_ptr + _offsets(z0, z1, z2, z3, b, c, y, x), mask=mask, other=0.0).to(tl.float32)
    tl.store(partials_ptr + plane * HW_BLOCKS + block, tl.sum(tl.where(mask, z * g, 0.0), axis=0))


@triton.jit
def _dds_backward_kernel(
    up_ptr, s_up,                # upstream gradient: (B,) for "none", else a 0-d tensor read with stride 0
    su_ptr, su0, su1, su2, su3,
    sc_ptr, sc0, sc1, sc2, sc3,
    tu_ptr, tu0, tu1, tu2, tu3,
    tc_ptr, tc0, tc1, tc2, tc3,
    m_ptr, m0, m1, m2, m3,
    w_ptr, s_w,
    dz_ptr, dz0, dz1, dz2, dz3,  # out (B, C, h, w) d L / d z_tgt in z_tgt's dtype
    C, W, HW, guidance, divisor,  # divisor: B for the mean, else 1
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    c = plane % C
    pixels = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = pixels < HW
    y = pixels // W
    x = pixels % W
    g = _direction(su_ptr, su0, su1, su2, su3, sc_ptr, sc0, sc1, sc2, sc3, tu_ptr, tu0, tu1, tu2, tu3,
                   tc_ptr, tc0, tc1, tc2, tc3, m_ptr, m0, m1, m2, m3, w_ptr, s_w, b, c, y, x, mask, guidance,
                   HAS_MASK, HAS_WEIGHT)
    up = tl.load(up_ptr + b * s_up).to(tl.float32) / divisor
    dz = up * g / HW
    tl.store(dz_ptr + _offsets(dz0, dz1, dz2, dz3, b, c, y, x), dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _side_inputs(noise, mask, weight, device):
    """Kernel arguments for the noise predictions, the mask view and the weight, and their flags."""
    args = [a for e in noise for a in (e, *e.stride())]
    if mask is None:
        args += [torch.empty(0, device=device), 0, 0, 0, 0]
    else:
        args += [mask.view(torch.uint8) if mask.dtype == torch.bool else mask, *mask.stride()]
    if weight is None:
        args += [torch.empty(0, device=device), 0]
    else:
        args += [weight, weight.stride(0)]
    return args, dict(HAS_MASK=mask is not None, HAS_WEIGHT=weight is not None)


@torch.library.custom_op("twinops::dds_loss", mutates_args=())
def _dds_forward(
    z_tgt: torch.Tensor, eps_su: torch.Tensor, eps_sc: torch.Tensor, eps_tu: torch.Tensor, eps_tc: torch.Tensor,
    mask: torch.Tensor | None, weight: torch.Tensor | None, guidance_scale: float, reduction: str,
) -> torch.Tensor:
    b, c, h, w = z_tgt.shape
    launch = _block(h * w)
    hw_blocks = triton.cdiv(h * w, launch["BLOCK"])
    partials = torch.empty((b, c * hw_blocks), device=z_tgt.device, dtype=torch.float32)
    side, flags = _side_inputs((eps_su, eps_sc, eps_tu, eps_tc), mask, weight, z_tgt.device)
    _dds_forward_kernel[(b * c, hw_blocks)](
        z_tgt, *z_tgt.stride(), *side, partials, c, w, h * w, hw_blocks, guidance_scale, **flags, **launch,
    )
    if reduction == "none":
        return sum_partials(partials, float(h * w), torch.empty(b, device=z_tgt.device, dtype=z_tgt.dtype))
    divisor = float(h * w) * (b if reduction == "mean" else 1)
    return sum_partials(partials.view(1, -1), divisor, torch.empty((), device=z_tgt.device, dtype=z_tgt.dtype))


@_dds_forward.register_fake
def _(z_tgt, eps_su, eps_sc, eps_tu, eps_tc, mask, weight, guidance_scale, reduction):
    return z_tgt.new_empty((z_tgt.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("twinops::dds_loss_backward", mutates_args=())
def _dds_backward(
    grad: torch.Tensor, eps_su: torch.Tensor, eps_sc: torch.Tensor, eps_tu: torch.Tensor, eps_tc: torch.Tensor,
    mask: torch.Tensor | None, weight: torch.Tensor | None, guidance_scale: float, reduction: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    b, c, h, w = eps_su.shape
    launch = _block(h * w)
    dz = torch.empty((b, c, h, w), device=eps_su.device, dtype=dtype)
    side, flags = _side_inputs((eps_su, eps_sc, eps_tu, eps_tc), mask, weight, eps_su.device)
    _dds_backward_kernel[(b * c, triton.cdiv(h * w, launch["BLOCK"]))](
        grad, grad.stride(0) if reduction == "none" else 0, *side, dz, *dz.stride(), c, w, h * w, guidance_scale,
        float(b) if reduction == "mean" else 1.0, **flags, **launch,
    )
    return dz


@_dds_backward.register_fake
def _(grad, eps_su, eps_sc, eps_tu, eps_tc, mask, weight, guidance_scale, reduction, dtype):
    return eps_su.new_empty(eps_su.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    z_tgt, eps_su, eps_sc, eps_tu, eps_tc, mask, weight, guidance_scale, reduction = inputs
    ctx.save_for_backward(eps_su, eps_sc, eps_tu, eps_tc, mask, weight)
    ctx.guidance_scale, ctx.reduction, ctx.dtype = guidance_scale, reduction, z_tgt.dtype


def _backward(ctx, grad):
    dz = None
    if ctx.needs_input_grad[0]:
        eps_su, eps_sc, eps_tu, eps_tc, mask, weight = ctx.saved_tensors
        dz = _dds_backward(grad, eps_su, eps_sc, eps_tu, eps_tc, mask, weight, ctx.guidance_scale,
                           ctx.reduction, ctx.dtype)
    return dz, None, None, None, None, None, None, None, None  # the stop-gradient: nothing reaches the noise


_dds_forward.register_autograd(_backward, setup_context=_setup_context)


def dds_loss(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, *, guidance_scale=7.5,
             mask=None, weight=None, reduction="sum"):
    """DDS surrogate loss sum(z_tgt * sg(g)) / (h w) on the GPU; its gradient in ``z_tgt`` is g / (h w).

    Same arguments and semantics as `twinops.reference.classification.dds_loss`. The noise
    predictions may be in any floating dtype (fp16 from the UNet, say) and the mask bool, integer or
    floating; everything is computed in fp32 and the result and gradient have ``z_tgt``'s dtype. Non-finite noise predictions give NaN
    (loss and gradient entries) instead of the reference's error, which would need a device
    synchronisation.
    """
    rt.check_float_tensor(z_tgt, "z_tgt", 4, "(B, C, h, w)")
    if 0 in z_tgt.shape:
        raise ValueError(f"z_tgt must have every dimension >= 1, got shape {tuple(z_tgt.shape)}")
    noise = (eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond)
    for name, e in zip(NOISE, noise):
        rt.check_float_tensor(e, name, 4, "(B, C, h, w)")
        if e.shape != z_tgt.shape:
            raise ValueError(f"{name} must have the shape of z_tgt {tuple(z_tgt.shape)}, got {tuple(e.shape)}")
    guidance_scale = check_real(guidance_scale, "guidance_scale")
    check_choice(reduction, "reduction", REDUCTIONS)
    b = z_tgt.shape[0]
    if weight is not None:
        rt.check_float_tensor(weight, "weight", 1, f"({b},)")
        if tuple(weight.shape) != (b,):
            raise ValueError(f"weight must have shape ({b},), one entry per sample, got {tuple(weight.shape)}")
        weight = weight.detach()
    if mask is not None:
        rt.check_tensor(mask, "mask")
        if mask.dtype not in rt.FLOAT_DTYPES + rt.INT_DTYPES + (torch.bool,):
            raise TypeError(f"mask must be a bool, integer, float32, float16 or bfloat16 tensor, got {mask.dtype}")
        if mask.ndim > 4 or not all(m in (1, s) for m, s in zip(mask.shape[::-1], z_tgt.shape[::-1])):
            raise ValueError(f"mask of shape {tuple(mask.shape)} must broadcast to the shape of z_tgt "
                             f"{tuple(z_tgt.shape)}")
        mask = mask.detach().expand(z_tgt.shape)
    rt.check_device(("z_tgt", z_tgt), *zip(NOISE, noise), ("mask", mask), ("weight", weight))
    return _dds_forward(z_tgt, *(e.detach() for e in noise), mask, weight, guidance_scale, reduction)


class DDSLoss(torch.nn.Module):
    """``nn.Module`` form of `dds_loss`: ``loss(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond,
    eps_tgt_cond, mask=None, weight=None)``."""

    def __init__(self, *, guidance_scale=7.5, reduction="sum"):
        super().__init__()
        self.guidance_scale = check_real(guidance_scale, "guidance_scale")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, mask=None, weight=None):
        return dds_loss(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond,
                        guidance_scale=self.guidance_scale, mask=mask, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, reduction={self.reduction!r}"
