"""Eager-PyTorch iSogCLR (P19), written the way the authors' ``SogCLR_DRO_Loss`` computes it, but
functional: the gathered per-sample state comes in and the new state goes out. It materialises the
B x B similarity and several B x B temporaries (that is what the fused kernels avoid)."""

from __future__ import annotations

import torch


def isogclr_loss(image_features, text_features, state_image, state_text, *, gamma=0.8, rho=8.0, eta=1e-3,
                 beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10):
    sim = image_features @ text_features.t()
    sim = torch.where(torch.isfinite(sim), sim, torch.full_like(sim, float("nan")))
    diag = torch.diagonal(sim)
    bsz = sim.shape[0]
    state_dtype = torch.promote_types(state_image.dtype, torch.float32)  # fp32 buffers (fp64 stays fp64)
    tau_i, s_i, b_i, u_i = state_image.to(state_dtype).unbind(1)
    tau_t, s_t, b_t, u_t = state_text.to(state_dtype).unbind(1)

    image_diffs = sim - diag[:, None]
    text_diffs = sim - diag[None, :]
    image_hat = (image_diffs / tau_i[:, None]).detach()
    text_hat = (text_diffs / tau_t[None, :]).detach()

    with torch.no_grad():
        new_b_i = torch.maximum(b_i, image_hat.max(dim=1).values)
        new_b_t = torch.maximum(b_t, text_hat.max(dim=0).values)
        exp_i = torch.exp(image_hat - new_b_i[:, None])
        exp_t = torch.exp(text_hat - new_b_t[None, :])
        g_i = exp_i.sum(dim=1) / (bsz - 1)
        g_t = exp_t.sum(dim=0) / (bsz - 1)
        new_s_i = (1 - gamma) * s_i * torch.exp(b_i - new_b_i) + gamma * g_i
        new_s_t = (1 - gamma) * s_t * torch.exp(b_t - new_b_t) + gamma * g_t
        weights_i = exp_i / (new_s_i[:, None] + eps)
        weights_t = exp_t / (new_s_t[None, :] + eps)

    image_loss = (weights_i * image_diffs).sum(dim=1) / (bsz - 1)
    text_loss = (weights_t * text_diffs).sum(dim=0) / (bsz - 1)
    loss = image_loss.mean() + text_loss.mean()

    with torch.no_grad():
        grad_tau_i = torch.log(new_s_i) + new_b_i + rho - (weights_i * image_hat).sum(dim=1) / (bsz - 1)
        grad_tau_t = torch.log(new_s_t) + new_b_t + rho - (weights_t * text_hat).sum(dim=0) / (bsz - 1)
        new_u_i = (1 - beta_u) * u_i + beta_u * grad_tau_i.clamp(-grad_clip, grad_clip)
        new_u_t = (1 - beta_u) * u_t + beta_u * grad_tau_t.clamp(-grad_clip, grad_clip)
        new_tau_i = (tau_i - eta * new_u_i).clamp(tau_min, tau_max)
        new_tau_t = (tau_t - eta * new_u_t).clamp(tau_min, tau_max)
        new_state_image = torch.stack([new_tau_i, new_s_i, new_b_i, new_u_i], dim=1)
        new_state_text = torch.stack([new_tau_t, new_s_t, new_b_t, new_u_t], dim=1)
    return loss.to(image_features.dtype), new_state_image, new_state_text
