r"""Focal InfoNCE: contrastive loss with in-batch and hard negatives, reweighted towards hard queries.

Paper P31 — *KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile Embedding
Model* (Zhao et al., arXiv 2025).

Queries $q_i$ ($i = 1..B$), their positives $v_i$, and $H$ hard negatives $n_k$ shared by every
query. Each query scores every candidate $c = [v_1, \dots, v_B, n_1, \dots, n_H]$ (its own positive,
the other queries' positives as in-batch negatives, and the hard negatives); $p_i$ is the
probability the softmax gives query $i$'s own positive:

$$
S_{ij} = \frac{q_i \cdot c_j}{\tau}, \qquad
u_i = -\log p_i = \log \sum_{j=1}^{B+H} e^{S_{ij}} - S_{ii}, \qquad
\ell_i = (1 - p_i)^{\gamma}\, u_i = -(1 - p_i)^{\gamma} \log p_i .
$$

$\gamma = 0$ is plain InfoNCE (the loss of the authors' V1 training code); $\gamma > 0$ down-weights
queries whose positive already wins ($p_i \to 1$), as the focal loss does for easy examples.
The gradient with respect to the scores is

$$
\frac{\partial \ell_i}{\partial S_{ij}} = \kappa_i \left(\operatorname{softmax}_j(S_{i\cdot}) - [j = i]\right),
\qquad
\kappa_i = (1 - p_i)^{\gamma}\Bigl(1 + \gamma\, \frac{u_i}{e^{u_i} - 1}\Bigr),
$$

(the second term is $\gamma p_i (1-p_i)^{\gamma-1}(-\log p_i)$ rewritten so that it stays finite as
$p_i \to 1$), or $\kappa_i = (1 - p_i)^\gamma$ when the weight is detached. Then
$\partial q_i = \frac{1}{\tau}\sum_j \partial S_{ij}\, c_j$ and
$\partial c_j = \frac{1}{\tau}\sum_i \partial S_{ij}\, q_i$.

Semantics
---------
- ``query``: (B, D) real, B >= 1, D >= 1. ``positive``: (B, D), row *i* is query *i*'s positive.
  ``negatives``: (H, D) hard negatives, H >= 0, or ``None`` (H = 0). Every query sees every
  candidate: the authors' code puts all B·G passages (G = 1 positive + G − 1 mined negatives per
  query) into every row's denominator, so per-query hard negatives are passed flattened as
  (B·(G − 1), D).
- Embeddings are used as given: the loss takes raw dot products. The paper's model L2-normalises
  them first (see `masked_mean_pool` with ``normalize=True``); with unit vectors $|S_{ij}| \le 1/\tau$.
- ``temperature`` $\tau$: finite, > 0. Default 0.01, the value of the authors' training script
  (their argparse default is 0.02; sentence-transformers' scale 20 is $\tau = 0.05$).
- ``gamma`` $\gamma$: finite, >= 0; default 1.0. The paper does not state $\gamma$ and no V2 training
  code is public; 1.0 is the focal loss's mildest integer setting, 0 recovers InfoNCE exactly.
  $(1 - p)^0 = 1$, also at $p = 1$.
- ``detach_weight``: when True the focal weight $(1 - p_i)^\gamma$ is a constant in the backward
  (gradient $(1-p_i)^\gamma (\operatorname{softmax} - \text{onehot})$); default False, the gradient of
  the loss as written. The forward value does not depend on it.
- $1 - p_i$ is computed as $-\operatorname{expm1}(-u_i)$ and $u_i$ as
  $m_i + \log(e^{-m_i} + \sum_{j \ne i} e^{S_{ij} - S_{ii} - m_i})$ with $m_i = \max_j S_{ij} - S_{ii}$,
  so a confident query ($p_i \approx 1$) keeps full relative precision.
- ``reduction``: ``"none"`` gives the (B,) per-query losses, ``"sum"`` their sum, ``"mean"``
  (default) the sum over B.
- Duplicate passages across the batch are false negatives and are not removed (as in the paper).
  B = 1 without negatives has one candidate: $p = 1$, loss 0, gradient 0.
- Non-finite values: if query *i* or any candidate holds a NaN or $\pm\infty$, every score of row *i*
  is undefined and $\ell_i$ is NaN (so a non-finite candidate makes every row NaN); the gradient
  follows (NaN rows of ``query``, and NaN candidate gradients, since every candidate receives a
  term from every row).
- Errors: an empty batch (B = 0), D = 0, mismatched shapes, a non-finite or non-positive
  ``temperature`` and a negative ``gamma`` raise ``ValueError`` naming the argument; non-float
  arrays raise ``TypeError``.
- Not included (the authors' V1 code has them as options): "expanded negatives" (query–query and
  positive–positive scores appended to each row), the Matryoshka repetition over embedding prefixes,
  and gathering across devices (gather before calling).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_bool, check_real, check_reduction

__all__ = ["focal_infonce_loss", "focal_infonce_loss_grad"]


def _inputs(query, positive, negatives, temperature, gamma, detach_weight, reduction):
    q = as_float_array(query, "query", 2, "(B, D)")
    b, d = q.shape
    if b < 1:
        raise ValueError(f"query must hold at least one row (B >= 1), got shape {q.shape}")
    if d < 1:
        raise ValueError(f"query must have at least one feature (D >= 1), got shape {q.shape}")
    p = as_float_array(positive, "positive", 2, "(B, D)")
    if p.shape != q.shape:
        raise ValueError(f"positive must have the query's shape {q.shape}, got {p.shape}")
    if negatives is None:
        n = np.zeros((0, d))
    else:
        n = as_float_array(negatives, "negatives", 2, "(H, D)")
        if n.shape[1] != d:
            raise ValueError(f"negatives must have shape (H, {d}) to match query, got {n.shape}")
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    gamma = check_real(gamma, "gamma", low=0.0)
    check_bool(detach_weight, "detach_weight")
    check_reduction(reduction)
    return q, p, n, temperature, gamma


def _scores(q, candidates, temperature):
    """S = q c^T / tau, with every row that meets a non-finite value set to NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = q @ candidates.T / temperature
    s[~np.isfinite(s).all(axis=1)] = np.nan
    return s


