r"""Delta denoising score (DDS) surrogate loss, as ED-NeRF uses it to edit a latent NeRF.

Paper P3 — *ED-NeRF: Efficient Text-Guided Editing of 3D Scene using Latent Space NeRF*
(Jangho Park, Gihyun Kwon, Jong Chul Ye, ICLR 2024); the DDS direction is from *Delta Denoising
Score* (Hertz, Aberman, Cohen-Or, ICCV 2023).

The diffusion UNet is external: the loss consumes its four noise predictions for the noised source
and target latents (same timestep, same noise), unconditional and conditional. With
classifier-free guidance of scale $w$,

$$
\hat\epsilon_{\text{src}} = \epsilon^{u}_{\text{src}} + w\,(\epsilon^{c}_{\text{src}} - \epsilon^{u}_{\text{src}}), \qquad
\hat\epsilon_{\text{tgt}} = \epsilon^{u}_{\text{tgt}} + w\,(\epsilon^{c}_{\text{tgt}} - \epsilon^{u}_{\text{tgt}}),
$$

the DDS direction for sample $b$ is $g = \lambda_b\, M \odot (\hat\epsilon_{\text{tgt}} - \hat\epsilon_{\text{src}})$
and the surrogate loss is

$$
L = \frac{1}{h\,w_{\text{sp}}} \sum_{b, c, y, x} z_{\text{tgt}} \odot \operatorname{sg}(g), \qquad
\frac{\partial L}{\partial z_{\text{tgt}}} = \frac{g}{h\,w_{\text{sp}}},
$$

summed over batch and channels and divided by the spatial size $h \cdot w_{\text{sp}}$ only, as in
the DDS authors' notebook (google/prompt-to-prompt, ``DDS_zeroshot.ipynb``). Backpropagating $L$
sends exactly $g/(h\,w_{\text{sp}})$ into $z_{\text{tgt}}$, i.e. into the NeRF that renders it.

Semantics
---------
- ``z_tgt``: real (B, C, h, w) latents, every dimension >= 1; the only input with a gradient.
  The four noise predictions ``eps_src_uncond``, ``eps_src_cond``, ``eps_tgt_uncond``,
  ``eps_tgt_cond`` have its shape and sit under the stop-gradient (the UNet is not trained through
  this loss): they, ``mask`` and ``weight`` receive no gradient.
- ``guidance_scale`` $w$: any finite real, default 7.5 (the notebook's).
- ``mask``: optional real array broadcastable to (B, C, h, w) (e.g. (B, 1, h, w) or (h, w)),
  multiplying $g$: ED-NeRF's masked DDS, which restricts the edit to a region (the paper's exact
  mask construction is not published; any soft or binary mask works). Default: no mask.
- ``weight``: optional (B,) per-sample weight $\lambda_b$, default 1. DDS allows
  $\lambda = \bar a_t^{\,p_a} s_t^{\,p_s}$ with $\bar a_t = \sqrt{\bar\alpha_t}$,
  $s_t = \sqrt{1 - \bar\alpha_t}$; the authors use $p_a = p_s = 0$ (weight 1). The scheduler is
  the caller's, so the weight is an input: pass ``alphas_cumprod[t] ** (p_a / 2) *
  (1 - alphas_cumprod[t]) ** (p_s / 2)`` for other exponents.
- ``reduction``: ``"sum"`` (default: the notebook's sum over batch and channels, divided by
  $h \cdot w_{\text{sp}}$), ``"mean"`` (that divided by B as well) or ``"none"`` for the (B,)
  per-sample terms.
- The notebook multiplies the loss by 2000 before ``backward()``: that is the user's loss weight
  (``2000 * dds_loss(...)``), not part of the loss.
- Non-finite noise predictions raise ``ValueError`` naming the argument (the accelerated kernels,
  which cannot raise without a device synchronisation, return NaN for the loss and for the
  gradient entries there instead). NaN or inf in ``z_tgt`` follows IEEE arithmetic into the loss
  (its gradient $g/(h\,w_{\text{sp}})$ does not depend on $z_{\text{tgt}}$); a non-finite mask or
  weight likewise propagates.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_choice, check_real

__all__ = ["dds_loss", "dds_loss_grad"]

REDUCTIONS = ("sum", "mean", "none")
NOISE = ("eps_src_uncond", "eps_src_cond", "eps_tgt_uncond", "eps_tgt_cond")


def _direction(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, guidance_scale, mask,
               weight, reduction):
    """The validated latents and the DDS direction g, (B, C, h, w)."""
    z = as_float_array(z_tgt, "z_tgt", 4, "(B, C, h, w)")
    if 0 in z.shape:
        raise ValueError(f"z_tgt must have every dimension >= 1, got shape {z.shape}")
    noise = {}
    for name, x in zip(NOISE, (eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond)):
        a = as_float_array(x, name, 4, "(B, C, h, w)")
        if a.shape != z.shape:
            raise ValueError(f"{name} must have the shape of z_tgt {z.shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf): the noise predictions must be finite")
        noise[name] = a
    w = check_real(guidance_scale, "guidance_scale")
    check_choice(reduction, "reduction", REDUCTIONS)
    src = noise["eps_src_uncond"] + w * (noise["eps_src_cond"] - noise["eps_src_uncond"])
    tgt = noise["eps_tgt_uncond"] + w * (noise["eps_tgt_cond"] - noise["eps_tgt_uncond"])
    scale = np.ones((z.shape[0], 1, 1, 1))
    if weight is not None:
        lam = as_float_array(weight, "weight", 1, f"({z.shape[0]},)")
        if lam.shape != (z.shape[0],):
            raise ValueError(f"weight must have shape ({z.shape[0]},), one entry per sample, got {lam.shape}")
        scale = lam[:, None, None, None]
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype.kind not in "fiub":
            raise TypeError(f"mask must be a real or boolean array, got dtype {m.dtype}")
        try:
            m = np.broadcast_to(m.astype(np.float64), z.shape)
        except ValueError:
            raise ValueError(f"mask of shape {m.shape} must broadcast to the shape of z_tgt {z.shape}") from None
        scale = scale * m
    with np.errstate(invalid="ignore", over="ignore"):
        return z, scale * (tgt - src)


def dds_loss(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, *, guidance_scale=7.5,
             mask=None, weight=None, reduction="sum"):
    """DDS surrogate $\\sum z_{tgt} \\odot sg(g) / (h w)$: its gradient in ``z_tgt`` is the DDS direction."""
    z, g = _direction(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, guidance_scale,
                      mask, weight, reduction)
    hw = z.shape[2] * z.shape[3]
    with np.errstate(invalid="ignore", over="ignore"):
        per_sample = (z * g).sum(axis=(1, 2, 3)) / hw
    if reduction == "none":
        return per_sample
    return np.float64(per_sample.sum() / (z.shape[0] if reduction == "mean" else 1))


def dds_loss_grad(grad, z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, *,
                  guidance_scale=7.5, mask=None, weight=None, reduction="sum"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d z_tgt = g / (h w)."""
    z, g = _direction(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, guidance_scale,
                      mask, weight, reduction)
    b, hw = z.shape[0], z.shape[2] * z.shape[3]
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (b,):
            raise ValueError(f"grad must have shape ({b},) for reduction='none', got {grad.shape}")
    elif grad.shape != ():
        raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
    per_sample = np.broadcast_to(grad / (b if reduction == "mean" else 1), (b,))
    with np.errstate(invalid="ignore", over="ignore"):
        return per_sample[:, None, None, None] * g / hw
