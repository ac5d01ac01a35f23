r"""ELECTRA: the generator's fused LM-head loss with Gumbel-max replacement sampling, and the
discriminator's replaced-token-detection (RTD) loss.

Paper P35 — *ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators*
(Clark, Luong, Le, Manning, ICLR 2020).

**Generator** (`electra_generator_sample`). For the $M$ masked slots with generator hidden states
$x_m \in \mathbb{R}^H$, the tied LM head $W \in \mathbb{R}^{V \times H}$ and bias $b$, the logits
are $h_m = W x_m + b$. With original tokens $t_m$ and slot weights $w_m$ (validity, 0 or 1):

$$
\ell_m = \operatorname{logsumexp}_v h_{mv} - h_{m t_m}, \qquad
L_{\text{mlm}} = \frac{\sum_m w_m \ell_m}{\sum_m w_m + 10^{-6}},
$$

and the replacement token of each slot is drawn by the Gumbel-max trick from explicit uniform
noise $u \in [0, 1)^{M \times V}$:

$$
g_{mv} = -\log\bigl(-\log(u_{mv} + 10^{-9}) + 10^{-9}\bigr), \qquad
s_m = \operatorname*{arg\,max}_v \Bigl[\frac{h_{mv}}{T} - 1000\,[\text{disallow}]\,\mathbb{1}(v = t_m) + g_{mv}\Bigr],
$$

so that $s_m \sim \operatorname{softmax}(h_m / T)$ when $u$ is uniform. The gradient of the loss
with respect to the logits is $\partial L / \partial h_{mv} = c_m\,(\operatorname{softmax}(h_m)_v
- \mathbb{1}(v = t_m))$ with $c_m = w_m / (\sum w + 10^{-6})$, and it reaches the inputs as
$\partial L/\partial x = G W$, $\partial L/\partial W = G^\top x$, $\partial L/\partial b = \sum_m G_m$.
The samples carry no gradient.

**Discriminator** (`rtd_loss`). For logits $z \in \mathbb{R}^{B \times L}$, labels
$y \in \{0, 1\}^{B \times L}$ (1 = replaced) and attention mask $a$:

$$
L_{\text{disc}} = \frac{\sum_{b,l} a_{bl}\,(\operatorname{softplus}(z_{bl}) - y_{bl} z_{bl})}{\sum_{b,l} a_{bl} + 10^{-6}},
\qquad \frac{\partial L_{\text{disc}}}{\partial z_{bl}} = \frac{a_{bl}\,(\sigma(z_{bl}) - y_{bl})}{\sum a + 10^{-6}}.
$$

ELECTRA's total objective is $L_{\text{mlm}} + 50\,L_{\text{disc}}$ with no gradient from
$L_{\text{disc}}$ into the generator (the samples are discrete); combine the two outputs yourself.

Semantics
---------
- `electra_generator_sample(hidden, weight, target, slot_weight, noise, bias=None, *,
  temperature=1.0, disallow_correct=False, reduction="mean")` returns `(loss, samples)`.
  `hidden`: (M, H) hidden states at the masked slots (gather them first; M = 0 is allowed and
  gives loss 0 and no samples), H >= 1. `weight`: (V, H), the `nn.Linear`/embedding layout, V >= 1.
  `bias`: optional (V,). `target`: (M,) integer ids in [0, V). `slot_weight`: (M,) real weights
  (ELECTRA's `masked_lm_weights`, 1 for a real slot and 0 for padding). `noise`: (M, V) uniform
  draws in [0, 1) (e.g. `torch.rand`); the sampler is a deterministic function of it.
  The noise is an explicit input so that any implementation can be checked exactly; a
  counter-based generator inside the kernel would remove this (M, V) input and is a follow-up.
- The loss does not depend on `temperature`: as in the authors' code the MLM loss uses the raw
  logits and only the sampler divides by $T$ (> 0, finite).
- `reduction`: `"mean"` (default) is ELECTRA's $\sum_m w_m \ell_m / (\sum_m w_m + 10^{-6})$, which is
  0 (not NaN) when every slot weight is 0; `"sum"` is $\sum_m w_m \ell_m$; `"none"` the (M,) terms
  $w_m \ell_m$. Slot weights receive no gradient.
- A slot with weight exactly 0 contributes loss 0 and gradient exactly 0, whatever its hidden
  state holds (NaN included): padding slots may carry garbage. Its sample is still drawn (the
  sampler does not look at the weights; ELECTRA discards samples at padding slots).
- `samples`: (M,) int64. Ties of the perturbed score go to the lowest index. A row whose scores
  contain NaN (NaN logits) gets sample -1. `+inf` logits win (the lowest such index); a row of
  `-inf` scores picks index 0.
- With `disallow_correct=True` the original token's score is lowered by 1000, the authors' way
  of preferring a different token (it is not a hard exclusion: a 1000-logit gap still wins).
- NaN in the hidden state of a weighted slot makes its loss NaN and every weight gradient NaN;
  NaN in `weight` or `bias` makes every weighted slot's loss NaN. `+inf` logits give NaN losses.
- Errors: `target` outside [0, V) and `noise` outside [0, 1) (or NaN) raise `ValueError`. The
  accelerated kernel cannot raise on values without a device synchronisation: a bad target makes
  that slot's loss NaN, bad noise makes the slot's loss NaN and its sample -1.
- Masking and corruption are not part of these functions. The library's recommendation, which
  differs from the authors' code: sample masked positions **without** replacement (the code
  samples with replacement, and `scatter_update` then averages the token ids of a duplicated
  position); keep 15% of the chosen positions unchanged and mask the rest (the paper says all are
  masked; the code has no random-token branch). A replaced token equal to the original counts as
  original ($y = 0$).
- `rtd_loss(logits, labels, attention_mask, *, reduction="mean")`: `logits` (B, L) real;
  `labels` (B, L) bool or integers in {0, 1}; `attention_mask` (B, L) bool, integer or real
  weights (1 = real token). `"mean"` is the global token mean above (not a per-sequence mean; 0
  when the mask is all zero); `"sum"` the numerator; `"none"` the (B, L) terms
  $a\,(\operatorname{softplus}(z) - y z)$. Masked tokens ($a = 0$) contribute 0 and gradient 0,
  even when their logits are NaN. Each term is evaluated as $\operatorname{softplus}(\pm z)$
  ($-z$ for a replaced token), itself as $\max(s, 0) + \log(1 + e^{-|s|})$, so $z = \pm\infty$ gives
  0 when the prediction is right and $+\infty$ when it is wrong; the gradient
  $\sigma(z) - y$ is evaluated as $-\sigma(-z)$ for $y = 1$. Labels outside {0, 1} raise `ValueError` (NaN terms in the
  kernel). The mask receives no gradient.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_bool, check_real, check_reduction

__all__ = ["electra_generator_sample", "electra_generator_sample_grad", "rtd_loss", "rtd_loss_grad"]

EPS = 1e-6  # denominators: sum of weights + EPS
GUMBEL_EPS = 1e-9
DISALLOW_PENALTY = 1000.0


# ---------------------------------------------------------------------------------------- generator


def _generator_inputs(hidden, weight, target, slot_weight, noise, bias, temperature, disallow_correct,
                      reduction):
    x = as_float_array(hidden, "hidden", 2, "(M, H)")
    W = as_float_array(weight, "weight", 2, "(V, H)")
    m, h = x.shape
    v = W.shape[0]
    if h < 1:
        raise ValueError(f"hidden must have at least one feature (H >= 1), got shape {x.shape}")
    if W.shape[1] != h:
        raise ValueError(f"weight must have shape (V, {h}) to match hidden's H = {h}, got {W.shape}")
    if v < 1:
        raise ValueError(f"weight must have at least one vocabulary row (V >= 1), got shape {W.shape}")
    b = np.zeros(v) if bias is None else as_float_array(bias, "bias", 1, "(V,)")
    if b.shape != (v,):
        raise ValueError(f"bias must have shape ({v},), one entry per vocabulary row, got {b.shape}")
    t = as_int_array(target, "target", (m,), "token ids")
    bad = (t < 0) | (t >= v)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target[{i}] = {t[i]} is out of range: token ids must lie in [0, {v})")
    w = as_float_array(slot_weight, "slot_weight", 1, "(M,)")
    if w.shape != (m,):
        raise ValueError(f"slot_weight must have shape ({m},) to match hidden, got {w.shape}")
    u = as_float_array(noise, "noise", 2, "(M, V)")
    if u.shape != (m, v):
        raise ValueError(f"noise must have shape ({m}, {v}), one draw per slot and token, got {u.shape}")
    if not np.all((u >= 0.0) & (u < 1.0)):
        raise ValueError("noise must hold uniform draws in [0, 1) (no NaN)")
    check_real(temperature, "temperature", low=0.0, low_open=True)
    check_bool(disallow_correct, "disallow_correct")
    check_reduction(reduction)
    active = w != 0.0
    # Padding slots cannot reach the result: their hidden states are replaced by zeros.
    x_loss = np.where(active[:, None], x, 0.0)
    return x, x_loss, W, b, t, w, u, active


def _log_softmax(h: np.ndarray) -> np.ndarray:
    mx = h.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return h - mx - np.log(np.exp(h - mx).sum(axis=1, keepdims=True))


def _gumbel_argmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise argmax, lowest index on ties; -1 for a row holding NaN."""
    if scores.shape[1] == 0:
        return np.zeros(scores.shape[0], dtype=np.int64)
    nan_row = np.isnan(scores).any(axis=1)
    best = np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)  # first maximum
    return np.where(nan_row, -1, best).astype(np.int64)


