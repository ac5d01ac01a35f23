r"""Identity loss: one minus the cosine similarity of two face embeddings, row by row.

Paper P4 — *DreamID: High-Fidelity and Fast diffusion-based Face Swapping via Triplet ID Group
Learning* (Fulong Ye, Miao Hua, Pengze Zhang, Xinghui Li, Qichao Sun, Songtao Zhao, Qian He,
Xinglong Wu, arXiv 2025).

DreamID supervises the swapped face $\hat x$ with the identity of the source image $x_{A_1}$ through
a frozen face-recognition embedder $E$ (ArcFace, 512-d): $u = E(\hat x)$, $v = E(x_{A_1})$ and

$$
\ell_i = 1 - \cos(u_i, v_i), \qquad
\cos(u, v) = \frac{u \cdot v}{\max(\lVert u\rVert\,\lVert v\rVert,\ \varepsilon)} .
$$

Where $\lVert u\rVert\lVert v\rVert > \varepsilon$, with $c = \cos(u, v)$,

$$
\frac{\partial \ell}{\partial u} = -\Bigl(\frac{v}{\lVert u\rVert\,\lVert v\rVert} - c\,\frac{u}{\lVert u\rVert^2}\Bigr),
\qquad
\frac{\partial \ell}{\partial v} = -\Bigl(\frac{u}{\lVert u\rVert\,\lVert v\rVert} - c\,\frac{v}{\lVert v\rVert^2}\Bigr);
$$

inside the clamp ($\lVert u\rVert\lVert v\rVert \le \varepsilon$) the denominator is the constant
$\varepsilon$, so $\partial\ell/\partial u = -v/\varepsilon$ and $\partial\ell/\partial v = -u/\varepsilon$.

Semantics
---------
- ``pred`` and ``source``: real (B, D) arrays of one shape, B >= 1, D >= 1, one pair of embeddings
  per row (``pred`` = $E(\hat x)$, ``source`` = $E(x_{A_1})$). Both receive a gradient: DreamID's
  source embedder is frozen, but a user may pass two trainable embeddings; a frozen one simply
  does not ask for its gradient.
- ``eps`` > 0 (default 1e-8) clamps the *product* of the norms, as written in the paper's
  formula. ``torch.nn.functional.cosine_similarity`` clamps each norm separately; the two agree
  whenever both norms exceed ``eps``.
- A zero embedding lies inside the clamp: its row's loss is exactly 1 (cosine 0). The gradient
  there is the derivative of the clamped formula, $-v/\varepsilon$ for a zero $u$ (large: $10^8 v$
  at the default ``eps``; it overflows 16-bit outputs to ``inf``), and 0 when both rows are zero.
  Mask such rows, or raise ``eps``, if that is not wanted.
- ``reduction``: ``"mean"`` (default, the paper's mean over the batch), ``"sum"``, or ``"none"``
  for the (B,) per-row losses.
- NaN in a row gives NaN for that row's loss and gradient (and for a mean or sum); an infinite
  entry gives NaN (``inf / inf``).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_real, check_reduction, reduce_rows, reduce_rows_grad

__all__ = ["id_cosine_loss", "id_cosine_loss_grad"]


def _inputs(pred, source, eps, reduction):
    u = as_float_array(pred, "pred", 2, "(B, D)")
    if u.shape[0] == 0 or u.shape[1] == 0:
        raise ValueError(f"pred must have at least one row and one feature, got shape {u.shape}")
    v = as_float_array(source, "source", 2, "(B, D)")
    if v.shape != u.shape:
        raise ValueError(f"source must have the shape of pred {u.shape}, got {v.shape}")
    check_real(eps, "eps", low=0.0, low_open=True)
    check_reduction(reduction)
    return u, v


def _cosine(u, v, eps):
    with np.errstate(invalid="ignore", over="ignore"):
        nu, nv = np.sqrt((u * u).sum(axis=1)), np.sqrt((v * v).sum(axis=1))
        product = nu * nv
        clamped = product <= eps  # a NaN row is not clamped: NaN reaches the loss and both gradients
        denominator = np.where(clamped, eps, product)
        return (u * v).sum(axis=1) / denominator, nu, nv, denominator, clamped


def id_cosine_loss(pred, source, *, eps=1e-8, reduction="mean"):
    """DreamID's identity loss $1 - \\cos(u, v)$ per row, reduced."""
    u, v = _inputs(pred, source, eps, reduction)
    cos = _cosine(u, v, float(eps))[0]
    return reduce_rows(1.0 - cos, np.ones(len(cos)), reduction)


def id_cosine_loss_grad(grad, pred, source, *, eps=1e-8, reduction="mean"):
    """Vector-Jacobian product: ``{"pred": (B, D), "source": (B, D)}`` for ``grad`` shaped like the loss."""
    u, v = _inputs(pred, source, eps, reduction)
    row_grad = reduce_rows_grad(grad, np.ones(u.shape[0]), reduction)[:, None]
    cos, nu, nv, denominator, clamped = _cosine(u, v, float(eps))
    c, inside = cos[:, None], clamped[:, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d_pred = np.where(inside, -v / eps, -(v / denominator[:, None] - c * u / (nu * nu)[:, None]))
        d_source = np.where(inside, -u / eps, -(u / denominator[:, None] - c * v / (nv * nv)[:, None]))
    return {"pred": row_grad * d_pred, "source": row_grad * d_source}
