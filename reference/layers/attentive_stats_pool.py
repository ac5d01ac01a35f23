r"""Channel-wise attentive statistics pooling: an attention-weighted mean and standard deviation
over time, concatenated into one utterance-level vector.

Paper P61 — *EfficientTDNN: Efficient Architecture Search for Speaker Recognition* (Wang et al.,
IEEE/ACM TASLP 2022).

For frame features $x_{bct}$ (batch $b$, channel $c$, frame $t$) and attention logits $e_{bct}$,
the weights are a softmax over time, separately for every channel:

$$
\alpha_{bct} = \frac{\exp e_{bct}}{\sum_{t'} \exp e_{bct'}}, \qquad
\mu_{bc} = \sum_t \alpha_{bct}\, x_{bct}, \qquad
v_{bc} = \sum_t \alpha_{bct}\, x_{bct}^2 - \mu_{bc}^2, \qquad
\sigma_{bc} = \sqrt{\max(v_{bc}, \varepsilon)},
$$

and the output is $\operatorname{concat}(\mu_b, \sigma_b) \in \mathbb{R}^{2C}$.

In the authors' layer the logits come from two bias-free $1 \times 1$ convolutions,
$e = W_2 \tanh(W_1 x)$ (bottleneck 128, no global-context input); the convolutions are ordinary
layers, so the function here takes $e$ as an input and the module computes it.

Gradient, with upstream gradients $g^\mu_{bc}$ and $g^\sigma_{bc}$ (the two halves of ``grad``) and
$[v \ge \varepsilon]$ the clamp being inactive:

$$
\frac{\partial L}{\partial x_{bct}} = \alpha_{bct}\Big(g^\mu_{bc} + [v_{bc} \ge \varepsilon]\,
  g^\sigma_{bc}\,\frac{x_{bct} - \mu_{bc}}{\sigma_{bc}}\Big), \qquad
\frac{\partial L}{\partial e_{bct}} = \alpha_{bct}\Big(g^\mu_{bc}\,(x_{bct} - \mu_{bc})
  + [v_{bc} \ge \varepsilon]\, g^\sigma_{bc}\,\frac{(x_{bct} - \mu_{bc})^2 - v_{bc}}{2\sigma_{bc}}\Big).
$$

Semantics
---------
- ``x``: (B, C, T) real features, channels first (``nn.Conv1d`` layout). ``logits``: (B, C, T),
  the attention logits of every channel and frame (one softmax over T per (b, c)).
- Output: (B, 2C), the C weighted means followed by the C weighted standard deviations
  (``torch.cat((mu, sg), dim=1)`` as in the authors' code).
- ``eps`` (default 1e-9, the authors' constant) floors the *variance* before the square root:
  $\sigma = \sqrt{\max(v, \varepsilon)}$, so a constant channel or T = 1 gives $\sqrt{\varepsilon}$.
  Where the floor is active ($v < \varepsilon$) $\sigma$ is a constant and passes no gradient
  (``torch.clamp``'s rule: at $v = \varepsilon$ exactly the gradient passes).
- The variance is written here as the shifted sum $v = \sum_t \alpha_t (x_t - \mu)^2$, equal in exact
  arithmetic to the authors' $\sum_t \alpha_t x_t^2 - \mu^2$ and free of its cancellation (a channel
  whose mean is large against its spread loses every digit in float32 the other way).
- Padded frames: the layer has no mask argument (the authors' layer has none). Frames given a logit
  of $-\infty$ receive weight exactly 0 and contribute nothing (their features must still be finite).
- Softmax in the stable max-subtracted form. A channel whose logits are all $-\infty$, or that has
  a $+\infty$ or NaN logit, has no defined weights: its mean and deviation are NaN (as
  ``torch.softmax`` gives). NaN in ``x`` makes its channel's mean and deviation NaN; an infinite
  feature (with nonzero weight) gives $\mu = \pm\infty$ (NaN when both signs occur) and
  $\sigma$ = NaN; a zero-weight frame holding $\pm\infty$ gives NaN ($0 \cdot \infty$).
- T = 0 is an error (``ValueError`` naming ``x``): a softmax over no frames has no weights. B = 0 or
  C = 0 give an empty (B, 2C) result.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_real

__all__ = ["attentive_stats_pool", "attentive_stats_pool_grad"]


def _inputs(x, logits, eps):
    x = as_float_array(x, "x", 3, "(B, C, T)")
    e = as_float_array(logits, "logits", 3, "(B, C, T)")
    if e.shape != x.shape:
        raise ValueError(f"logits must have the shape of x {x.shape} (B, C, T), got {e.shape}")
    if x.shape[2] == 0:
        raise ValueError("x must have at least one frame (T >= 1): a softmax over no frames has no weights")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    return x, e, eps


def _moments(x, e):
    """Softmax weights over T, weighted mean and (unfloored) weighted variance per (b, c)."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = e - e.max(axis=2, keepdims=True)
        w = np.exp(shifted)
        alpha = w / w.sum(axis=2, keepdims=True)
        mu = (alpha * x).sum(axis=2)
        var = (alpha * (x - mu[:, :, None]) ** 2).sum(axis=2)
    return alpha, mu, var


def attentive_stats_pool(x, logits, *, eps=1e-9):
    """Attention-weighted mean and standard deviation over time, concatenated: (B, 2C)."""
    x, e, eps = _inputs(x, logits, eps)
    _, mu, var = _moments(x, e)
    with np.errstate(invalid="ignore"):
        sigma = np.sqrt(np.maximum(var, eps))
    sigma = np.where(np.isnan(var), np.nan, sigma)  # np.maximum keeps NaN; stated for the reader
    return np.concatenate([mu, sigma], axis=1)


def attentive_stats_pool_grad(grad, x, logits, *, eps=1e-9):
    """Vector-Jacobian product: ``{"x": d x, "logits": d logits}``, both (B, C, T), for ``grad`` (B, 2C)."""
    x, e, eps = _inputs(x, logits, eps)
    b, c, _ = x.shape
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != (b, 2 * c):
        raise ValueError(f"grad must have shape {(b, 2 * c)}, got {grad.shape}")
    alpha, mu, var = _moments(x, e)
    g_mu, g_sigma = grad[:, :c, None], grad[:, c:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(np.maximum(var, eps))[:, :, None]
        g_sigma = np.where(var[:, :, None] >= eps, g_sigma, 0.0)  # the floor passes no gradient
        centred = x - mu[:, :, None]
        d_x = alpha * (g_mu + g_sigma * centred / sigma)
        d_e = alpha * (g_mu * centred + g_sigma * (centred**2 - var[:, :, None]) / (2.0 * sigma))
    return {"x": d_x, "logits": d_e}
