r"""α-BN: batch normalisation whose statistics mix the current batch's with the stored (source)
running statistics, for test-time adaptation under covariate shift.

Paper P54 — *Test-time Batch Statistics Calibration for Covariate Shift* (You, Li and Zhao, arXiv 2021).

For x of shape (N, C, \*) let $M$ be the number of elements per channel (N times the spatial size),
$\mu_t$, $\sigma_t^2$ the per-channel mean and *biased* variance of the batch, and $\mu_s$, $\sigma_s^2$
the running (source) statistics. With the source weight $\alpha \in [0, 1]$:

$$
\hat\mu = \alpha\,\mu_s + (1 - \alpha)\,\mu_t, \qquad
\hat\sigma^2 = \alpha\,\sigma_s^2 + (1 - \alpha)\,\sigma_t^2, \qquad
y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \varepsilon}} + \beta .
$$

$\alpha = 1$ is BatchNorm in eval mode, $\alpha = 0$ is BatchNorm normalising with batch statistics
("test-time normalisation"). In training mode the running statistics are updated as BatchNorm does,
from the batch alone: $\mu_s \leftarrow (1 - m)\,\mu_s + m\,\mu_t$ and
$\sigma_s^2 \leftarrow (1 - m)\,\sigma_s^2 + m\,\tfrac{M}{M - 1}\sigma_t^2$ (unbiased), $m$ = ``momentum``.

Gradient (through the batch statistics, each weighted by $1 - \alpha$), with $\hat s = \sqrt{\hat\sigma^2 + \varepsilon}$
and sums over the $M$ elements of a channel:

$$
\frac{\partial L}{\partial x_i} = \frac{\gamma}{\hat s}\Big[g_i - \frac{1 - \alpha}{M}\sum_j g_j
  - (1 - \alpha)\,\frac{x_i - \mu_t}{M \hat s^2}\sum_j g_j (x_j - \hat\mu)\Big], \qquad
\frac{\partial L}{\partial \gamma} = \sum_j g_j\,\frac{x_j - \hat\mu}{\hat s}, \qquad
\frac{\partial L}{\partial \beta} = \sum_j g_j .
$$

Semantics
---------
- ``x``: (N, C) or (N, C, \*spatial) real. ``running_mean``, ``running_var``: (C,), the source
  statistics (a pretrained BatchNorm's buffers). ``weight`` ($\gamma$), ``bias`` ($\beta$): (C,) or
  None (1 and 0, ``affine=False``).
- Returns ``(y, new_running_mean, new_running_var)``; y has the shape of x. The running statistics
  are inputs and the updated ones are outputs (nothing is modified in place); the ``nn.Module``
  copies them into its buffers.
- ``source_weight`` ($\alpha$): required, in [0, 1] (outside is a ``ValueError`` naming it). The
  paper mixes the *variances* (not the standard deviations); that is the choice made here. No
  default: the paper tunes it per dataset (small values such as 0.1 for classification).
- ``training`` (default True) only decides whether the running statistics are updated. α-BN is a
  test-time layer: **both modes normalise with the mixed statistics** (the batch is always used
  when $\alpha < 1$), and the gradient always flows through the batch statistics. In eval mode the
  running statistics come back unchanged.
- ``momentum`` in [0, 1] (default 0.1, BatchNorm's); 0 freezes the source statistics while
  training. ``eps`` > 0 (default 1e-5, BatchNorm's), added to the mixed variance inside the root.
- Running statistics are required in both modes (they are what α-BN mixes in): ``None`` — eval
  mode, or any mode, before any running statistic exists — is a ``ValueError`` naming
  ``running_mean``. Convert a trained BatchNorm (``AlphaBatchNorm.from_batchnorm``) rather than
  normalising with a fresh layer's placeholder (0, 1).
- Non-finite running statistics, or a negative running variance, are a ``ValueError`` naming the
  argument (device code, which cannot raise on values without a synchronisation, returns NaN for
  those channels instead).
- At least one element per channel (M ≥ 1), and M ≥ 2 in training mode (the unbiased variance of the
  update; PyTorch's BatchNorm raises the same), else ``ValueError`` naming ``x``. M = 1 in eval mode
  gives $\sigma_t^2 = 0$.
- NaN or ±inf in ``x`` makes its channel's batch statistics, hence its whole output channel (and in
  training mode its updated running statistics) NaN or infinite as the arithmetic gives;
  $0 \cdot \infty$ = NaN where α or the momentum is 0 or 1 (no special-casing).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_bool, check_real

__all__ = ["alpha_batchnorm", "alpha_batchnorm_grad"]


def _vector(v, name: str, c: int, *, finite: bool) -> np.ndarray:
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one entry per channel), got {arr.shape}")
    arr = arr.astype(np.float64)
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite: non-finite running statistics at channels "
                         f"{np.flatnonzero(~np.isfinite(arr)).tolist()}")
    return arr


def _inputs(x, running_mean, running_var, weight, bias, source_weight, training, momentum, eps):
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise TypeError(f"x must be a real floating-point array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial), got {x.ndim} dimensions {x.shape}")
    x = x.astype(np.float64)
    c = x.shape[1]
    alpha = check_real(source_weight, "source_weight", low=0.0, high=1.0)
    training = check_bool(training, "training")
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required: alpha-BN mixes them into every "
                         "normalisation, so neither mode (eval mode included) can run before any running "
                         "statistic exists")
    rm = _vector(running_mean, "running_mean", c, finite=True)
    rv = _vector(running_var, "running_var", c, finite=True)
    if np.any(rv < 0):
        raise ValueError(f"running_var must be >= 0, negative at channels {np.flatnonzero(rv < 0).tolist()}")
    w = np.ones(c) if weight is None else _vector(weight, "weight", c, finite=False)
    b = np.zeros(c) if bias is None else _vector(bias, "bias", c, finite=False)
    m = x.size // c if c else 0
    if c and m < 1:
        raise ValueError(f"x must have at least one element per channel, got shape {x.shape}")
    if training and c and m < 2:
        raise ValueError(f"x must have more than one value per channel in training mode (the running "
                         f"variance is unbiased), got shape {x.shape}")
    return x, rm, rv, w, b, alpha, training, momentum, eps


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> broadcastable against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _statistics(x, rm, rv, alpha, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    with np.errstate(invalid="ignore", over="ignore"):
        mu_t = x.mean(axis=axes)
        var_t = ((x - _channel(mu_t, x.ndim)) ** 2).mean(axis=axes)
        mu_hat = alpha * rm + (1.0 - alpha) * mu_t
        s_hat = np.sqrt(alpha * rv + (1.0 - alpha) * var_t + eps)
    return axes, mu_t, var_t, mu_hat, s_hat


def alpha_batchnorm(x, running_mean, running_var, weight=None, bias=None, *, source_weight,
                    training=True, momentum=0.1, eps=1e-5):
    """α-BN forward: ``(y, new_running_mean, new_running_var)``."""
    x, rm, rv, w, b, alpha, training, momentum, eps = _inputs(
        x, running_mean, running_var, weight, bias, source_weight, training, momentum, eps)
    if x.shape[1] == 0:
        return x.copy(), rm.copy(), rv.copy()
    _, mu_t, var_t, mu_hat, s_hat = _statistics(x, rm, rv, alpha, eps)
    with np.errstate(invalid="ignore", over="ignore"):
        y = _channel(w, x.ndim) * (x - _channel(mu_hat, x.ndim)) / _channel(s_hat, x.ndim) + _channel(b, x.ndim)
        if not training:
            return y, rm.copy(), rv.copy()
        m = x.size // x.shape[1]
        new_mean = (1.0 - momentum) * rm + momentum * mu_t
        new_var = (1.0 - momentum) * rv + momentum * var_t * (m / (m - 1))
    return y, new_mean, new_var


def alpha_batchnorm_grad(grad, x, running_mean, running_var, weight=None, bias=None, *, source_weight,
                         training=True, momentum=0.1, eps=1e-5):
    """Vector-Jacobian product of y: ``{"x": d x, "weight": d gamma, "bias": d beta}`` (the running
    statistics are state, not trained through)."""
    x, rm, rv, w, b, alpha, training, momentum, eps = _inputs(
        x, running_mean, running_var, weight, bias, source_weight, training, momentum, eps)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {x.shape}, got {g.shape}")
    c = x.shape[1]
    if c == 0:
        return {"x": np.zeros_like(x), "weight": np.zeros(0), "bias": np.zeros(0)}
    axes, mu_t, _, mu_hat, s_hat = _statistics(x, rm, rv, alpha, eps)
    m = x.size // c
    nd = x.ndim
    with np.errstate(invalid="ignore", over="ignore"):
        sum_g = g.sum(axis=axes)
        sum_gx = (g * (x - _channel(mu_hat, nd))).sum(axis=axes)
        d_x = _channel(w / s_hat, nd) * (
            g - _channel((1.0 - alpha) * sum_g / m, nd)
            - (x - _channel(mu_t, nd)) * _channel((1.0 - alpha) * sum_gx / (m * s_hat**2), nd))
        d_w = sum_gx / s_hat
    return {"x": d_x, "weight": d_w, "bias": sum_g}
