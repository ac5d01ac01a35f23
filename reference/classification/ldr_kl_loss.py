r"""Label-distributionally robust losses with a KL penalty: LDR-KL and adaptive ALDR-KL.

Paper P42 — *Label Distributionally Robust Losses for Multi-class Classification: Consistency,
Robustness and Adaptivity* (Zhu, Ying, Yang, ICML 2023).

For scores $f \in \mathbb{R}^K$, label $y$, margin $c \ge 0$ and temperature
$\lambda > 0$, let $d_k = f_k - f_y + c\,[k \ne y]$ (so $d_y = 0$). LDR-KL is the
worst case over label distributions $p$ in the simplex $\Delta_K$, penalised by the KL
divergence to the uniform distribution:

$$
\ell_\lambda(f, y) = \max_{p \in \Delta_K} \sum_k p_k d_k - \lambda\,\mathrm{KL}(p \,\|\, 1/K)
= \lambda \log\Bigl(\frac{1}{K}\sum_k e^{d_k/\lambda}\Bigr)
= \lambda\,\mathrm{CE}\bigl(f/\lambda + (c/\lambda)(1 - e_y),\, y\bigr) - \lambda \log K,
$$

with gradient $\partial \ell_\lambda / \partial f = \operatorname{softmax}(d/\lambda) - e_y$.

ALDR-KL gives every training sample its own temperature. From the caller's stored
$\lambda_i^{\text{prev}}$ (initially $\lambda_0$):

$$
p = \frac{\operatorname{softmax}(f/\lambda_i^{\text{prev}}) + 10^{-5}}{\text{sum}}, \quad
\kappa = \sum_k p_k \log(K p_k), \quad
\lambda_i^{\text{new}} = \lambda_0\Bigl(1 - \frac{\kappa}{\alpha \log K}\Bigr),
$$

$$
L_i = \lambda_i^{\text{new}} \log\Bigl(\frac{1}{K}\sum_k e^{d_k/\lambda_i^{\text{new}}}\Bigr)
      - \frac{\alpha \log K}{2\lambda_0}\bigl(\lambda_i^{\text{new}} - \lambda_0\bigr)^2 .
$$

Since $0 \le \kappa < \log K$ and $\alpha > 1$,
$\lambda^{\text{new}} \in (\lambda_0(1 - 1/\alpha), \lambda_0]$.

Semantics
---------
- ``logits``: (N, K) real, K >= 1. ``target``: (N,) integers in [0, K) or ``ignore_index``.
- ``margin`` >= 0 (default 0.1), ``lam`` > 0 (default 1.0), ``lam0`` > 0 (default 1.0),
  ``alpha`` > 1 (default 2; $\alpha \le 1$ lets $\lambda$ reach 0 and raises), all finite.
  The authors' experiments used margin 0.1, $\lambda = \lambda_0 = 10$, $\alpha = 2$.
- The log-sum-exp subtracts the row maximum of $d/\lambda$ (which is >= 0, as $d_y = 0$),
  so small $\lambda$ is stable; as $\lambda \to 0$ the loss tends to $\max_k d_k$.
- Score transforms are not part of these functions: they act on raw logits, which is the paper's loss.
  The published experiments transformed the scores first — LDR-KL with
  $s = \operatorname{softplus}(f) / \operatorname{mean}_k \operatorname{softplus}(f)$, ALDR-KL with
  $s = f / (\lVert f \rVert_1 / K)$ (softplus first on CIFAR-100), with gradient through the
  normaliser. To reproduce them, apply the transform yourself and chain its Jacobian.
- K = 1: $\log K = 0$; loss 0 and gradient 0 by definition, and ALDR-KL returns
  $\lambda^{\text{new}} = \lambda_0$.
- ALDR-KL state is explicit: ``lam_prev`` is the (N,) float array of the batch's stored temperatures
  (every entry finite and > 0, ignored rows included); the function returns ``(loss, lam_new)`` and never
  writes into its inputs. The caller stores ``state[ids] = lam_new``; with duplicate ids NumPy and
  PyTorch indexing keep the last occurrence. Each row's loss uses its own ``lam_new`` (the authors'
  code, with duplicate ids in a batch, evaluated every duplicate at the last written value).
- ``aldr_kl_loss_grad`` treats ``lam_new`` as a constant (detached, as in the authors' code): it
  returns ``softmax(d / lam_new) - onehot`` times the upstream row gradient. This is the gradient the
  authors train with, not the total derivative (which would add a term through
  $\partial\lambda^{\text{new}}/\partial f$). The penalty term is then constant.
- No class weights. Rows whose target equals ``ignore_index`` contribute loss 0 and gradient exactly 0
  (even when their logits are NaN), are excluded from the mean, and keep ``lam_new = lam_prev``.
- ``reduction``: ``"none"`` gives the (N,) per-row losses; ``"sum"`` their sum; ``"mean"`` (default)
  the sum divided by the number of non-ignored rows — NaN when every row is ignored (0/0), or N = 0.
  ``lam_new`` is always (N,).
- A non-ignored row with NaN, with ``+inf`` anywhere, or with ``-inf`` at the target gives NaN loss
  and gradient. ``-inf`` at a non-target class is a class of zero weight. ALDR-KL's ``lam_new`` is
  NaN for rows with NaN or ``+inf`` (K > 1); ``-inf`` entries enter its update as probability-zero
  classes (then smoothed by 1e-5), so ``lam_new`` stays finite.
- Out-of-range labels raise ``ValueError`` (accelerated kernels return NaN for that row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_real, reduce_rows, reduce_rows_grad, row_loss_inputs

__all__ = ["ldr_kl_loss", "ldr_kl_loss_grad", "aldr_kl_loss", "aldr_kl_loss_grad"]

_PROB_FLOOR = 1e-5  # added to the ALDR softmax before renormalising, as in the authors' code


def _prepare(logits, target, margin, ignore_index, reduction):
    f, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    margin = check_real(margin, "margin", low=0.0)
    return f, y, active, active.astype(np.float64), margin


def _as_lam_prev(lam_prev, n: int) -> np.ndarray:
    arr = np.asarray(lam_prev)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"lam_prev must be a real floating-point array, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"lam_prev must have shape ({n},) to match logits, got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError("lam_prev must be finite and > 0")
    return arr


def _margin_diffs(f: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
    """d_k = f_k - f_y + margin * [k != y]."""
    onehot = np.eye(f.shape[1])[y]
    return f - f[np.arange(f.shape[0]), y][:, None] + margin * (1.0 - onehot)


def _log_mean_exp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).mean(axis=1))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ldr_kl_loss(logits, target, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
    """LDR-KL loss of P42: $\\lambda \\log \\operatorname{mean}_k \\exp(d_k/\\lambda)$."""
    f, y, active, row_weight, margin = _prepare(logits, target, margin, ignore_index, reduction)
    lam = check_real(lam, "lam", low=0.0, low_open=True)
    with np.errstate(invalid="ignore", over="ignore"):
        loss = lam * _log_mean_exp(_margin_diffs(f, y, margin) / lam)
    return reduce_rows(np.where(active, loss, 0.0), row_weight, reduction)


def ldr_kl_loss_grad(grad, logits, target, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d logits, an (N, K) array."""
    f, y, active, row_weight, margin = _prepare(logits, target, margin, ignore_index, reduction)
    lam = check_real(lam, "lam", low=0.0, low_open=True)
    row_grad = reduce_rows_grad(grad, row_weight, reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        g = _softmax(_margin_diffs(f, y, margin) / lam) - np.eye(f.shape[1])[y]
        factor = np.where(active, row_grad * row_weight, 0.0)
        return np.where(active[:, None], factor[:, None] * g, 0.0)


def _aldr_lam_new(f, active, lam_prev, lam0, alpha):
    """lam0 * (1 - KL(p || uniform) / (alpha log K)) for active rows; lam_prev for ignored rows."""
    k = f.shape[1]
    if k == 1:
        return np.where(active, lam0, lam_prev)
    p = _softmax(f / lam_prev[:, None]) + _PROB_FLOOR
    p = p / p.sum(axis=1, keepdims=True)
    kl = (p * np.log(k * p)).sum(axis=1)
    return np.where(active, lam0 * (1.0 - kl / (alpha * np.log(k))), lam_prev)


def _aldr_prepare(logits, target, lam_prev, margin, lam0, alpha, ignore_index, reduction):
    f, y, active, row_weight, margin = _prepare(logits, target, margin, ignore_index, reduction)
    lam_prev = _as_lam_prev(lam_prev, f.shape[0])
    lam0 = check_real(lam0, "lam0", low=0.0, low_open=True)
    alpha = check_real(alpha, "alpha", low=1.0, low_open=True)
    with np.errstate(invalid="ignore", over="ignore"):
        lam_new = _aldr_lam_new(f, active, lam_prev, lam0, alpha)
    return f, y, active, row_weight, margin, lam0, alpha, lam_new


def aldr_kl_loss(logits, target, lam_prev, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100, reduction="mean"):
    """ALDR-KL loss of P42; returns ``(loss, lam_new)``, the (N,) temperatures the caller stores."""
    f, y, active, row_weight, margin, lam0, alpha, lam_new = _aldr_prepare(
        logits, target, lam_prev, margin, lam0, alpha, ignore_index, reduction
    )
    log_k = np.log(f.shape[1])
    lam = np.where(active, lam_new, 1.0)  # ignored rows: any positive value, masked below
    with np.errstate(invalid="ignore", over="ignore"):
        ldr = lam * _log_mean_exp(_margin_diffs(f, y, margin) / lam[:, None])
        loss = ldr - alpha * log_k / (2.0 * lam0) * (lam - lam0) ** 2
    return reduce_rows(np.where(active, loss, 0.0), row_weight, reduction), lam_new


def aldr_kl_loss_grad(
    grad, logits, target, lam_prev, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100, reduction="mean"
):
    """VJP of the ALDR-KL loss w.r.t. logits with ``lam_new`` held constant (the authors' training gradient)."""
    f, y, active, row_weight, margin, lam0, alpha, lam_new = _aldr_prepare(
        logits, target, lam_prev, margin, lam0, alpha, ignore_index, reduction
    )
    row_grad = reduce_rows_grad(grad, row_weight, reduction)
    lam = np.where(active, lam_new, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        g = _softmax(_margin_diffs(f, y, margin) / lam[:, None]) - np.eye(f.shape[1])[y]
        factor = np.where(active, row_grad * row_weight, 0.0)
        return np.where(active[:, None], factor[:, None] * g, 0.0)
