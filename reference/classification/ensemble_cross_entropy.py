r"""Ensemble cross-entropy: the next-token loss of a $K$-member ensemble, by logit or probability averaging.

Paper P24 — *Pre-training under infinite compute* (Kim, Kotha, Liang, Hashimoto, arXiv 2025).

Member $k$ gives logits $Z_k \in \mathbb{R}^V$ for a token with target $y$; $t > 0$ is the
temperature. Two ways to combine the members:

**Logit mean** (``mode="logit_mean"``, the default; the authors' public evaluation code averages
member logits):

$$
z = \frac{1}{K t}\sum_{k=1}^{K} Z_k, \qquad
\ell = \log\sum_{v} e^{z_v} - z_y, \qquad
\frac{\partial \ell}{\partial Z_k} = \frac{1}{K t}\bigl(\operatorname{softmax}(z) - e_y\bigr).
$$

**Probability mean** (``mode="prob_mean"``, the mixture of the members' distributions):

$$
\log p_k(y) = \frac{Z_{k,y}}{t} - \log\sum_v e^{Z_{k,v}/t}, \qquad
\ell = -\log \frac{1}{K}\sum_{k=1}^{K} p_k(y)
     = \log K - \operatorname{logsumexp}_k \log p_k(y),
$$

$$
\frac{\partial \ell}{\partial Z_k} = \frac{r_k}{t}\bigl(\operatorname{softmax}(Z_k / t) - e_y\bigr),
\qquad r_k = \frac{p_k(y)}{\sum_{k'} p_{k'}(y)},
$$

where the responsibilities $r_k$ are the posterior over members given the target (the $1/K$
cancels). For $K = 1$ both modes are the ordinary cross-entropy of $Z_1 / t$.

Semantics
---------
- ``logits``: one stacked (K, N, V) real array, member first: ``logits[k]`` holds member *k*'s
  (N, V) logits; K >= 1, V >= 1. ``target``: (N,) integers in [0, V) or ``ignore_index``.
- ``temperature`` $t$ > 0 (finite), default 1. In ``logit_mean`` it divides the averaged logits
  (equivalently each member's: averaging is linear). In ``prob_mean`` it divides *each member's*
  logits before that member's softmax, so the loss is that of the mixture of the tempered member
  distributions; tempering the mixture itself (raising $\frac{1}{K}\sum_k p_k$ to the power
  $1/t$ and renormalising) is a different quantity and is not offered.
- ``mode``: ``"logit_mean"`` or ``"prob_mean"``. The paper's exact ensemble rule is not stated
  in its text; the public evaluation code averages logits, so that is the default.
- No class weights. Rows whose target equals ``ignore_index`` contribute loss 0 and gradient
  exactly 0 for every member (even when their logits are NaN) and are excluded from the mean.
- ``reduction``: ``"none"`` gives the (N,) per-token losses; ``"sum"`` their sum; ``"mean"``
  (default) the sum divided by the number of non-ignored tokens — NaN when every token is
  ignored or N = 0 (0/0), as ``torch.nn.functional.cross_entropy`` gives.
- Every log-sum-exp subtracts its maximum first (over classes, and over members in
  ``prob_mean``). A maximum of $-\infty$ is replaced by 0 so that an all-$-\infty$ set sums to
  $e^{-\infty} = 0$ instead of NaN.
- NaN anywhere in a non-ignored token's logits (any member) gives NaN loss and NaN gradient for
  that token, all members. ``+inf`` likewise gives NaN. ``-inf`` entries are probability-zero
  classes: in ``logit_mean`` a ``-inf`` in any member makes the averaged logit ``-inf``; in
  ``prob_mean`` it is a zero of that member's distribution only. A row of all ``-inf`` (in
  ``logit_mean`` after averaging, in ``prob_mean`` in any one member) is NaN.
- A target of probability zero gives loss ``+inf``. In ``prob_mean``, when *every* member
  gives the target probability zero the responsibilities are 0/0; they are taken as uniform,
  $r_k = 1/K$ (the limit when the members' target log-probabilities fall together), so that
  $K = 1$ keeps cross-entropy's finite gradient $\operatorname{softmax}(Z/t) - e_y$.
- Out-of-range labels raise ``ValueError`` (accelerated kernels, which cannot raise without a
  device synchronisation, return NaN for that token instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import (
    as_float_array,
    as_labels,
    check_choice,
    check_int,
    check_real,
    check_reduction,
    reduce_rows,
    reduce_rows_grad,
)

__all__ = ["ensemble_cross_entropy", "ensemble_cross_entropy_grad", "MODES"]

MODES = ("logit_mean", "prob_mean")


def _prepare(logits, target, mode, temperature, ignore_index, reduction):
    """Validated inputs: tempered logits Z/t with ignored tokens zeroed, labels (ignored -> 0),
    the mask of active tokens, and the temperature."""
    z = as_float_array(logits, "logits", 3, "(K, N, V)")
    k, n, v = z.shape
    if k < 1:
        raise ValueError(f"logits must have at least one ensemble member (K >= 1), got shape {z.shape}")
    if v < 1:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {z.shape}")
    ignore_index = check_int(ignore_index, "ignore_index")
    y = as_labels(target, "target", n, v, ignore_index)
    check_reduction(reduction)
    check_choice(mode, "mode", MODES)
    t = check_real(temperature, "temperature", low=0.0, low_open=True)
    active = y != ignore_index
    z = np.where(active[None, :, None], z, 0.0)
    return z, np.where(active, y, 0), active, t


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log sum exp over ``axis`` (kept), with the maximum subtracted; a -inf maximum counts as 0."""
    m = np.max(x, axis=axis, keepdims=True)
    shift = np.where(m == -np.inf, 0.0, m)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return shift + np.log(np.exp(x - shift).sum(axis=axis, keepdims=True))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return x - _logsumexp(x, axis=-1)


