r"""UNPG: margin-softmax face-recognition loss with filtered in-batch negative pairs.

Paper P50 — *Unified Negative Pair Generation toward Well-discriminative Feature Space for Face
Recognition* (Jung, Lee, Oh, Park, Park, Son, arXiv 2203.11593, 2022).

Embeddings $X \in \mathbb{R}^{B \times D}$, labels $y \in \{0, \dots, C-1\}^B$ and class centres
(the classifier weight) $W \in \mathbb{R}^{C \times D}$ are normalised row-wise,
$\hat x_i = x_i / \max(\lVert x_i \rVert, \epsilon)$, $\hat w_j = w_j / \max(\lVert w_j \rVert, \epsilon)$,
and $\cos_{ij} = \hat x_i \cdot \hat w_j$. The target column carries the margin

$$
t_i = \begin{cases}
  \cos\!\big(\arccos(\bar c_i) + m\big), \quad \bar c_i = \operatorname{clamp}(\cos_{i y_i}, -1 + \delta, 1 - \delta) & \text{ArcFace} \\[2pt]
  \cos_{i y_i} - m & \text{CosFace}
\end{cases}
\qquad z_{ij} = s \cos_{ij}\ (j \ne y_i), \quad z_{i y_i} = s\, t_i .
$$

The in-batch **negative pairs** are the cosines $n_{pq} = \hat x_p \cdot \hat x_q$ of the pairs
$p < q$ with $y_p \ne y_q$ ($L$ values). They are sorted ascending, $\tilde n_0 \le \dots \le \tilde n_{L-1}$,
and filtered with a box-and-whisker rule (no interpolation, 0-based indices):

$$
Q_1 = \tilde n_{\lfloor L/4 \rfloor}, \quad Q_3 = \tilde n_{\lfloor 3L/4 \rfloor}, \quad
\mathcal N' = \{(p, q) : Q_1 - w\,(Q_3 - Q_1) \le n_{pq} \le Q_3 + w\,(Q_3 - Q_1)\}.
$$

Every kept pair becomes an extra negative logit $s\,n_{pq}$ shared by **all** rows:

$$
\ell_i = -z_{i y_i} + \log\Big(\sum_{j=0}^{C-1} e^{z_{ij}} + E\Big), \qquad E = \sum_{(p,q) \in \mathcal N'} e^{s\, n_{pq}} .
$$

The thresholds carry no gradient; the kept similarities do, to both embeddings of the pair: for an
upstream gradient $g$ on the rows,
$\partial (\sum_i g_i \ell_i) / \partial n_{pq} = s\, e^{s n_{pq}} \sum_i g_i\, e^{-\mathrm{lse}_i}$, where
$\mathrm{lse}_i$ is the logarithm of row $i$'s denominator.

Semantics
---------
- ``embeddings``: (B, D) real, B >= 1, D >= 1. ``labels``: (B,) integers in [0, C).
  ``weight``: (C, D) real class centres, C >= 1. Gradients flow to ``embeddings`` and ``weight``;
  labels only pick the target column and the negative pairs.
- ``margin_type``: ``"arcface"`` (default) or ``"cosface"``. Defaults from the authors' code
  (``head.zoo.yaml``): ``scale`` s = 64, ``margin`` m = 0.5 for both heads (CosFace papers usually
  use m = 0.35 to 0.4; pass it explicitly), ``whisker`` w = 1.5 (their K-FACE runs use 1.0).
  ``scale`` > 0, ``margin`` >= 0, ``whisker`` >= 0, ``eps`` > 0, all finite.
- Normalisation is ``torch.nn.functional.normalize``'s: divide by ``max(norm, eps)``. A row with
  norm <= ``eps`` (a zero row) is divided by ``eps`` and its gradient is ``g / eps`` (no
  projection); otherwise the gradient is $(I - \hat x \hat x^\top)\, g / \lVert x \rVert$.
- ArcFace clamp: the target cosine is clamped to $[-1 + \delta, 1 - \delta]$ with
  $\delta = 2^{-20} \approx 9.5 \times 10^{-7}$ before the arc-cosine (the authors' code has no
  clamp and turns rounding past $\pm 1$ into NaN). $\delta$ is exactly representable in float32,
  so float32 kernels clamp to the same value. The clamp's gradient is torch's: the margin factor
  $\partial t / \partial \cos = \sin(\theta + m) / \sin\theta$ applies strictly inside the bounds
  and is 0 at or beyond them (where $\sin\theta \to 0$ would make it unbounded). There is no
  "easy margin" fallback: $\theta + m > \pi$ gives $\cos(\theta + m)$ as it is, as in the code.
  CosFace has no clamp.
- Negative pairs are the strict upper triangle ($p < q$) of the batch's cosine matrix, label
  differing; a pair with two identical embeddings of different labels counts. Ties do not matter:
  the filter is value based and $Q_1$, $Q_3$ are values of the sorted list. The bounds are
  inclusive. Because $Q_1 \le n \le Q_3$ always passes, $E > 0$ whenever $L \ge 1$. A cosine
  within rounding of a bound may be kept by one implementation and dropped by another (the kernels
  compute the cosines in float32, this reference in float64): the filter is discontinuous there.
  With D = 1 every cosine is $\pm 1$ and such ties are the rule.
- Single-device semantics: the authors' multi-GPU path stacks one copy of the kept list per device
  (a shape bug with more than one GPU); here the batch is the one passed in.
- No negative pair ($L = 0$: B = 1, or every label equal): $E = 0$ and the loss is the plain
  margin softmax (the authors' code fails on an empty list).
- ``reduction``: ``"mean"`` (default, the code's ``CrossEntropyLoss``) divides the sum by B;
  ``"sum"``; ``"none"`` gives the (B,) row losses.
- NaN/inf: a NaN or infinite embedding entry makes its normalised row NaN; any NaN negative-pair
  cosine makes $E$ NaN and so every row's loss NaN (the filter has no defined order then); a
  NaN row with no negative partner only poisons its own loss. NaN in ``weight`` reaches every row.
- Empty batches, empty class sets and D = 0 raise ``ValueError``; labels outside [0, C) raise
  ``ValueError`` (accelerated kernels return NaN for that row instead, since checking values would
  synchronise the device).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_choice, check_real, check_reduction

__all__ = ["unpg_margin_softmax_loss", "unpg_margin_softmax_loss_grad", "ARCFACE_CLAMP"]

MARGIN_TYPES = ("arcface", "cosface")
ARCFACE_CLAMP = 2.0**-20  # delta: the target cosine is clamped to [-1 + delta, 1 - delta]


def _prepare(embeddings, labels, weight, margin_type, scale, margin, whisker, eps, reduction):
    x = as_float_array(embeddings, "embeddings", 2, "(B, D)")
    w = as_float_array(weight, "weight", 2, "(C, D)")
    b, d = x.shape
    if b < 1:
        raise ValueError(f"embeddings must hold at least one row (B >= 1), got shape {x.shape}")
    if d < 1:
        raise ValueError(f"embeddings must have at least one feature (D >= 1), got shape {x.shape}")
    if w.shape[0] < 1:
        raise ValueError(f"weight must hold at least one class centre (C >= 1), got shape {w.shape}")
    if w.shape[1] != d:
        raise ValueError(f"weight must have shape (C, {d}) to match embeddings, got {w.shape}")
    y = as_int_array(labels, "labels", (b,))
    bad = (y < 0) | (y >= w.shape[0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels[{i}] = {y[i]} is out of range: class indices must lie in [0, {w.shape[0]})")
    check_choice(margin_type, "margin_type", MARGIN_TYPES)
    hyper = dict(
        scale=check_real(scale, "scale", low=0.0, low_open=True),
        margin=check_real(margin, "margin", low=0.0),
        whisker=check_real(whisker, "whisker", low=0.0),
        eps=check_real(eps, "eps", low=0.0, low_open=True),
    )
    check_reduction(reduction)
    return x, y, w, hyper


def _normalize(a: np.ndarray, eps: float):
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return a / np.maximum(norm, eps), norm


def _normalize_grad(g: np.ndarray, a_hat: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    """Backward of ``a / max(||a||, eps)``: a projection where the norm is above eps, a plain scale below."""
    with np.errstate(invalid="ignore", divide="ignore"):
        projected = (g - a_hat * np.sum(a_hat * g, axis=1, keepdims=True)) / norm
        return np.where(norm > eps, projected, g / eps)


def _target(c: np.ndarray, margin_type: str, m: float):
    """Margin target t(c) and dt/dc."""
    if margin_type == "cosface":
        return c - m, np.ones_like(c)
    lo, hi = -1.0 + ARCFACE_CLAMP, 1.0 - ARCFACE_CLAMP
    with np.errstate(invalid="ignore"):
        theta = np.arccos(np.clip(c, lo, hi))
        inside = (c > lo) & (c < hi)
        dt = np.where(inside, np.sin(theta + m) / np.sin(theta), 0.0)
    return np.cos(theta + m), np.where(np.isnan(c), np.nan, dt)


def _negative_pairs(y: np.ndarray):
    """Indices (p, q), p < q, of the pairs with different labels."""
    p, q = np.triu_indices(len(y), k=1)
    keep = y[p] != y[q]
    return p[keep], q[keep]


def _box_and_whisker(n: np.ndarray, whisker: float) -> np.ndarray:
    """Mask of the values kept by the box-and-whisker rule (``Q1 = sorted[L // 4]``, ``Q3 = sorted[3L // 4]``)."""
    length = len(n)
    ordered = np.sort(n)
    q1, q3 = ordered[length // 4], ordered[(3 * length) // 4]
    iqr = q3 - q1
    return (n >= q1 - whisker * iqr) & (n <= q3 + whisker * iqr)


def _forward(x, y, w, margin_type, hyper):
    s, eps = hyper["scale"], hyper["eps"]
    x_hat, x_norm = _normalize(x, eps)
    w_hat, w_norm = _normalize(w, eps)
    rows = np.arange(len(y))
    cos = x_hat @ w_hat.T
    t, dt = _target(cos[rows, y], margin_type, hyper["margin"])
    z = s * cos
    z[rows, y] = s * t
    p, q = _negative_pairs(y)
    n = np.sum(x_hat[p] * x_hat[q], axis=1)
    if len(n) == 0:
        log_e, kept = -np.inf, np.zeros(0, dtype=bool)
    elif np.isnan(n).any():
        log_e, kept = np.nan, np.zeros(len(n), dtype=bool)
    else:
        kept = _box_and_whisker(n, hyper["whisker"])
        sn = s * n[kept]
        log_e = sn.max() + np.log(np.sum(np.exp(sn - sn.max())))
    # Row log-sum-exp over the C class logits and the shared log E.
    with np.errstate(invalid="ignore", over="ignore"):
        zmax = np.maximum(z.max(axis=1), log_e)
        lse = zmax + np.log(np.sum(np.exp(z - zmax[:, None]), axis=1) + np.exp(log_e - zmax))
    return dict(x_hat=x_hat, x_norm=x_norm, w_hat=w_hat, w_norm=w_norm, z=z, lse=lse, dt=dt,
                rows=rows, p=p, q=q, n=n, kept=kept, log_e=log_e, loss=lse - z[rows, y])


def unpg_margin_softmax_loss(embeddings, labels, weight, *, margin_type="arcface", scale=64.0, margin=0.5,
                             whisker=1.5, eps=1e-12, reduction="mean"):
    """UNPG loss (P50): ArcFace/CosFace margin softmax over the class centres plus the filtered
    in-batch negative pairs as shared extra logits."""
    x, y, w, hyper = _prepare(embeddings, labels, weight, margin_type, scale, margin, whisker, eps, reduction)
    loss = _forward(x, y, w, margin_type, hyper)["loss"]
    if reduction == "none":
        return loss
    return np.float64(loss.sum() if reduction == "sum" else loss.mean())


def unpg_margin_softmax_loss_grad(grad, embeddings, labels, weight, *, margin_type="arcface", scale=64.0,
                                  margin=0.5, whisker=1.5, eps=1e-12, reduction="mean"):
    """Vector-Jacobian product: ``{"embeddings": (B, D), "weight": (C, D)}`` for the upstream ``grad``
    (shaped like the loss)."""
    x, y, w, hyper = _prepare(embeddings, labels, weight, margin_type, scale, margin, whisker, eps, reduction)
    b = len(y)
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (b,):
            raise ValueError(f"grad must have shape ({b},) for reduction='none', got {grad.shape}")
        g = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        g = np.full(b, float(grad) / (b if reduction == "mean" else 1))
    f = _forward(x, y, w, margin_type, hyper)
    s, rows = hyper["scale"], f["rows"]
    with np.errstate(invalid="ignore", over="ignore"):
        prob = np.exp(f["z"] - f["lse"][:, None])
        dz = g[:, None] * prob
        dz[rows, y] -= g
        dcos = s * dz
        dcos[rows, y] *= f["dt"]
        dx_hat = dcos @ f["w_hat"]
        dw_hat = dcos.T @ f["x_hat"]
        if len(f["n"]):
            # dL/dn_k = s exp(s n_k) sum_i g_i exp(-lse_i), written with log E to stay finite.
            row_factor = np.sum(g * np.exp(f["log_e"] - f["lse"]))
            sn = s * f["n"]
            dn = np.where(f["kept"], s * row_factor * np.exp(sn - f["log_e"]), 0.0)
            if np.isnan(f["log_e"]):
                dn = np.full_like(sn, np.nan)
            pair_grad = np.zeros((b, b))  # dL/dS for the cosine matrix S = x_hat x_hat^T, upper triangle
            pair_grad[f["p"], f["q"]] = dn
            dx_hat += (pair_grad + pair_grad.T) @ f["x_hat"]
    eps = hyper["eps"]
    return {
        "embeddings": _normalize_grad(dx_hat, f["x_hat"], f["x_norm"], eps),
        "weight": _normalize_grad(dw_hat, f["w_hat"], f["w_norm"], eps),
    }