def electra_generator_sample(hidden, weight, target, slot_weight, noise, bias=None, *, temperature=1.0,
                             disallow_correct=False, reduction="mean"):
    """ELECTRA generator: MLM loss of the LM head and Gumbel-max replacement samples, ``(loss, samples)``."""
    x, x_loss, W, b, t, w, u, active = _generator_inputs(
        hidden, weight, target, slot_weight, noise, bias, temperature, disallow_correct, reduction)
    m = x.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        logits = x @ W.T + b
        log_p = _log_softmax(x_loss @ W.T + b)
        ce = -log_p[np.arange(m), t]
        terms = np.where(active, w * ce, 0.0)
        g = -np.log(-np.log(u + GUMBEL_EPS) + GUMBEL_EPS)
        scores = logits / temperature + g
        if disallow_correct:
            scores[np.arange(m), t] -= DISALLOW_PENALTY
    samples = _gumbel_argmax(scores)
    if reduction == "none":
        return terms, samples
    if reduction == "sum":
        return np.float64(terms.sum()), samples
    return np.float64(terms.sum() / (w.sum() + EPS)), samples


def electra_generator_sample_grad(grad, hidden, weight, target, slot_weight, noise, bias=None, *,
                                  temperature=1.0, disallow_correct=False, reduction="mean"):
    """VJP of the loss: ``{"hidden": (M, H), "weight": (V, H), "bias": (V,)}`` (no ``"bias"`` without one)."""
    x, x_loss, W, b, t, w, u, active = _generator_inputs(
        hidden, weight, target, slot_weight, noise, bias, temperature, disallow_correct, reduction)
    m = x.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (m,):
            raise ValueError(f"grad must have shape ({m},) for reduction='none', got {grad.shape}")
        coef = grad * w
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        coef = float(grad) * w / (1.0 if reduction == "sum" else w.sum() + EPS)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(_log_softmax(x_loss @ W.T + b))
        onehot = np.eye(W.shape[0])[t]
        g_logits = np.where(active[:, None], coef[:, None] * (p - onehot), 0.0)  # (M, V)
        out = {
            "hidden": np.where(active[:, None], g_logits @ W, 0.0),
            "weight": g_logits.T @ x_loss,
        }
    if bias is not None:
        out["bias"] = g_logits.sum(axis=0)
    return out