def _target_log_probs(z, y, t):
    """(K, N) member log-probabilities of the target, log p_k(y), and the (K, N, V) log-softmaxes."""
    log_p = _log_softmax(z / t)
    return log_p[:, np.arange(z.shape[1]), y], log_p


def ensemble_cross_entropy(logits, target, *, mode="logit_mean", temperature=1.0, ignore_index=-100,
                           reduction="mean"):
    """Cross-entropy of the ensemble of the K members in ``logits`` (K, N, V) against ``target`` (N,)."""
    z, y, active, t = _prepare(logits, target, mode, temperature, ignore_index, reduction)
    k, n, _ = z.shape
    if mode == "logit_mean":
        log_p = _log_softmax(z.mean(axis=0) / t)
        loss = -log_p[np.arange(n), y]
    else:
        log_py, _ = _target_log_probs(z, y, t)
        with np.errstate(invalid="ignore"):
            loss = np.log(k) - _logsumexp(log_py, axis=0)[0]
    return reduce_rows(np.where(active, loss, 0.0), active.astype(np.float64), reduction)


def ensemble_cross_entropy_grad(grad, logits, target, *, mode="logit_mean", temperature=1.0, ignore_index=-100,
                                reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d logits, a (K, N, V) array."""
    z, y, active, t = _prepare(logits, target, mode, temperature, ignore_index, reduction)
    k, n, v = z.shape
    row_grad = np.where(active, reduce_rows_grad(grad, active.astype(np.float64), reduction), 0.0)
    onehot = np.zeros((n, v))
    onehot[np.arange(n), y] = 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        if mode == "logit_mean":
            p = np.exp(_log_softmax(z.mean(axis=0) / t))
            g = (row_grad / (k * t))[:, None] * (p - onehot)
            out = np.broadcast_to(g, (k, n, v))
        else:
            log_py, log_p = _target_log_probs(z, y, t)
            total = _logsumexp(log_py, axis=0)  # (1, N)
            r = np.where(total == -np.inf, 1.0 / k, np.exp(log_py - total))  # responsibilities (K, N)
            out = (r * row_grad / t)[:, :, None] * (np.exp(log_p) - onehot)
    return np.where(active[None, :, None], out, 0.0)
