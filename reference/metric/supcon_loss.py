r"""Supervised contrastive loss (SupCon): every other sample of the anchor's class is a positive.

Paper P58 — *A Bag of Tricks for Few-Shot Class-Incremental Learning* (Roy, Park, Fahrezi, Etemad,
arXiv 2024), which uses the supervised contrastive loss of Khosla et al. (*Supervised Contrastive
Learning*, NeurIPS 2020) as its "stability" trick.

Anchors are the $N$ rows $z_i$ of the feature matrix (every view of every image: SupCon's
``contrast_mode="all"``). With temperature $\tau$, base temperature $\tau_b$, labels $y$,

$$
\ell_{ij} = \frac{z_i \cdot z_j}{\tau}, \qquad
A(i) = \{a \ne i\}, \qquad
P(i) = \{p \ne i : y_p = y_i\},
$$

$$
L_i = -\frac{\tau}{\tau_b}\,\frac{1}{|P(i)|} \sum_{p \in P(i)}
      \log \frac{e^{\ell_{ip}}}{\sum_{a \in A(i)} e^{\ell_{ia}}}
    = \frac{\tau}{\tau_b}\Bigl(\operatorname{LSE}_{a \ne i}\,\ell_{ia}
      - \frac{1}{|P(i)|}\sum_{p \in P(i)} \ell_{ip}\Bigr),
\qquad L_i = 0 \text{ if } P(i) = \emptyset .
$$

With $q_{ij} = e^{\ell_{ij}} / \sum_{a \ne i} e^{\ell_{ia}}$ ($q_{ii} = 0$), upstream gradient $g_i$
of $L_i$ (for ``"mean"``, $g_i = g / N$), and

$$
G_{ij} = \frac{g_i}{\tau_b}\Bigl(q_{ij} - \frac{[\,j \in P(i)\,]}{|P(i)|}\Bigr)
\quad (G_{ij} = 0 \text{ when } P(i) = \emptyset), \qquad
\frac{\partial L}{\partial Z} = (G + G^\top)\, Z .
$$

($\tau/\tau_b$ from the loss and $1/\tau$ from $\ell$ combine into $1/\tau_b$.) The row term
$G Z$ is the gradient through anchor $i$'s own loss, the column term $G^\top Z$ the gradient
through every other anchor that uses $z_i$ as a positive or in its denominator.

Semantics
---------
- ``features``: (N, D) real, N >= 1, D >= 1; the anchors, all views flattened into rows.
  SupContrast's ``features`` of shape (bsz, n_views, D) with ``labels`` (bsz,) is
  ``features.reshape(bsz * n_views, D)`` with ``labels.repeat_interleave(n_views)``
  (or any other order: with ``"mean"``/``"sum"`` the loss does not depend on the row order).
  Self-supervised SimCLR is the special case ``labels = sample index`` (the other views are the
  positives).
- ``labels``: (N,) integers, compared for equality only (any values, negative ones included).
- Features are used as given: the loss does **not** normalise them. SupCon expects unit rows
  (the authors normalise in the projection head); with unit rows $|\ell_{ij}| \le 1/\tau$.
- ``temperature`` $\tau$ and ``base_temperature`` $\tau_b$: finite and > 0. Defaults 0.07 and
  0.07, the authors' (HobbitLong/SupContrast) defaults, so $\tau/\tau_b = 1$ unless set apart.
  pytorch-metric-learning's ``SupConLoss`` uses $\tau = 0.1$ and no base temperature
  ($\tau_b = \tau$).
- Self-exclusion: $\ell_{ii}$ is in neither the denominator nor the positives.
- Anchors without positives (a class seen once in the batch, or N = 1) have $L_i = 0$ exactly and
  send no gradient through their own loss, but still count in the ``"mean"`` and still appear as
  negatives in every other anchor's denominator. This is the authors' current code
  (``mask_pos_pairs`` clamped to 1), which fixed the 0/0 = NaN of the original release; the FSCIL
  code the paper builds on has the same fix. N = 1 gives loss 0 and gradient 0.
- ``reduction``: ``"none"`` gives the (N,) per-anchor losses, ``"sum"`` their sum, ``"mean"``
  (default) the sum divided by N (every anchor, including those without positives).
- The log-sum-exp subtracts the row maximum over $a \ne i$ (a row with no other anchor has
  $\operatorname{LSE} = -\infty$; it has no positive either).
- Non-finite values: a NaN or $\pm\infty$ in $z_k$ makes $\ell_{ik}$ undefined or infinite for every
  $i$, so every anchor that has positives gets a NaN loss (an infinite logit minus an infinite
  maximum is NaN), or $+\infty$ when a positive's logit is $-\infty$ and the rest stay finite;
  anchors without positives keep 0. The gradient follows from the formula
  above ($0 \cdot \infty = $ NaN included), so in practice it is NaN everywhere.
- Errors: an empty batch (N = 0), D = 0, a ``labels`` length other than N, a non-finite or
  non-positive ``temperature`` or ``base_temperature`` and an unknown ``reduction`` raise
  ``ValueError`` naming the argument; non-float ``features`` or non-integer ``labels`` raise
  ``TypeError``.
- Not included: SupContrast's ``contrast_mode="one"`` (only the first view as anchors; pass
  those rows' losses with ``reduction="none"`` and average them yourself, which gives the same
  value) and an explicit ``mask`` argument (a label per row expresses every equivalence mask).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_real, check_reduction, reduce_rows, reduce_rows_grad

__all__ = ["supcon_loss", "supcon_loss_grad"]


def _inputs(features, labels, temperature, base_temperature, reduction):
    z = as_float_array(features, "features", 2, "(N, D)")
    n, d = z.shape
    if n < 1:
        raise ValueError(f"features must hold at least one row (N >= 1), got shape {z.shape}")
    if d < 1:
        raise ValueError(f"features must have at least one column (D >= 1), got shape {z.shape}")
    y = as_int_array(labels, "labels", (n,))
    tau = check_real(temperature, "temperature", low=0.0, low_open=True)
    tau_b = check_real(base_temperature, "base_temperature", low=0.0, low_open=True)
    check_reduction(reduction)
    return z, y, tau, tau_b


def _log_prob(z, y, tau):
    """Log-probabilities log q_ij over j != i (diagonal -inf), the positive mask and |P(i)|."""
    n = z.shape[0]
    others = ~np.eye(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        logits = np.where(others, (z @ z.T) / tau, -np.inf)
        m = logits.max(axis=1, keepdims=True)
        shift = np.where(m == -np.inf, 0.0, m)  # a row with no other anchor keeps LSE = -inf
        with np.errstate(divide="ignore"):
            lse = shift + np.log(np.exp(logits - shift).sum(axis=1, keepdims=True))
        log_q = logits - lse
    positive = (y[:, None] == y[None, :]) & others
    return log_q, positive, positive.sum(axis=1)


def supcon_loss(features, labels, *, temperature=0.07, base_temperature=0.07, reduction="mean"):
    """Supervised contrastive loss of Khosla et al. over the (N, D) anchors ``features``."""
    z, y, tau, tau_b = _inputs(features, labels, temperature, base_temperature, reduction)
    log_q, positive, n_pos = _log_prob(z, y, tau)
    with np.errstate(invalid="ignore"):
        mean_log_q_pos = np.where(positive, log_q, 0.0).sum(axis=1) / np.maximum(n_pos, 1)
        loss = np.where(n_pos > 0, -(tau / tau_b) * mean_log_q_pos, 0.0)
    return reduce_rows(loss, np.ones(len(loss)), reduction)


def supcon_loss_grad(grad, features, labels, *, temperature=0.07, base_temperature=0.07, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d features, (N, D)."""
    z, y, tau, tau_b = _inputs(features, labels, temperature, base_temperature, reduction)
    g = reduce_rows_grad(grad, np.ones(z.shape[0]), reduction)  # upstream gradient of each L_i
    log_q, positive, n_pos = _log_prob(z, y, tau)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.exp(log_q)
        G = (g / tau_b)[:, None] * (q - positive / np.maximum(n_pos, 1)[:, None])
        G = np.where((n_pos > 0)[:, None], G, 0.0)
        return (G + G.T) @ z