# ------------------------------------------------------------------------------------ discriminator


def _rtd_inputs(logits, labels, attention_mask, reduction):
    z = as_float_array(logits, "logits", 2, "(B, L)")
    y = np.asarray(labels)
    if y.dtype.kind not in "biu":
        raise TypeError(f"labels must be a bool or integer array of 0/1 flags, got dtype {y.dtype}")
    if y.shape != z.shape:
        raise ValueError(f"labels must have shape {z.shape} to match logits, got {y.shape}")
    y = y.astype(np.int64)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (original) or 1 (replaced)")
    a = np.asarray(attention_mask)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"attention_mask must be a bool, integer or real array, got dtype {a.dtype}")
    if a.shape != z.shape:
        raise ValueError(f"attention_mask must have shape {z.shape} to match logits, got {a.shape}")
    a = a.astype(np.float64)
    check_reduction(reduction)
    active = a != 0.0
    return np.where(active, z, 0.0), y.astype(np.float64), a, active


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def rtd_loss(logits, labels, attention_mask, *, reduction="mean"):
    """ELECTRA's replaced-token-detection loss: masked binary cross-entropy, a global token mean."""
    z, y, a, active = _rtd_inputs(logits, labels, attention_mask, reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(active, a * _softplus(np.where(y == 1.0, -z, z)), 0.0)  # = softplus(z) - y z
    if reduction == "none":
        return terms
    if reduction == "sum":
        return np.float64(terms.sum())
    return np.float64(terms.sum() / (a.sum() + EPS))


def rtd_loss_grad(grad, logits, labels, attention_mask, *, reduction="mean"):
    """VJP: ``grad`` (shaped like the loss) times d loss / d logits, a (B, L) array."""
    z, y, a, active = _rtd_inputs(logits, labels, attention_mask, reduction)
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != z.shape:
            raise ValueError(f"grad must have shape {z.shape} for reduction='none', got {grad.shape}")
        scale = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        scale = float(grad) / (1.0 if reduction == "sum" else a.sum() + EPS)
    with np.errstate(invalid="ignore", over="ignore"):
        sigmoid_minus_y = np.where(y == 1.0, -_sigmoid(-z), _sigmoid(z))  # sigma(z) - y without cancellation
        return np.where(active, scale * a * sigmoid_minus_y, 0.0)
