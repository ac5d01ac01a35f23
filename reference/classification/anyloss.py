r"""AnyLoss: a confusion-matrix metric turned into a differentiable loss.

Paper P6 — *AnyLoss: Transforming Classification Metrics into Loss Functions* (Doheon Han, Nuno Moniz,
Nitesh V. Chawla, KDD 2024).

A binary classifier outputs probabilities $p_i \in [0, 1]$ for targets $y_i \in \{0, 1\}$,
$i = 1 \dots N$. The *approximation function* pushes each probability towards 0 or 1 with an
amplifying scale $L$:

$$
a_i = \sigma\big(L\,(p_i - \tfrac12)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}},
$$

and the soft confusion matrix of the batch is

$$
\mathrm{TP} = \sum_i y_i a_i, \quad \mathrm{FN} = \sum_i y_i (1 - a_i), \quad
\mathrm{FP} = \sum_i (1 - y_i) a_i, \quad \mathrm{TN} = \sum_i (1 - y_i)(1 - a_i),
$$

with $Y_1 = \sum_i y_i$ positives and $Y_0 = N - Y_1$ negatives. The loss is $1 - M$ for a
metric $M$, with the smoothing $s$ in its denominator:

$$
F_\beta = \frac{(1 + \beta^2)\,\mathrm{TP}}{\beta^2 Y_1 + \mathrm{TP} + \mathrm{FP} + s}, \qquad
G = \frac{\mathrm{TP}\cdot\mathrm{TN}}{Y_1 Y_0 + s},
$$

$$
\mathrm{BAcc} = \frac{Y_0\,\mathrm{TP} + Y_1\,\mathrm{TN}}{2\,Y_1 Y_0 + s}, \qquad
\mathrm{Acc} = \frac{\mathrm{TP} + \mathrm{TN}}{N},
$$

chosen by ``metric="f_beta"`` ($F_\beta$; soft Dice at $\beta = 1$), ``"g_mean"`` ($G$ = TPR · TNR,
the squared G-mean, as in the authors' code), ``"balanced_accuracy"`` and ``"accuracy"``.

Gradient: $\partial\,\mathrm{loss} / \partial p_i = -\,\frac{\partial M}{\partial a_i}\, L\, a_i (1 - a_i)$ with

$$
\frac{\partial F_\beta}{\partial a_i} = (1 + \beta^2)\,\frac{y_i D - \mathrm{TP}}{D^2},\;
D = \beta^2 Y_1 + \mathrm{TP} + \mathrm{FP} + s; \qquad
\frac{\partial G}{\partial a_i} = \frac{y_i\,\mathrm{TN} - (1 - y_i)\,\mathrm{TP}}{Y_1 Y_0 + s};
$$

$$
\frac{\partial\,\mathrm{BAcc}}{\partial a_i} = \frac{y_i Y_0 - (1 - y_i) Y_1}{2\,Y_1 Y_0 + s}; \qquad
\frac{\partial\,\mathrm{Acc}}{\partial a_i} = \frac{2 y_i - 1}{N}.
$$

Semantics
---------
- ``probs``: floating-point (N,) probabilities (sigmoid outputs, not logits), or (N, K) for K independent binary
  tasks (multilabel): every column is its own batch of N samples with its own confusion matrix and
  loss. N >= 1 and K >= 1; an empty batch raises ``ValueError``.
- ``target``: the same shape as ``probs``, integer, bool or floating, every entry exactly 0 or 1
  (anything else, NaN included, raises ``ValueError``; the accelerated kernels, which cannot raise
  without a device synchronisation, return NaN for that column instead).
- Values of ``probs`` outside [0, 1] are accepted and used as they are ($a_i$ is defined for any
  real $p_i$); they are not clipped. $a_i$ and $1 - a_i$ are both evaluated as sigmoids
  ($1 - a_i = \sigma(-L(p_i - \frac12))$), so neither loses precision where the other is close to 1.
- ``metric``: ``"f_beta"`` (default), ``"g_mean"``, ``"balanced_accuracy"``, ``"accuracy"``.
  ``beta`` >= 0 (default 1, the F1 score; ``beta = 0`` is the soft precision) is used by
  ``"f_beta"`` only. ``amplifier`` is $L$ > 0 (default 73, the value of the authors' experiments;
  their later notes suggest 2 to 70). ``smoothing`` is $s$ >= 0 (default 1e-5, as in the authors'
  code), added to the denominators of $F_\beta$, $G$ and BAcc; accuracy divides by $N$ and needs none.
- $N$ is the actual number of rows. The authors' Keras code uses a global ``batch`` constant for
  $N$ (in $Y_0$ and TN), which is wrong on a short last batch; here the batch itself gives $N$.
- The confusion entries are the four sums above; they equal the authors'
  $\mathrm{FP} = S - \mathrm{TP}$, $\mathrm{TN} = N - Y_1 - S + \mathrm{TP}$ ($S = \sum_i a_i$),
  without the cancellation of that form.
- Single-class batches: with $Y_1 = 0$ or $Y_0 = 0$, $G$ and BAcc are $0 / s = 0$ (loss 1,
  gradient 0 where the metric is constant); $F_\beta$ with $Y_1 = 0$ is 0 (loss 1). With
  ``smoothing = 0`` those cases are $0/0$ = NaN, the mathematical value.
- ``reduction`` over the K per-column losses: ``"none"`` gives the (K,) losses (a 0-d scalar for
  1-D ``probs``), ``"sum"`` their sum, ``"mean"`` (default) their mean. For 1-D ``probs`` all
  three give the one loss.
- NaN in ``probs`` makes the loss of its column NaN, and its whole gradient column NaN (for every
  metric, also where $\partial M / \partial a_i$ does not involve the sums). ``+inf`` / ``-inf`` give $a_i = 1$ / $0$ and
  a zero gradient at that entry.
- The gradient vanishes where $|p_i - \frac12| \gg 1/L$; that is the approximation's design.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_choice, check_real, check_reduction

__all__ = ["anyloss", "anyloss_grad", "METRICS"]

METRICS = ("f_beta", "g_mean", "balanced_accuracy", "accuracy")


def _prepare(probs, target, metric, beta, amplifier, smoothing, reduction):
    p = np.asarray(probs)
    if p.dtype.kind != "f":
        raise TypeError(f"probs must be a floating-point array of probabilities, got dtype {p.dtype}")
    if p.ndim not in (1, 2):
        raise ValueError(f"probs must have shape (N,) or (N, K), got {p.ndim} dimensions {p.shape}")
    if p.shape[0] < 1 or (p.ndim == 2 and p.shape[1] < 1):
        raise ValueError(f"probs must hold at least one sample (N >= 1) and one column, got shape {p.shape}")
    y = np.asarray(target)
    if y.dtype.kind not in "fiub":
        raise TypeError(f"target must be an array of 0/1 labels, got dtype {y.dtype}")
    if y.shape != p.shape:
        raise ValueError(f"target must have the shape of probs {p.shape}, got {y.shape}")
    y = y.astype(np.float64)
    bad = (y != 0.0) & (y != 1.0)
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise ValueError(f"target{list(i)} = {y[i]!r}: every target must be 0 or 1")
    check_choice(metric, "metric", METRICS)
    beta = check_real(beta, "beta", low=0.0)
    amplifier = check_real(amplifier, "amplifier", low=0.0, low_open=True)
    smoothing = check_real(smoothing, "smoothing", low=0.0)
    check_reduction(reduction)
    p = p.astype(np.float64)
    one_d = p.ndim == 1
    if one_d:
        p, y = p[:, None], y[:, None]
    return p, y, beta, amplifier, smoothing, one_d


def _sigmoid_pair(z):
    """$\\sigma(z)$ and $1 - \\sigma(z) = \\sigma(-z)$, both without overflow or cancellation."""
    e = np.exp(-np.abs(z))
    with np.errstate(invalid="ignore"):
        big, small = 1.0 / (1.0 + e), e / (1.0 + e)
    positive = z >= 0
    return np.where(positive, big, small), np.where(positive, small, big)


def _confusion(p, y, amplifier):
    """Per column: a, 1 - a and the soft confusion matrix (TP, FN, FP, TN) with Y1, Y0, N."""
    with np.errstate(over="ignore", invalid="ignore"):
        a, a_bar = _sigmoid_pair(amplifier * (p - 0.5))
        tp = (y * a).sum(axis=0)
        fn = (y * a_bar).sum(axis=0)
        fp = ((1 - y) * a).sum(axis=0)
        tn = ((1 - y) * a_bar).sum(axis=0)
    n = float(p.shape[0])
    y1 = y.sum(axis=0)
    return a, a_bar, dict(tp=tp, fn=fn, fp=fp, tn=tn, y1=y1, y0=n - y1, n=n)


def _metric(c, metric, beta, s):
    tp, fp, tn, y1, y0 = c["tp"], c["fp"], c["tn"], c["y1"], c["y0"]
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "f_beta":
            return (1 + beta**2) * tp / (beta**2 * y1 + tp + fp + s)
        if metric == "g_mean":
            return tp * tn / (y1 * y0 + s)
        if metric == "balanced_accuracy":
            return (y0 * tp + y1 * tn) / (2 * y1 * y0 + s)
        return (tp + tn) / c["n"]


def _metric_grad(c, y, metric, beta, s):
    """$\\partial M / \\partial a_i$ for every entry, (N, K)."""
    tp, fp, tn, y1, y0 = c["tp"], c["fp"], c["tn"], c["y1"], c["y0"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if metric == "f_beta":
            d = beta**2 * y1 + tp + fp + s
            out = (1 + beta**2) * (y * d - tp) / d**2
        elif metric == "g_mean":
            out = (y * tn - (1 - y) * tp) / (y1 * y0 + s)
        elif metric == "balanced_accuracy":
            out = (y * y0 - (1 - y) * y1) / (2 * y1 * y0 + s)
        else:
            out = (2 * y - 1) / c["n"]
        return out + 0.0 * tp  # 0 * TP: a column holding a NaN gets a NaN gradient throughout


def _reduce(losses, reduction, one_d):
    if reduction == "none":
        return np.float64(losses[0]) if one_d else losses
    return np.float64(losses.sum() if reduction == "sum" else losses.mean())


def anyloss(probs, target, *, metric="f_beta", beta=1.0, amplifier=73.0, smoothing=1e-5, reduction="mean"):
    """AnyLoss $1 - M$ of P6 for the metric $M$ named by ``metric``, per column of ``probs``, reduced."""
    p, y, beta, amplifier, s, one_d = _prepare(probs, target, metric, beta, amplifier, smoothing, reduction)
    _, _, c = _confusion(p, y, amplifier)
    return _reduce(1.0 - _metric(c, metric, beta, s), reduction, one_d)


def anyloss_grad(grad, probs, target, *, metric="f_beta", beta=1.0, amplifier=73.0, smoothing=1e-5,
                 reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d probs, shaped like ``probs``."""
    p, y, beta, amplifier, s, one_d = _prepare(probs, target, metric, beta, amplifier, smoothing, reduction)
    k = p.shape[1]
    g = np.asarray(grad, dtype=np.float64)
    want = (k,) if reduction == "none" and not one_d else ()
    if g.shape != want:
        raise ValueError(f"grad must have shape {want} for reduction={reduction!r}, got {g.shape}")
    column_grad = np.broadcast_to(g / k if reduction == "mean" else g, (k,))  # d reduced / d loss_k
    a, a_bar, c = _confusion(p, y, amplifier)
    with np.errstate(invalid="ignore", over="ignore"):
        out = -column_grad * _metric_grad(c, y, metric, beta, s) * amplifier * a * a_bar
    return out[:, 0] if one_d else out
