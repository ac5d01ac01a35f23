r"""Per-sample weighted cross-entropy that also returns each sample's prediction statistics.

Paper P55 — *Learning from Noisy Labels via Self-Taught On-the-Fly Meta Loss Rescaling*
(Heck, Geishauser, Lubis, van Niekerk, Feng, Lin, Ruppik, Vukovic, Gašić, AAAI 2025).

STORM rescales each sample's loss by a weight $w_i$ that a small network computes from features of
the model's own prediction for that sample. This is the primitive under it: one pass over the
logits gives the weighted loss *and* the per-sample features. For logits $z_i \in \mathbb{R}^C$,
label $y_i$, $\operatorname{lse}_i = \log \sum_k e^{z_{ik}}$ and $p_i = \operatorname{softmax}(z_i)$,

$$
\ell_i = \operatorname{lse}_i - z_{i y_i}, \qquad
L = \frac{1}{D} \sum_{i \in A} w_i\, \ell_i, \qquad
D = \begin{cases} |A| & \text{mean} \\ \sum_{i \in A} w_i & \text{normalized} \\ 1 & \text{sum} \end{cases}
$$

where $A$ is the set of rows whose label is not ``ignore_index``, with the statistics

$$
H_i = -\sum_k p_{ik}\,(z_{ik} - \operatorname{lse}_i), \quad
\max_k p_{ik}, \quad
p_{i y_i}, \quad
\text{margin}_i = p_{i y_i} - \max_{k \ne y_i} p_{ik}.
$$

Gradients: $\partial L / \partial z_i = (w_i / D)\,(p_i - e_{y_i})$; for the mean and the sum
$\partial L / \partial w_i = \ell_i / D$, for the normalized loss
$\partial L / \partial w_i = (\ell_i - L) / D$.

Semantics
---------
- ``logits``: (N, C) real, C >= 1. ``target``: (N,) integers in [0, C) or ``ignore_index``
  (default -100). ``sample_weight``: (N,) real per-sample weights (any sign; the paper's are
  non-negative). Class weights are not part of this loss: fold them into ``sample_weight``.
- Returns the tuple ``(loss, entropy, max_prob, label_prob, margin)``. ``loss`` follows
  ``reduction``; the four statistics are always (N,) and carry no gradient (they are features
  for a weighting rule, computed from the same pass; detach them in your own code as well if
  you compute them elsewhere).
- ``reduction``: ``"mean"`` (default) $\sum_A w_i \ell_i / |A|$, the code-typical form
  ("the mean over the batch") with ignored rows removed from both sums; ``"normalized"``
  $\sum_A w_i \ell_i / \sum_A w_i$; ``"sum"``; ``"none"`` the (N,) values $w_i \ell_i$ (0 on
  ignored rows). An empty average is 0, not NaN: ``"mean"`` with every row ignored and
  ``"normalized"`` with $\sum_A w_i = 0$ (e.g. all weights zero) return 0 with zero gradients,
  so a batch the weighting rule switches off entirely contributes nothing to training.
- Entropy uses the convention $0 \log 0 = 0$: it is computed as $-\sum_k p_k (z_k - \operatorname{lse})$
  with the terms of $p_k = 0$ classes (``-inf`` logits) dropped. ``margin`` is in probabilities,
  in $[-1, 1]$, positive exactly when the label is the unique most likely class; with C = 1 there
  is no other class and the margin is $p_y = 1$.
- Ignored rows: loss 0, gradient exactly 0 for their logits and weight (even when those are NaN),
  and all four statistics 0.
- NaN or ``+inf`` anywhere in a non-ignored row gives NaN loss and NaN statistics for that row
  (and a NaN gradient row); ``-inf`` entries are probability-zero classes (a ``-inf`` label logit
  gives an infinite loss). An all ``-inf`` row is NaN.
- Out-of-range labels raise ``ValueError`` (accelerated kernels, which cannot raise without a
  device synchronisation, return NaN for that row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_choice, row_loss_inputs

__all__ = ["weighted_ce_with_stats", "weighted_ce_with_stats_grad", "REDUCTIONS"]

REDUCTIONS = ("none", "mean", "normalized", "sum")


def _prepare(logits, target, sample_weight, ignore_index, reduction):
    z, y, active = row_loss_inputs(logits, target, ignore_index, "none")
    w = as_float_array(sample_weight, "sample_weight", 1, "(N,)")
    if w.shape != (z.shape[0],):
        raise ValueError(f"sample_weight must have shape ({z.shape[0]},) to match logits, got {w.shape}")
    check_choice(reduction, "reduction", REDUCTIONS)
    return z, y, active, np.where(active, w, 0.0)


def _rows(z, y, active):
    """Per-row cross-entropy, log-probabilities and probabilities (ignored rows hold zeros)."""
    m = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    rows = np.arange(z.shape[0])
    ce = np.where(active, -log_p[rows, y], 0.0)
    return ce, log_p, np.exp(log_p)


def _denominator(active, w, reduction) -> float:
    """D of the module docstring; 0 marks an empty average (the loss is then 0)."""
    if reduction == "mean":
        return float(active.sum())
    if reduction == "normalized":
        return float(w.sum())
    return 1.0


def weighted_ce_with_stats(logits, target, sample_weight, *, ignore_index=-100, reduction="mean"):
    """Weighted cross-entropy and the per-sample ``(entropy, max_prob, label_prob, margin)``."""
    z, y, active, w = _prepare(logits, target, sample_weight, ignore_index, reduction)
    ce, log_p, p = _rows(z, y, active)
    rows = np.arange(z.shape[0])
    with np.errstate(invalid="ignore"):
        weighted = np.where(active, w * ce, 0.0)
        entropy = -np.where(p == 0.0, 0.0, p * log_p).sum(axis=1)
        max_prob = p.max(axis=1, initial=-np.inf)
        label_prob = p[rows, y]
        others = np.where(np.arange(z.shape[1]) == y[:, None], -np.inf, p).max(axis=1, initial=-np.inf)
        margin = label_prob - np.maximum(others, 0.0)
    stats = [np.where(active, s, 0.0) for s in (entropy, max_prob, label_prob, margin)]
    if reduction == "none":
        loss = weighted
    else:
        d = _denominator(active, w, reduction)
        loss = np.float64(weighted.sum() / d) if d != 0.0 else np.float64(0.0)
    return (loss, *stats)


def weighted_ce_with_stats_grad(grad, logits, target, sample_weight, *, ignore_index=-100, reduction="mean"):
    """Vector-Jacobian product of the loss (the first output): ``{"logits": (N, C), "sample_weight": (N,)}``."""
    z, y, active, w = _prepare(logits, target, sample_weight, ignore_index, reduction)
    ce, _, p = _rows(z, y, active)
    n, c = z.shape
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (n,):
            raise ValueError(f"grad must have shape ({n},) for reduction='none', got {grad.shape}")
        r = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        d = _denominator(active, w, reduction)
        r = np.full(n, float(grad) / d if d != 0.0 else 0.0)
    with np.errstate(invalid="ignore"):
        d_logits = np.where(active[:, None], (r * w)[:, None] * (p - np.eye(c)[y]), 0.0)
        d_weight = r * ce
        if reduction == "normalized" and _denominator(active, w, reduction) != 0.0:
            loss = weighted_ce_with_stats(logits, target, sample_weight, ignore_index=ignore_index,
                                          reduction=reduction)[0]
            d_weight = r * (ce - loss)
    return {"logits": d_logits, "sample_weight": np.where(active, d_weight, 0.0)}
