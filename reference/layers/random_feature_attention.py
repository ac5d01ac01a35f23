r"""Random-feature attention layer: many heads with frozen random query–key matrices, trainable values.

Paper P47 — *What can a Single Attention Layer Learn? A Study Through the Random Features Lens*
(Fu, Guo, Bai, Mei, NeurIPS 2023).

A query token $x_0 \in \mathbb{R}^d$ attends over key tokens $x_1, \dots, x_N \in \mathbb{R}^d$
through $M$ heads. Head $m$ has a frozen query–key matrix $W_m \in \mathbb{R}^{d \times d}$ (the
product of its query and key matrices, sampled at random) and a trainable value matrix
$V_m \in \mathbb{R}^{d \times D}$:

$$
f(x_{0:N}) = \sum_{m=1}^{M} V_m^\top\, \Phi_m, \qquad
\Phi_m = \frac{1}{N}\sum_{i=1}^{N} \sigma\big(x_0^\top W_m\, x_i\big)\, x_i \in \mathbb{R}^d,
$$

with an elementwise activation $\sigma$ and no softmax normalisation. The layer is linear in the
values, so training it is (ridge) regression on the features $\Phi$:

$$
\frac{\partial L}{\partial V_m} = \sum_b \Phi_{b,m}\, g_b^\top, \qquad g_b = \frac{\partial L}{\partial f_b}.
$$

Semantics
---------
- ``query``: $x_0$, (B, d); ``keys``: (B, N, d), N $\ge$ 1; ``weights``: the frozen
  $W_m$, (M, d, d), M $\ge$ 1, used as $x_0^\top W_m x_i$ (row index meets the query);
  ``values``: $V_m$, (M, d, D). Output: (B, D). N = 0 or M = 0 is a ``ValueError``.
- ``activation``: ``"relu"`` (default, the paper's running example) or ``"exp"``. ReLU propagates
  NaN ($\max(\mathrm{NaN}, 0) = \mathrm{NaN}$). ``exp`` has no stabiliser (the sum is not
  normalised, so subtracting a maximum would change $f$): keep $|x_0^\top W_m x_i|$ small (the paper
  puts tokens on the unit sphere and scales $W_m$ by $1/\sqrt d$ per entry).
- Normalisation: the mean over keys ($1/N$) and a plain sum over heads (no $1/M$: the paper's
  ridge penalty on $V$ absorbs the head scale). The paper's exact constants were not checked
  against its Sec. 2; this is the choice of this library.
- Gradients: only ``values`` is trained (as in the paper). ``query``, ``keys`` and ``weights`` are
  data and frozen random matrices: they carry no gradient (the accelerated path raises if one
  requires it).
- The "biased" sampling of the paper (Gaussian $W_m$ with mean $\mu I$) is a choice of the
  ``weights`` the caller passes; the module form draws $W_m = \mu I + Z/\sqrt d$.
- NaN/inf in a key or the query makes that row's output NaN/inf (through $0 \cdot \infty$ where the
  activation is 0); the values' gradient sums over the batch, so it is NaN too.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_choice

__all__ = ["random_feature_attention", "random_feature_attention_grad", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "exp")


def _inputs(query, keys, weights, values, activation):
    q = as_float_array(query, "query", 2, "(B, d)")
    k = as_float_array(keys, "keys", 3, "(B, N, d)")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[1]:
        raise ValueError(f"keys must have shape ({q.shape[0]}, N, {q.shape[1]}) to match query, got {k.shape}")
    if k.shape[1] < 1:
        raise ValueError(f"keys must hold at least one key token (N >= 1), got shape {k.shape}")
    d = q.shape[1]
    w = as_float_array(weights, "weights", 3, "(M, d, d)")
    if w.shape[0] < 1:
        raise ValueError(f"weights must hold at least one head (M >= 1), got shape {w.shape}")
    if w.shape[1:] != (d, d):
        raise ValueError(f"weights must have shape (M, {d}, {d}) to match query, got {w.shape}")
    v = as_float_array(values, "values", 3, "(M, d, D)")
    if v.shape[:2] != (w.shape[0], d):
        raise ValueError(f"values must have shape ({w.shape[0]}, {d}, D) to match weights, got {v.shape}")
    check_choice(activation, "activation", ACTIVATIONS)
    return q, k, w, v


def _features(q, k, w, activation):
    """Phi (B, M, d): per head, the activation-weighted mean of the keys."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.einsum("bc,mce,bne->bmn", q, w, k)  # x_0^T W_m x_i
        a = np.maximum(s, 0.0) if activation == "relu" else np.exp(s)
        return np.einsum("bmn,bne->bme", a, k) / k.shape[1]


def random_feature_attention(query, keys, weights, values, *, activation="relu"):
    """``sum_m values[m]^T Phi_m`` for each query: (B, D)."""
    q, k, w, v = _inputs(query, keys, weights, values, activation)
    phi = _features(q, k, w, activation)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("bme,med->bd", phi, v)


def random_feature_attention_grad(grad, query, keys, weights, values, *, activation="relu"):
    """Vector-Jacobian product with respect to ``values``: ``sum_b Phi_b (x) grad_b``, (M, d, D)."""
    q, k, w, v = _inputs(query, keys, weights, values, activation)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != (q.shape[0], v.shape[2]):
        raise ValueError(f"grad must have shape {(q.shape[0], v.shape[2])}, got {grad.shape}")
    phi = _features(q, k, w, activation)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("bme,bd->med", phi, grad)
