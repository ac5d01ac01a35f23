r"""Mann–Whitney loss and exact AUC: rank every positive above every negative of its query.

Paper P46 — *Optimizing What Matters: AUC-Driven Learning for Robust Neural Retrieval*
(Sheikholeslami, Hosseini, Bechard, Daruru, Rajeswar, arXiv 2025).

For query $q$ with valid positive scores $s^+_{q,1..P_q}$ and valid negative scores
$s^-_{q,1..N_q}$, every positive is compared with every negative through the margin
$z_{qij} = (s^+_{qi} - s^-_{qj})/\tau$ and the logistic (binary cross-entropy) surrogate of the
indicator $\mathbb{1}[s^+ > s^-]$:

$$
\ell_{qij} = \operatorname{softplus}(-z_{qij}) = \log\bigl(1 + e^{-z_{qij}}\bigr) = -\log\sigma(z_{qij}),
\qquad
L_q = c_q \sum_{i=1}^{P_q}\sum_{j=1}^{N_q} \ell_{qij},
\qquad
c_q = \begin{cases} \dfrac{1}{P_q N_q} & \texttt{normalization="pairs"} \\[4pt]
                    \dfrac{1}{P_q} & \texttt{normalization="positives"} \end{cases}
$$

``"pairs"`` is the population objective of the paper's Eq. 2 (the mean over pairs, which
upper-bounds $\log 2 \cdot \mathrm{AoC}$); ``"positives"`` is the batch form of Eq. 3 (a sum over
negatives and a mean over positives). The gradients, with $\bar\sigma_{qij} = \sigma(-z_{qij})$, are

$$
\frac{\partial L_q}{\partial s^+_{qi}} = -\frac{c_q}{\tau}\sum_j \bar\sigma_{qij},
\qquad
\frac{\partial L_q}{\partial s^-_{qj}} = +\frac{c_q}{\tau}\sum_i \bar\sigma_{qij}.
$$

The metric is the Mann–Whitney statistic normalised to the area under the ROC curve, ties counted
one half:

$$
\mathrm{AUC}_q = \frac{1}{P_q N_q}\sum_{i,j}\Bigl(\mathbb{1}[s^+_{qi} > s^-_{qj}]
 + \tfrac12\,\mathbb{1}[s^+_{qi} = s^-_{qj}]\Bigr).
$$

Semantics
---------
- **Layout.** ``pos``: (Q, P) positive scores, ``neg``: (Q, N) negative scores, one row per query;
  Q, P, N >= 1 (an empty dimension raises ``ValueError``). Ragged queries use the optional boolean
  masks ``pos_mask`` (Q, P) and ``neg_mask`` (Q, N): ``True`` marks a valid entry. Masked entries
  are never read (their values, NaN included, cannot reach the result) and get gradient exactly 0.
  From lengths, build a mask as ``arange(P) < lengths[:, None]``.
- **Which pairs.** Pairs are formed *within* a query. The paper's pooled form, where every positive
  of the batch meets every negative of the batch (in-batch negatives of other queries included),
  is the one-query call ``mann_whitney_loss(pos.reshape(1, -1), neg.reshape(1, -1))``. Negatives
  shared by all queries are a (Q, N) broadcast (in PyTorch ``neg.expand(Q, N)``, which the
  accelerated kernels read through its zero stride without copying).
- ``tau`` > 0 and finite, default 0.01 (the paper's temperature on cosine scores; Eq. 3 writes no
  temperature, which is ``tau=1``).
- **Queries without pairs.** A query with no valid positive or no valid negative has no pairs: its
  loss is 0 with gradient 0 (whatever its scores), and it is left out of ``"mean"``. Its AUC is NaN
  (undefined), and it is left out of the AUC's ``"mean"``.
- **Reduction over queries.** ``"none"``: the (Q,) vector $L_q$; ``"sum"``: $\sum_q L_q$;
  ``"mean"`` (default): $\sum_q L_q / K$ with $K$ the number of queries that have at least one
  pair — NaN when $K = 0$ (0/0, as ``cross_entropy`` does when every row is ignored). The AUC takes
  ``"mean"`` (default; the macro average over queries with pairs) or ``"none"``.
- **Stable form.** $\operatorname{softplus}(-z) = \max(-z, 0) + \operatorname{log1p}(e^{-|z|})$
  and $\sigma(-z) = e^{-|z|}/(1 + e^{-|z|})$ for $z \ge 0$, $1/(1 + e^{-|z|})$ otherwise; never
  $\log(1 + e^{-z})$, which overflows at $\tau = 0.01$. Equal scores give $\ell = \log 2$, $\bar\sigma = 1/2$
  and count one half in the AUC.
- **NaN / inf.** NaN in a valid entry of a query that has pairs makes that query's loss (and so a
  mean or sum) NaN, its gradient NaN on the entries paired with it, and its AUC NaN (the AUC's
  mean too). Infinite scores follow the limits: $s^+ = +\infty$ against a finite negative gives
  $\ell = 0$, $s^+ = -\infty$ gives $\ell = +\infty$ with $\bar\sigma = 1$ (a finite gradient);
  $+\infty$ against $+\infty$ is NaN in the loss and a tie (one half) in the AUC.
- **Exactness of the AUC.** The doubled count $2U_q$ is an integer; the reference counts in
  int64 and divides once in float64.
- The AUC is an evaluation metric and has no gradient.
"""

