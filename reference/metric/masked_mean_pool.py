r"""Masked mean pooling of token states into one embedding per sequence (optionally L2-normalised).

Paper P31 — *KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile Embedding
Model* (Zhao et al., arXiv 2025).

For token states $h_{bt} \in \mathbb{R}^D$ and an attention mask $m_{bt} \in \{0, 1\}$,

$$
n_b = \sum_t m_{bt}, \qquad
e_b = \frac{\sum_t m_{bt}\, h_{bt}}{\max(n_b, 1)}, \qquad
\hat e_b = \frac{e_b}{\max(\lVert e_b \rVert_2, \varepsilon)} \quad (\texttt{normalize=True}).
$$

Gradient: $\partial h_{bt} = m_{bt}\, \partial e_b / \max(n_b, 1)$, and through the normalisation
$\partial e_b = (\partial \hat e_b - \hat e_b (\hat e_b \cdot \partial \hat e_b)) / \lVert e_b \rVert$
when $\lVert e_b \rVert > \varepsilon$, else $\partial \hat e_b / \varepsilon$.

Semantics
---------
- ``hidden``: (B, T, D) real. ``mask``: (B, T) bool or integer; a nonzero entry keeps the token
  (Hugging Face's 0/1 ``attention_mask``), zero drops it. A float mask is a ``TypeError``: token
  weights are a different operation.
- Dropped tokens are never read: NaN or inf in padding does not reach the result or the gradient
  (the usual ``(h * m).sum()`` would turn a NaN in padding into a NaN embedding). NaN/inf in a kept
  token propagates to its row.
- All-masked row ($n_b = 0$, also T = 0): the count is clamped to 1, so the embedding is the zero
  vector and every token's gradient is 0 (sentence-transformers clamps the count at 1e-9, with the
  same result). With ``normalize=True`` the zero vector stays zero (divided by $\varepsilon$).
- ``normalize``: default False (plain mean pooling); True applies
  ``torch.nn.functional.normalize`` semantics with ``eps`` ($\varepsilon$ > 0, finite, default 1e-12),
  as the authors' model does before the contrastive loss.
- Empty shapes are fine: B = 0 gives a (0, D) result, D = 0 a (B, 0) result.
- Output: (B, D).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_bool, check_real

__all__ = ["masked_mean_pool", "masked_mean_pool_grad"]


def _inputs(hidden, mask, normalize, eps):
    h = as_float_array(hidden, "hidden", 3, "(B, T, D)")
    m = np.asarray(mask)
    if m.dtype != np.bool_ and m.dtype.kind not in "iu":
        raise TypeError(f"mask must be a bool or integer array (nonzero keeps a token), got dtype {m.dtype}")
    if m.shape != h.shape[:2]:
        raise ValueError(f"mask must have shape {h.shape[:2]} (B, T) to match hidden, got {m.shape}")
    check_bool(normalize, "normalize")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    return h, m != 0, eps


def _mean(h, keep):
    """Sum of the kept tokens (dropped ones never read) over max(count, 1)."""
    count = np.maximum(keep.sum(axis=1), 1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.where(keep[:, :, None], h, 0.0).sum(axis=1)
    return total / count[:, None], count


def masked_mean_pool(hidden, mask, *, normalize=False, eps=1e-12):
    """Mean of the kept token states of each sequence, (B, D); unit rows when ``normalize``."""
    h, keep, eps = _inputs(hidden, mask, normalize, eps)
    e, _ = _mean(h, keep)
    if not normalize:
        return e
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.sqrt((e * e).sum(axis=1, keepdims=True))
        return e / np.maximum(norm, eps)


def masked_mean_pool_grad(grad, hidden, mask, *, normalize=False, eps=1e-12):
    """Vector-Jacobian product: ``grad`` (B, D) times d output / d hidden, a (B, T, D) array."""
    h, keep, eps = _inputs(hidden, mask, normalize, eps)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != (h.shape[0], h.shape[2]):
        raise ValueError(f"grad must have shape {(h.shape[0], h.shape[2])}, got {grad.shape}")
    e, count = _mean(h, keep)
    d_e = grad
    if normalize:
        with np.errstate(invalid="ignore", over="ignore"):
            norm = np.sqrt((e * e).sum(axis=1, keepdims=True))
            y = e / np.maximum(norm, eps)
            # F.normalize's clamp: below eps the norm is the constant eps (NaN norms take the first branch).
            d_e = np.where(norm <= eps, grad / eps,
                           (grad - y * (y * grad).sum(axis=1, keepdims=True)) / np.maximum(norm, eps))
    return np.where(keep[:, :, None], (d_e / count[:, None])[:, None, :], 0.0)
