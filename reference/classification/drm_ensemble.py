r"""DRM's test-time ensemble: the predictions of $D$ domain-specific heads and one shared head,
combined per sample by their prediction entropy.

Paper P32 — *Domain-Specific Risk Minimization for Out-of-Distribution Generalization*
(Zhang, Wang, Liang, Zhang, Yu, Wang, Tao, Xie, KDD 2023).

For heads $h = 0, \dots, D$ (head $D$ is the shared head trained on all source domains) with
logits $z_{hb} \in \mathbb{R}^C$ for sample $b$:

$$
p_{hb} = \operatorname{softmax}(z_{hb}), \qquad
H_{hb} = \max\Bigl(-\sum_c p_{hbc} \log p_{hbc},\ 10^{-12}\Bigr).
$$

For $\gamma \ge 0$ the heads are weighted by a power of their entropy, normalised over **all**
$D + 1$ heads, and the domain heads' predictions are summed:

$$
w_{hb} = \frac{H_{hb}^{-\gamma}}{\sum_{h'=0}^{D} H_{h'b}^{-\gamma}}, \qquad
\hat y_b = \sum_{h=0}^{D-1} w_{hb}\, p_{hb}
\quad \Bigl(\text{or } \sum_{h=0}^{D} \text{ with } \texttt{include\_shared\_head\_in\_sum=True}\Bigr).
$$

For $\gamma < 0$ each sample takes the prediction of its lowest-entropy head,
$\hat y_b = p_{h^* b}$ with $h^* = \arg\min_h H_{hb}$ over all $D + 1$ heads.

Semantics
---------
- ``logits``: (D+1, B, C) real, the heads along the first axis and the **shared head last**;
  D + 1 >= 2, C >= 1, B >= 0 (an empty batch gives a (0, C) result). Output: (B, C).
- ``gamma`` (default 1.0, a finite real; the authors search {-1, 0, 0.5, 1, 5} and fix no
  default): any negative value selects the lowest-entropy head; $\gamma = 0$ weighs every head
  $1/(D+1)$.
- ``include_shared_head_in_sum=False`` (default) follows the authors' code: the shared head's
  weight is in the normaliser but its prediction is left out of the sum, so for $\gamma \ge 0$ the
  rows of $\hat y$ sum to $1 - w_{Db} < 1$ (not a distribution). ``True`` sums all heads (rows sum
  to 1). The flag does not affect $\gamma < 0$.
- Entropies are clamped below at $10^{-12}$, so a one-hot head ($H = 0$) gets a finite weight
  instead of $0^{-\gamma} = \infty$ (which makes the code's normalisation NaN); heads that all
  clamp tie. Weights are computed as $\operatorname{softmax}_h(-\gamma \log H_{hb})$, equal to the
  formula above but free of overflow at large $\gamma$. The code divides by
  $\max(\sum_h H^{-\gamma}, 10^{-12})$ (``F.normalize``); that floor only matters when every
  $H^{-\gamma} < 10^{-12}$ (e.g. $\gamma = 30$, $H > 2.5$) and is not reproduced: weights always
  sum to 1.
- The entropy is evaluated as $\log(1 + t) + \sum_c p_c\,(m - z_c)$ with $m = \max_c z_c$ and
  $t = \sum_{c \ne c^*} e^{z_c - m}$ (one maximal class $c^*$ left out), a sum of non-negative
  terms: accurate to relative precision even for nearly one-hot heads, where
  $\operatorname{lse} - \sum_c p_c z_c$ cancels.
- Ties in $\arg\min_h H_{hb}$ (duplicate heads, heads that clamp) go to the **lowest** head index.
- A NaN logit, a ``+inf`` logit or a row of ``-inf`` in any head makes that head's entropy NaN and
  the whole output row NaN (for $\gamma < 0$ too: a NaN entropy has no order). A ``-inf`` logit
  alone is a probability-zero class (it contributes 0 to the entropy).
- Not trained through: in DRM the combination only produces pseudo-labels (the arg max of its
  softmax, kept when confident) for the test-time adaptation loss, which differentiates each
  head's cross-entropy, never $\hat y$. There is therefore no gradient.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_bool, check_real

__all__ = ["drm_ensemble", "head_entropy"]

ENTROPY_FLOOR = 1e-12


def _as_logits(logits) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"logits must be a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise ValueError(f"logits must have shape (D+1, B, C), got {arr.ndim} dimensions {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"logits must stack at least 2 heads (D >= 1 domain heads and the shared head), "
                         f"got shape {arr.shape}")
    if arr.shape[2] < 1:
        raise ValueError(f"logits must have at least one class (C >= 1), got shape {arr.shape}")
    return arr.astype(np.float64)


def head_entropy(logits):
    """Softmax entropy of every head and sample, (D+1, B), before the clamp (see Semantics)."""
    z = _as_logits(logits)
    with np.errstate(invalid="ignore", over="ignore"):
        m = z.max(axis=-1, keepdims=True)
        x = z - m  # <= 0; NaN where the row holds NaN or +inf, or is all -inf
        e = np.exp(x)
        first_max = np.arange(z.shape[-1]) == np.argmax(x == 0, axis=-1)[..., None]
        t = np.where(first_max, 0.0, e).sum(axis=-1)  # sum of e^{x_c} over all classes but one maximal one
        p = e / (1.0 + t)[..., None]
        terms = np.where(e > 0, p * -x, 0.0)  # a -inf logit has p = 0 and contributes 0
        return np.log1p(t) + terms.sum(axis=-1) + np.where(np.isnan(x).any(axis=-1), np.nan, 0.0)


def drm_ensemble(logits, *, gamma=1.0, include_shared_head_in_sum=False):
    """DRM's entropy-weighted (gamma >= 0) or lowest-entropy (gamma < 0) combination of the heads."""
    z = _as_logits(logits)
    gamma = check_real(gamma, "gamma")
    include = check_bool(include_shared_head_in_sum, "include_shared_head_in_sum")
    heads = z.shape[0]
    entropy = head_entropy(z)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        entropy = np.where(entropy < ENTROPY_FLOOR, ENTROPY_FLOOR, entropy)  # NaN stays NaN
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - m)
        p = e / e.sum(axis=-1, keepdims=True)  # (D+1, B, C)
        bad = np.isnan(entropy).any(axis=0)  # (B,)
        if gamma < 0:
            pick = np.argmin(np.where(np.isnan(entropy), np.inf, entropy), axis=0)  # first minimum
            out = np.take_along_axis(p, pick[None, :, None], axis=0)[0]
        else:
            log_w = -gamma * np.log(entropy)
            w = np.exp(log_w - log_w.max(axis=0, keepdims=True))
            w = w / w.sum(axis=0, keepdims=True)
            summed = heads if include else heads - 1
            out = (w[:summed, :, None] * p[:summed]).sum(axis=0)
        return np.where(bad[:, None], np.nan, out)