from __future__ import annotations

import numpy as np

from .._checks import REDUCTIONS, as_float_array, check_choice, check_real

__all__ = ["mann_whitney_loss", "mann_whitney_loss_grad", "mann_whitney_auc"]

NORMALIZATIONS = ("pairs", "positives")
AUC_REDUCTIONS = ("mean", "none")


def _scores_and_masks(pos, neg, pos_mask, neg_mask):
    """Validated (Q, P) and (Q, N) float64 scores with their boolean masks."""
    pos = as_float_array(pos, "pos", 2, "(Q, P)")
    neg = as_float_array(neg, "neg", 2, "(Q, N)")
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(f"neg must have one row per query like pos ({pos.shape[0]}), got shape {neg.shape}")
    if min(pos.shape) == 0 or neg.shape[1] == 0:
        raise ValueError(f"empty input: pos has shape {pos.shape} and neg has shape {neg.shape}; "
                         "Q, P and N must all be >= 1")
    masks = []
    for mask, name, like in ((pos_mask, "pos_mask", pos), (neg_mask, "neg_mask", neg)):
        if mask is None:
            masks.append(np.ones(like.shape, dtype=bool))
            continue
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"{name} must be a boolean array (True = valid entry), got dtype {mask.dtype}")
        if mask.shape != like.shape:
            raise ValueError(f"{name} must have shape {like.shape} like {name[:3]}, got {mask.shape}")
        masks.append(mask)
    return pos, neg, masks[0], masks[1]


def _pairs(pos, neg, pos_mask, neg_mask, tau):
    """Per-pair margins z (Q, P, N), the pair mask, and each query's valid counts."""
    valid = pos_mask[:, :, None] & neg_mask[:, None, :]
    p = np.where(pos_mask, pos, 0.0)[:, :, None]  # masked values (NaN included) never reach z
    n = np.where(neg_mask, neg, 0.0)[:, None, :]
    with np.errstate(invalid="ignore"):
        z = (p - n) / tau
    return z, valid, pos_mask.sum(axis=1), neg_mask.sum(axis=1)