def _neg_log_p(s):
    """u_i = lse_j S_ij - S_ii, accurate when p_i is close to 1 (see Semantics)."""
    rows = np.arange(s.shape[0])
    diff = s - s[rows, rows][:, None]  # S_ij - S_ii; 0 on the diagonal
    m = diff.max(axis=1)
    others = np.exp(diff - m[:, None])
    others[rows, rows] = 0.0
    return m + np.log1p(np.expm1(-m) + others.sum(axis=1))


def _focal_weight(u, gamma):
    """(1 - p)^gamma with 1 - p = -expm1(-u); 0^0 = 1."""
    return np.power(-np.expm1(-u), gamma)


def _reduce(rows, reduction):
    if reduction == "none":
        return rows
    return np.float64(rows.sum() if reduction == "sum" else rows.mean())


def focal_infonce_loss(query, positive, negatives=None, *, temperature=0.01, gamma=1.0, detach_weight=False,
                       reduction="mean"):
    """Focal InfoNCE of P31 with in-batch negatives and shared hard negatives."""
    q, p, n, temperature, gamma = _inputs(query, positive, negatives, temperature, gamma, detach_weight, reduction)
    s = _scores(q, np.concatenate([p, n]), temperature)
    u = _neg_log_p(s)
    return _reduce(_focal_weight(u, gamma) * u, reduction)


def focal_infonce_loss_grad(grad, query, positive, negatives=None, *, temperature=0.01, gamma=1.0,
                            detach_weight=False, reduction="mean"):
    """Vector-Jacobian product: ``{"query": (B, D), "positive": (B, D), "negatives": (H, D)}``."""
    q, p, n, temperature, gamma = _inputs(query, positive, negatives, temperature, gamma, detach_weight, reduction)
    b = q.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    expected = (b,) if reduction == "none" else ()
    if grad.shape != expected:
        raise ValueError(f"grad must have shape {expected} for reduction={reduction!r}, got {grad.shape}")
    row_grad = grad if reduction == "none" else np.full(b, float(grad) / (b if reduction == "mean" else 1))

    candidates = np.concatenate([p, n])
    s = _scores(q, candidates, temperature)
    u = _neg_log_p(s)
    weight = _focal_weight(u, gamma)
    if detach_weight or gamma == 0.0:
        coef = weight
    else:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            ratio = np.where(u == 0.0, 1.0, u / np.expm1(u))  # u / (e^u - 1) = p (-log p) / (1 - p)
        coef = weight * (1.0 + gamma * ratio)
    rows = np.arange(b)
    with np.errstate(invalid="ignore", over="ignore"):
        log_softmax = s - s[rows, rows][:, None] - u[:, None]  # S_ij - lse_i
        d_s = (row_grad * coef)[:, None] * np.exp(log_softmax)
    d_s[rows, rows] -= row_grad * coef
    d_q = d_s @ candidates / temperature
    d_c = d_s.T @ q / temperature
    return {"query": d_q, "positive": d_c[:b], "negatives": d_c[b:]}
