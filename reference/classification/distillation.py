r"""Mean-squared-error distillation losses: on raw logits (N2N) and on softmax probabilities mixed with
the ground truth (self-distillation with ground-truth targets).

Paper P45 — *N2N Learning: Network to Network Compression via Policy Gradient Reinforcement Learning* (Ashok, Rhinehart, Beainy, Kitani, ICLR 2018).

Paper P60 — *Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation* (Borup, Andersen, NeurIPS 2021).

**Logit MSE** (P45: how N2N trains every sampled student, ``nn.MSELoss`` between the student's and
the teacher's logits $s, t \in \mathbb{R}^{N \times K}$):

$$
\ell_i = \frac{1}{K}\sum_{k=1}^{K} (s_{ik} - t_{ik})^2,
\qquad
L = \frac{1}{N}\sum_i \ell_i = \frac{1}{NK}\sum_{i,k} (s_{ik} - t_{ik})^2,
\qquad
\frac{\partial \ell_i}{\partial s_{ik}} = \frac{2}{K}(s_{ik} - t_{ik}).
$$

**Softmax MSE with ground truth** (P60's deep-network loss): with $p = \operatorname{softmax}(z)$ for
the student's logits $z$, $q = \operatorname{softmax}(t)$ for the teacher's logits $t$, label $y$ and
weight $\alpha \in [0, 1]$ on the ground truth,

$$
\ell_i = \frac{\alpha}{C}\sum_{k} (p_{ik} - \delta_{k y_i})^2 + \frac{1-\alpha}{C}\sum_{k} (p_{ik} - q_{ik})^2 .
$$

With $r = p - \alpha\,\mathrm{onehot}(y) - (1-\alpha)\,q$ and the softmax Jacobian
$J = \operatorname{diag}(p) - p p^\top$,

$$
\frac{\partial \ell_i}{\partial z_{ik}} = \frac{2}{C}\,(J r)_k = \frac{2}{C}\,p_{ik}\big(r_{ik} - \langle p_i, r_i\rangle\big).
$$

Semantics
---------
- **Reduction, both losses.** ``reduction="none"`` gives the (N,) per-row losses $\ell_i$, each a
  mean over the row's classes; ``"mean"`` (default) averages them over the rows, which is exactly
  ``nn.MSELoss()`` / ``F.mse_loss`` (mean over all $N \cdot C$ entries) as the authors' code uses;
  ``"sum"`` adds the per-row means, i.e. ``F.mse_loss(..., reduction="sum") / C``. Per-row values
  (not the elementwise squares ``reduction="none"`` gives in PyTorch) are what a user re-weighting
  samples needs.
- **The teacher is a constant.** ``teacher_logits`` receives no gradient in either loss (in both
  papers the teacher is a fixed, previously trained network whose outputs serve as targets); the
  accelerated functions detach it even when it requires grad. ``*_grad`` returns the gradient of the student's logits only.
- ``logit_mse_distillation(student_logits, teacher_logits)``: two (N, K) real arrays of the same
  shape, K >= 1; no labels, no ignored rows. N = 0 gives NaN for ``"mean"`` (0/0) and 0 for
  ``"sum"``. NaN in either input gives NaN for that row; an infinite difference gives ``inf``
  ($\infty - \infty$ gives NaN).
- ``softmax_mse_distillation(logits, target, teacher_logits, *, alpha=0.6)``: ``logits`` and
  ``teacher_logits`` (N, C) of the same shape, C >= 1; ``target`` (N,) integers in [0, C) or
  ``ignore_index``. ``alpha`` in [0, 1], default 0.6 as in the authors' example
  (``alpha = 0`` is pure self-distillation, ``alpha = 1`` is the Brier score against the labels, divided by C).
  Rows whose target equals ``ignore_index`` contribute 0 with gradient exactly 0 (even when their
  logits are NaN) and are left out of the mean (NaN when every row is ignored). The teacher's row
  of an ignored sample is not read either. With C = 1 both softmaxes are 1 and the loss is 0.
- Softmaxes are computed stably (max subtracted). NaN or ``+inf`` in a non-ignored row of either
  logit array gives NaN for that row; ``-inf`` entries are probability-zero classes (an all ``-inf``
  row is NaN). Squared differences are formed directly, never as expanded squares, so a student
  that matches its teacher gets a loss that is small in relative terms too.
- Out-of-range labels raise ``ValueError`` (the accelerated kernels return NaN for the row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import (
    as_float_matrix,
    check_real,
    check_reduction,
    reduce_rows,
    reduce_rows_grad,
    row_loss_inputs,
)

__all__ = [
    "logit_mse_distillation",
    "logit_mse_distillation_grad",
    "softmax_mse_distillation",
    "softmax_mse_distillation_grad",
]


# --- P45: logit MSE ---------------------------------------------------------------------------------


def _logit_inputs(student_logits, teacher_logits, reduction):
    s = as_float_matrix(student_logits, "student_logits")
    t = as_float_matrix(teacher_logits, "teacher_logits")
    if t.shape != s.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {s.shape}, got {t.shape}")
    check_reduction(reduction)
    return s, t


def logit_mse_distillation(student_logits, teacher_logits, *, reduction="mean"):
    """Mean squared error between student and teacher logits, per row (mean over classes), reduced."""
    s, t = _logit_inputs(student_logits, teacher_logits, reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        rows = np.mean((s - t) ** 2, axis=1)
    return reduce_rows(rows, np.ones(s.shape[0]), reduction)


def logit_mse_distillation_grad(grad, student_logits, teacher_logits, *, reduction="mean"):
    """Vector-Jacobian product with respect to ``student_logits``: an (N, K) array."""
    s, t = _logit_inputs(student_logits, teacher_logits, reduction)
    row_grad = reduce_rows_grad(grad, np.ones(s.shape[0]), reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        return row_grad[:, None] * (2.0 / s.shape[1]) * (s - t)


# --- P60: softmax MSE against ground truth and teacher ------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _softmax_inputs(logits, target, teacher_logits, alpha, ignore_index, reduction):
    z, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    t = as_float_matrix(teacher_logits, "teacher_logits")
    if t.shape != z.shape:
        raise ValueError(f"teacher_logits must have the shape of logits {z.shape}, got {t.shape}")
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    t = np.where(active[:, None], t, 0.0)
    p, q = _softmax(z), _softmax(t)
    residual = p - alpha * np.eye(z.shape[1])[y] - (1.0 - alpha) * q  # r = dL/dp * C / 2
    return p, q, y, active, alpha, residual


def softmax_mse_distillation(logits, target, teacher_logits, *, alpha=0.6, ignore_index=-100, reduction="mean"):
    """``alpha`` MSE(softmax(logits), onehot(target)) + (1 - ``alpha``) MSE(softmax(logits), softmax(teacher))."""
    p, q, y, active, alpha, _ = _softmax_inputs(logits, target, teacher_logits, alpha, ignore_index, reduction)
    onehot = np.eye(p.shape[1])[y]
    with np.errstate(invalid="ignore"):
        rows = alpha * np.mean((p - onehot) ** 2, axis=1) + (1.0 - alpha) * np.mean((p - q) ** 2, axis=1)
    return reduce_rows(np.where(active, rows, 0.0), active.astype(np.float64), reduction)


def softmax_mse_distillation_grad(grad, logits, target, teacher_logits, *, alpha=0.6, ignore_index=-100,
                                  reduction="mean"):
    """Vector-Jacobian product with respect to ``logits``: an (N, C) array (the teacher is a constant)."""
    p, _, _, active, _, r = _softmax_inputs(logits, target, teacher_logits, alpha, ignore_index, reduction)
    row_grad = reduce_rows_grad(grad, active.astype(np.float64), reduction)
    with np.errstate(invalid="ignore"):
        jr = p * (r - np.sum(p * r, axis=1, keepdims=True))
        return np.where(active[:, None], (2.0 / p.shape[1]) * row_grad[:, None] * jr, 0.0)