def _weights(n_pos, n_neg, normalization, reduction):
    """c_q times the reduction's factor: d(output)/d(sum of query q's pair losses)."""
    has_pairs = (n_pos > 0) & (n_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = 1.0 / (n_pos * n_neg) if normalization == "pairs" else 1.0 / n_pos
    c = np.where(has_pairs, c, 0.0)
    if reduction == "mean":
        k = has_pairs.sum()
        c = c / max(k, 1)
    return c, has_pairs


def _check_hyper(tau, normalization, reduction):
    tau = check_real(tau, "tau", low=0.0, low_open=True)
    check_choice(normalization, "normalization", NORMALIZATIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    return tau


def _softplus_neg(z):
    """softplus(-z) = max(-z, 0) + log1p(exp(-|z|)), overflow-free."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.maximum(-z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def _sigmoid_neg(z):
    """sigma(-z), overflow-free."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))


def mann_whitney_loss(pos, neg, pos_mask=None, neg_mask=None, *, tau=0.01, normalization="pairs",
                      reduction="mean"):
    """Mann–Whitney (MW) loss of P46: mean logistic loss of every positive-minus-negative margin of a query."""
    pos, neg, pos_mask, neg_mask = _scores_and_masks(pos, neg, pos_mask, neg_mask)
    tau = _check_hyper(tau, normalization, reduction)
    z, valid, n_pos, n_neg = _pairs(pos, neg, pos_mask, neg_mask, tau)
    pair_sums = np.where(valid, _softplus_neg(z), 0.0).sum(axis=(1, 2))
    c, has_pairs = _weights(n_pos, n_neg, normalization, "none")
    per_query = np.where(has_pairs, c * pair_sums, 0.0)
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return np.float64(per_query.sum())
    k = has_pairs.sum()
    return np.float64(per_query.sum() / k) if k > 0 else np.float64(np.nan)


def mann_whitney_loss_grad(grad, pos, neg, pos_mask=None, neg_mask=None, *, tau=0.01, normalization="pairs",
                           reduction="mean"):
    """Vector-Jacobian product: ``{"pos": (Q, P), "neg": (Q, N)}`` for the upstream ``grad``
    (shaped like the loss: (Q,) for ``reduction="none"``, a scalar otherwise)."""
    pos, neg, pos_mask, neg_mask = _scores_and_masks(pos, neg, pos_mask, neg_mask)
    tau = _check_hyper(tau, normalization, reduction)
    q = pos.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    expected = (q,) if reduction == "none" else ()
    if grad.shape != expected:
        raise ValueError(f"grad must have shape {expected} for reduction={reduction!r}, got {grad.shape}")
    z, valid, n_pos, n_neg = _pairs(pos, neg, pos_mask, neg_mask, tau)
    c, has_pairs = _weights(n_pos, n_neg, normalization, reduction)
    w = np.where(has_pairs, c * grad / tau, 0.0)  # per query: upstream x c_q x reduction factor / tau
    sig = np.where(valid, _sigmoid_neg(z) * w[:, None, None], 0.0)
    return {"pos": -sig.sum(axis=2), "neg": sig.sum(axis=1)}


def mann_whitney_auc(pos, neg, pos_mask=None, neg_mask=None, *, reduction="mean"):
    """Exact AUC of each query (Mann–Whitney U / (P N), ties one half); the mean over queries with pairs."""
    pos, neg, pos_mask, neg_mask = _scores_and_masks(pos, neg, pos_mask, neg_mask)
    check_choice(reduction, "reduction", AUC_REDUCTIONS)
    valid = pos_mask[:, :, None] & neg_mask[:, None, :]
    p, n = pos[:, :, None], neg[:, None, :]
    with np.errstate(invalid="ignore"):
        twice_u = 2 * np.count_nonzero(valid & (p > n), axis=(1, 2)) + np.count_nonzero(valid & (p == n), axis=(1, 2))
    n_pos, n_neg = pos_mask.sum(axis=1), neg_mask.sum(axis=1)
    has_pairs = (n_pos > 0) & (n_neg > 0)
    has_nan = (np.isnan(pos) & pos_mask).any(axis=1) | (np.isnan(neg) & neg_mask).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = twice_u.astype(np.float64) / (2.0 * n_pos.astype(np.float64) * n_neg.astype(np.float64))
    auc = np.where(has_pairs & ~has_nan, auc, np.nan)
    if reduction == "none":
        return auc
    k = has_pairs.sum()
    return np.float64(np.where(has_pairs, auc, 0.0).sum() / k) if k > 0 else np.float64(np.nan)
