r"""Self-training objective: cross-entropy on labelled rows plus a weighted cross-entropy of the
unlabelled rows against their own hard predictions (pseudo-labels).

Paper P28 — *Out-Of-Domain Unlabeled Data Improves Generalization* (Saberi, Najafi, Heidari,
Movasaghinia, Motahari, Khalaj, ICLR 2024).

The paper's estimator minimises, over $m$ labelled samples $(x_i, y_i)$ and $n$ unlabelled samples
$x'_j$, $\frac{1}{m}\sum_i \phi_\gamma(x_i, y_i) + \frac{\lambda}{n} \sum_j \phi_{\gamma'}(x'_j, h_\theta(x'_j))$,
where $h_\theta(x')$ is the model's own prediction, held fixed (stop-gradient), and $\phi_\gamma$ a
Wasserstein-robust loss. This is the objective's non-robust form ($\gamma, \gamma' \to \infty$,
the paper's plain self-training), with the cross-entropy as the loss: for labelled logits
$z_i \in \mathbb{R}^C$ and unlabelled logits $z'_j \in \mathbb{R}^C$,

$$
a_j = \min \arg\max_k z'_{jk}, \qquad
L = \frac{1}{|A|} \sum_{i \in A} \bigl(\operatorname{lse}(z_i) - z_{i y_i}\bigr)
  + \frac{\lambda}{n} \sum_{j=1}^{n} \bigl(\operatorname{lse}(z'_j) - z'_{j a_j}\bigr),
$$

where $A$ is the set of labelled rows whose label is not ``ignore_index``. Since $z'_{j a_j}$ is the
row maximum, each pseudo-label term equals $-\log \max_k \operatorname{softmax}(z'_j)_k$.
Gradients: $(p_i - e_{y_i}) / |A|$ for labelled rows and
$\lambda (p'_j - e_{a_j}) / n$ for unlabelled rows, with $p = \operatorname{softmax}(z)$; no
gradient flows through the choice of $a_j$.

Semantics
---------
- ``self_training_loss(logits, target, logits_unlabeled, *, lam=1.0, ignore_index=-100, reduction="mean")``.
  ``logits``: (m, C) labelled logits, ``target``: (m,) integers in [0, C) or ``ignore_index``;
  ``logits_unlabeled``: (n, C) with the same C. Either batch may be empty (m = 0 or n = 0).
  Gradients flow to both logits arrays.
- ``lam`` >= 0 (finite), the paper's $\lambda$; the paper publishes no default, 1 weighs a
  pseudo-labelled row like a labelled one. ``lam = 0`` drops the unlabelled term's gradient but,
  as a product, still turns a NaN unlabelled row into a NaN loss.
- Pseudo-label: the lowest index among the row's maximal logits (``numpy.argmax`` and
  ``torch.argmax`` order). Tied maxima give the same loss value whichever is chosen, but not the
  same gradient, so the tie rule is part of the semantics.
- ``reduction``: ``"mean"`` (default) is the formula above: each term is averaged over its own
  batch, and an empty average (no labelled row left after ``ignore_index``, or n = 0) is 0 rather
  than NaN, so unlabelled-only and labelled-only batches work. ``"sum"``:
  $\sum_{i \in A} \ell_i + \lambda \sum_j u_j$. ``"none"``: the (m + n,) per-row terms, labelled
  rows first (0 on ignored rows), then $\lambda u_j$.
- Ignored labelled rows contribute loss 0 and gradient exactly 0 (even when their logits are NaN).
- NaN or ``+inf`` anywhere in a row gives NaN for that row's term (and a NaN gradient row); ``-inf``
  entries are probability-zero classes; an all ``-inf`` row is NaN. A ``-inf`` label logit gives
  an infinite labelled term.
- Out-of-range labels raise ``ValueError`` (accelerated kernels, which cannot raise without a
  device synchronisation, return NaN for that row instead).
- Not included: the inner maximisation of the robust loss (gradient ascent on the inputs, which
  runs the user's network) and class weights.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_matrix, check_real, row_loss_inputs

__all__ = ["self_training_loss", "self_training_loss_grad"]


def _prepare(logits, target, logits_unlabeled, lam, ignore_index, reduction):
    z, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    u = as_float_matrix(logits_unlabeled, "logits_unlabeled")
    if u.shape[1] != z.shape[1]:
        raise ValueError(f"logits_unlabeled must have the C = {z.shape[1]} columns of logits, got shape {u.shape}")
    lam = check_real(lam, "lam", low=0.0)
    return z, y, active, u, lam


def _log_softmax(z: np.ndarray) -> np.ndarray:
    if z.shape[0] == 0:
        return z.copy()
    m = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _pseudo_labels(logits_unlabeled) -> np.ndarray:
    """The lowest index of each row's maximal logit (NaN rows: the first NaN, as ``numpy.argmax``)."""
    u = np.asarray(logits_unlabeled, dtype=np.float64)
    return np.argmax(u, axis=1) if u.shape[0] else np.zeros(0, np.int64)


def _terms(z, y, active, u):
    """Per-row labelled cross-entropy (0 on ignored rows) and pseudo-label cross-entropy."""
    log_p, log_q = _log_softmax(z), _log_softmax(u)
    a = _pseudo_labels(u)
    labelled = np.where(active, -log_p[np.arange(len(y)), y], 0.0)
    pseudo = -log_q[np.arange(len(a)), a]
    return labelled, pseudo, log_p, log_q, a


def self_training_loss(logits, target, logits_unlabeled, *, lam=1.0, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the labelled rows plus ``lam`` times the cross-entropy of the unlabelled rows
    against their own argmax."""
    z, y, active, u, lam = _prepare(logits, target, logits_unlabeled, lam, ignore_index, reduction)
    labelled, pseudo, *_ = _terms(z, y, active, u)
    with np.errstate(invalid="ignore"):
        if reduction == "none":
            return np.concatenate([labelled, lam * pseudo])
        if reduction == "sum":
            return np.float64(labelled.sum() + lam * pseudo.sum())
        first = labelled.sum() / active.sum() if active.any() else 0.0
        second = lam * pseudo.sum() / len(pseudo) if len(pseudo) else 0.0
        return np.float64(first + second)


def self_training_loss_grad(grad, logits, target, logits_unlabeled, *, lam=1.0, ignore_index=-100,
                            reduction="mean"):
    """Vector-Jacobian product: ``{"logits": (m, C), "logits_unlabeled": (n, C)}``."""
    z, y, active, u, lam = _prepare(logits, target, logits_unlabeled, lam, ignore_index, reduction)
    _, _, log_p, log_q, a = _terms(z, y, active, u)
    (m, c), n = z.shape, u.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (m + n,):
            raise ValueError(f"grad must have shape ({m + n},) for reduction='none', got {grad.shape}")
        g_l, g_u = grad[:m], lam * grad[m:]
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        g = float(grad)
        if reduction == "sum":
            g_l, g_u = np.full(m, g), np.full(n, lam * g)
        else:
            g_l = np.full(m, g / active.sum() if active.any() else 0.0)
            g_u = np.full(n, lam * g / n if n else 0.0)
    eye = np.eye(c)
    with np.errstate(invalid="ignore"):
        d_logits = np.where(active[:, None], g_l[:, None] * (np.exp(log_p) - eye[y]), 0.0)
        d_unlabeled = g_u[:, None] * (np.exp(log_q) - eye[a])
    return {"logits": d_logits.reshape(m, c), "logits_unlabeled": d_unlabeled.reshape(n, c)}
