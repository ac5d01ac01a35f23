r"""Loss-based sample reweighting for LLM pretraining: per-sequence cross-entropy and the weight rule.

Paper P15 — *Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining*
(Sow, Woisetschläger, Bulusu, Wang, Jacobsen, Liang, ICLR 2025).

Each sequence $i$ of a batch gets the mean token cross-entropy over its $n_i$ active tokens,

$$
\ell_i = \frac{1}{n_i} \sum_{t \,:\, y_{i,t} \ne \text{ignore}} -\log \operatorname{softmax}(z_{i,t})_{y_{i,t}},
\qquad \ell_i = 0 \text{ when } n_i = 0 .
$$

The weight rule (`loss_reweight_weights`) maps the batch's losses to weights. With
$\ell_{\min}, \ell_{\max}$ taken over the active sequences, the losses are normalised to
$[-\delta, \delta]$,

$$
\tilde\ell_i = \delta \, \frac{(\ell_i - \ell_{\min}) + (\ell_i - \ell_{\max})}{\max(\ell_{\max} - \ell_{\min},\, 10^{-6})},
$$

passed through a strategy $f$ and a tempered softmax with temperature $r$:

$$
f_{\text{linupper}}(\tilde\ell) = \min(\tilde\ell + \delta, \delta), \quad
f_{\text{quadratic}}(\tilde\ell) = 1 - \tilde\ell^2/\delta^2, \quad
f_{\text{extremes}}(\tilde\ell) = |\tilde\ell|, \quad
f_{\text{uniform}}(\tilde\ell) = 0,
$$

$$
w_i = \frac{\exp\big((f(\tilde\ell_i) - \max_j f(\tilde\ell_j))/r\big)}{\sum_k \exp\big((f(\tilde\ell_k) - \max_j f(\tilde\ell_j))/r\big)} .
$$

The training loss (`weighted_sequence_ce`) is $L = s \sum_i w_i \ell_i$, where $s$ is the number
of data-parallel ranks $W$ when $w$ was computed over the all-gathered batch (1 on one process).
The weights are constants (computed under stop-gradient), so

$$
\frac{\partial L}{\partial z_{i,t,k}} = \frac{s\, w_i}{n_i}\big(\operatorname{softmax}(z_{i,t})_k - [k = y_{i,t}]\big)
\text{ on active tokens, } 0 \text{ elsewhere}, \qquad \frac{\partial L}{\partial w_i} = s\,\ell_i .
$$

Semantics
---------
**`weighted_sequence_ce(logits, labels, weights=None, *, scale=1.0, shift=True, ignore_index=-100, reduction="sum")`**

- ``logits``: (B, T, V) real, V >= 1. ``labels``: (B, T) integers in [0, V) or ``ignore_index``.
- ``shift=True`` (default, the convention of causal language models and of the authors' code):
  position $t$ of the logits predicts label $t + 1$, i.e. ``logits[:, :-1]`` is scored against
  ``labels[:, 1:]``; the last position's logits get gradient 0 and ``labels[:, 0]`` is never read
  (nor validated). ``shift=False`` scores ``logits[:, t]`` against ``labels[:, t]``.
- $n_i$ counts the tokens of sequence $i$ whose label is not ``ignore_index``. A sequence with
  $n_i = 0$ has $\ell_i = 0$ and gradient 0 (the README snippet divides 0 by 0 there).
  Logits of ignored tokens never reach the result, NaN included.
- ``weights``: optional (B,) real per-sequence weights (None: all 1). They are used as given:
  weights from `loss_reweight_weights` already sum to 1 over the batch, so ``reduction="sum"``
  is the paper's loss. When ``weights`` is trained through, its gradient is $s\,\ell_i$ (times the
  upstream gradient); usually it is a constant.
- ``scale``: finite real $s$ multiplying every term (the paper's $W$).
- ``reduction``: ``"none"`` gives the (B,) terms $s\,w_i\,\ell_i$ — with ``weights=None`` and
  ``scale=1`` that is the per-sequence loss $\ell$ that `loss_reweight_weights` takes;
  ``"sum"`` (default) their sum; ``"mean"`` the sum divided by the number of sequences with at
  least one active token (0/0 = NaN when there is none, as in PyTorch's cross-entropy).
- NaN or ``+inf`` in an active token's logits makes that token's loss, its sequence's $\ell_i$
  and that token's gradient NaN (the other tokens' gradients are unaffected: the scale
  $s w_i / n_i$ does not depend on the losses). ``-inf`` entries are probability-zero classes.
- The gradient function returns ``{"logits": ..., "weights": ...}`` (only ``"logits"`` when
  ``weights`` is None).
- A label outside [0, V) other than ``ignore_index`` raises ``ValueError`` (the accelerated kernels,
  which cannot raise without a device synchronisation, give that token a NaN loss instead).

**`loss_reweight_weights(losses, active=None, *, strategy="linupper", delta=1.0, temperature=1.0, readme_uniform=False)`**

- ``losses``: (n,) real per-sequence losses, typically gathered over every data-parallel rank.
  ``active``: optional (n,) boolean mask; inactive entries (e.g. sequences with $n_i = 0$) are
  left out of $\ell_{\min}$, $\ell_{\max}$ and the softmax and get weight exactly 0, whatever their
  loss (NaN included). None means every entry is active.
- The weights of the active entries sum to 1. No active entry (or $n = 0$) gives all zeros.
- $\ell_{\max} = \ell_{\min}$ gives $\tilde\ell = 0$ and uniform weights. The range is floored at
  $10^{-6}$, as in the authors' code, so a spread below $10^{-6}$ is normalised to less than
  $[-\delta, \delta]$. The numerator is written as $(\ell - \ell_{\min}) + (\ell - \ell_{\max})$ to
  avoid cancellation.
- ``strategy`` in ``("linupper", "quadratic", "extremes", "uniform")``. LinUpper down-weights
  the lower half of the loss range (weights of the upper half are equal), Quadratic favours
  medium losses, Extremes favours both ends.
- ``uniform`` gives true uniform weights $1/n_{\text{active}}$ (the paper's no-reweighting
  baseline). The README snippet's ``uniform`` returns $\tilde\ell$ itself, which *up-weights* high
  losses; ``readme_uniform=True`` reproduces that ($f(\tilde\ell) = \tilde\ell$) for parity with the
  authors' code. The flag changes nothing for the other strategies.
- ``delta`` $> 0$ and ``temperature`` $r > 0$ (finite). $r \to 0$ approaches the argmax of
  $f$, large $r$ uniform weights (the paper schedules $r$ from large during warm-up to a fixed
  value; the schedule is the caller's). Defaults $\delta = 1$, $r = 1$.
- A NaN or infinite loss among the active entries raises ``ValueError`` (the accelerated kernel
  returns all-NaN weights instead, since checking would synchronise the device).
- The weights are a stop-gradient quantity: there is no gradient function.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_bool, check_choice, check_int, check_real, check_reduction

__all__ = [
    "weighted_sequence_ce", "weighted_sequence_ce_grad", "loss_reweight_weights",
    "STRATEGIES", "RANGE_FLOOR",
]

STRATEGIES = ("linupper", "quadratic", "extremes", "uniform")
RANGE_FLOOR = 1e-6  # smallest l_max - l_min the normalisation divides by (authors' code)


# ---------------------------------------------------------------------------------- weighted_sequence_ce


def _token_inputs(logits, labels, weights, scale, shift, ignore_index, reduction):
    """Validated inputs, aligned: (B, T', V) logits and (B, T') labels after the shift, the mask of
    active tokens, and the (B,) weights."""
    z = as_float_array(logits, "logits", 3, "(B, T, V)")
    b, t, v = z.shape
    if v < 1:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {z.shape}")
    y = as_int_array(labels, "labels", (b, t))
    shift = check_bool(shift, "shift")
    ignore_index = check_int(ignore_index, "ignore_index")
    scale = check_real(scale, "scale")
    check_reduction(reduction)
    if weights is None:
        w = np.ones(b)
    else:
        w = as_float_array(weights, "weights", 1, "(B,)")
        if w.shape != (b,):
            raise ValueError(f"weights must have shape ({b},), one weight per sequence, got {w.shape}")
    if shift:
        z, y = z[:, :-1], y[:, 1:]
    bad = (y != ignore_index) & ((y < 0) | (y >= v))
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"labels[{i}, {j + shift}] = {y[i, j]} is out of range: class indices must lie in [0, {v}) "
            f"or equal ignore_index={ignore_index}"
        )
    active = y != ignore_index
    z = np.where(active[..., None], z, 0.0)  # ignored tokens cannot reach the result
    return z, np.where(active, y, 0), active, w, scale, shift


def _log_softmax(z):
    m = z.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _sequence_losses(z, y, active):
    """Per-token log-probabilities, the (B,) mean token CE $\\ell$ and the (B,) token counts $n$."""
    log_p = _log_softmax(z)
    log_py = np.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    token_ce = np.where(active, -log_py, 0.0)
    n = active.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        seq = np.where(n > 0, token_ce.sum(axis=1) / np.maximum(n, 1), 0.0)
    return log_p, seq, n


def weighted_sequence_ce(logits, labels, weights=None, *, scale=1.0, shift=True, ignore_index=-100,
                         reduction="sum"):
    """$s \\sum_i w_i \\ell_i$ with $\\ell_i$ the mean token cross-entropy of sequence $i$ (P15)."""
    z, y, active, w, scale, _ = _token_inputs(logits, labels, weights, scale, shift, ignore_index, reduction)
    _, seq, n = _sequence_losses(z, y, active)
    terms = scale * w * seq
    if reduction == "none":
        return terms
    if reduction == "sum":
        return np.float64(terms.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(terms.sum() / np.count_nonzero(n))


def weighted_sequence_ce_grad(grad, logits, labels, weights=None, *, scale=1.0, shift=True, ignore_index=-100,
                              reduction="sum"):
    """Vector-Jacobian product: ``{"logits": (B, T, V), "weights": (B,)}`` (no ``"weights"`` entry
    when ``weights`` is None)."""
    z, y, active, w, scale, shift = _token_inputs(logits, labels, weights, scale, shift, ignore_index, reduction)
    log_p, seq, n = _sequence_losses(z, y, active)
    b = z.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (b,):
            raise ValueError(f"grad must have shape ({b},) for reduction='none', got {grad.shape}")
        g = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        with np.errstate(invalid="ignore", divide="ignore"):
            g = np.full(b, float(grad) / (1.0 if reduction == "sum" else np.count_nonzero(n)))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        per_token = np.where(n > 0, g * scale * w / np.maximum(n, 1), 0.0)  # d L / d (token CE)
        onehot = np.eye(z.shape[2])[y]
        d_shifted = np.where(active[..., None], per_token[:, None, None] * (np.exp(log_p) - onehot), 0.0)
        grads = {"weights": g * scale * seq}
    d_logits = np.zeros(np.shape(logits))
    if shift:
        d_logits[:, :-1] = d_shifted
    else:
        d_logits[...] = d_shifted
    grads["logits"] = d_logits
    if weights is None:
        del grads["weights"]
    return grads


# ---------------------------------------------------------------------------------- loss_reweight_weights


def _strategy(norm: np.ndarray, strategy: str, delta: float, readme_uniform: bool) -> np.ndarray:
    if strategy == "linupper":
        return np.minimum(norm + delta, delta)
    if strategy == "quadratic":
        return 1.0 - norm**2 / delta**2
    if strategy == "extremes":
        return np.abs(norm)
    return norm.copy() if readme_uniform else np.zeros_like(norm)


def loss_reweight_weights(losses, active=None, *, strategy="linupper", delta=1.0, temperature=1.0,
                          readme_uniform=False):
    """Per-sequence weights from per-sequence losses: normalise, strategy, tempered softmax (P15)."""
    x = as_float_array(losses, "losses", 1, "(n,)")
    n = x.shape[0]
    if active is None:
        mask = np.ones(n, dtype=bool)
    else:
        mask = np.asarray(active)
        if mask.dtype != np.bool_:
            raise TypeError(f"active must be a boolean mask, got dtype {mask.dtype}")
        if mask.shape != (n,):
            raise ValueError(f"active must have shape ({n},) to match losses, got {mask.shape}")
    check_choice(strategy, "strategy", STRATEGIES)
    delta = check_real(delta, "delta", low=0.0, low_open=True)
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    readme_uniform = check_bool(readme_uniform, "readme_uniform")
    bad = mask & ~np.isfinite(x)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"losses[{i}] = {x[i]} is not finite: every active per-sequence loss must be finite")
    weights = np.zeros(n)
    if not mask.any():
        return weights
    l = x[mask]
    lo, hi = l.min(), l.max()
    norm = delta * ((l - lo) + (l - hi)) / max(hi - lo, RANGE_FLOOR)
    f = _strategy(norm, strategy, delta, readme_uniform)
    e = np.exp((f - f.max()) / temperature)
    weights[mask] = e / e.sum()
    return weights
