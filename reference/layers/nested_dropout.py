r"""Nested dropout: keep a prefix of each feature vector and zero the rest.

Paper P62 — *Compressing Features for Learning with Noisy Labels* (Chen, Shen, Hu, Suykens, IEEE TNNLS 2022).

For features $x \in \mathbb{R}^{N \times D}$ and a cut-off $k_i \in \{0, \dots, D\}$ per row,

$$
y_{ij} = x_{ij}\,[\,j < k_i\,] \qquad (j = 0, \dots, D - 1),
$$

with no rescaling of the kept prefix. The gradient passes through the kept prefix and is zero
elsewhere: $\partial x_{ij} = \partial y_{ij}\,[\,j < k_i\,]$.

In training the authors draw **one** cut-off per mini-batch from a discretised half-Gaussian,

$$
P(k) \propto \exp\!\left(-\left(\frac{k - \mu}{\sigma}\right)^{2}\right), \qquad k \in \{1, \dots, D\},\ \mu = 0,
$$

(no factor $\tfrac12$ in the exponent, as in their ``GaussianDist``), with $\sigma$ the ``--nested``
argument (10, 100 or 200 in their scripts). `nested_dropout_cutoff_probs` gives that law.

Semantics
---------
- ``x``: (N, D) real. ``k``: (N,) integer cut-offs, one per row (the random draw is an explicit
  input, never made inside). The authors' per-batch draw is ``k`` filled with one value; classic
  nested dropout (Rippel et al. 2014, a geometric cut-off per example) is a per-row ``k``.
- ``k_i`` must lie in ``[0, D]``: ``k_i = 0`` zeroes the row, ``k_i = D`` keeps it whole. A value
  outside is a ``ValueError`` naming ``k`` (the accelerated path, which cannot raise on tensor
  values without a device synchronisation, returns that row as NaN instead).
- ``training`` (keyword, default True): in evaluation mode (``training=False``) the layer is the
  identity and ``k`` is not used, as the authors evaluate on the full vector. To evaluate a chosen
  prefix length K, call with ``training=True`` and ``k`` filled with K.
- Dropped entries are never read: NaN or inf past the cut-off does not reach the output (it is an
  exact 0) nor the gradient. NaN/inf inside the prefix propagates.
- Empty shapes: N = 0 gives a (0, D) result, D = 0 a (N, 0) result (then every ``k_i`` must be 0).
- Output: (N, D), the input's dtype in the accelerated path.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_bool, check_int, check_real

__all__ = ["nested_dropout", "nested_dropout_grad", "nested_dropout_cutoff_probs"]


def _inputs(x, k, training):
    x = as_float_array(x, "x", 2, "(N, D)")
    k = as_int_array(k, "k", (x.shape[0],), what="cut-offs (one per row of x)")
    training = check_bool(training, "training")
    bad = (k < 0) | (k > x.shape[1])
    if training and bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"k[{i}] = {k[i]} is out of range: cut-offs must lie in [0, {x.shape[1]}] (D = {x.shape[1]})")
    return x, k, training


def _keep(k, d):
    """(N, D) boolean mask of the kept prefix, [j < k_i]."""
    return np.arange(d)[None, :] < k[:, None]


def nested_dropout(x, k, *, training=True):
    """``x`` with every row's features from index ``k_i`` on set to 0; ``x`` itself when not training."""
    x, k, training = _inputs(x, k, training)
    if not training:
        return x.copy()
    return np.where(_keep(k, x.shape[1]), x, 0.0)


def nested_dropout_grad(grad, x, k, *, training=True):
    """Vector-Jacobian product: ``grad`` (N, D) restricted to the kept prefix of each row."""
    x, k, training = _inputs(x, k, training)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != x.shape:
        raise ValueError(f"grad must have shape {x.shape}, got {grad.shape}")
    if not training:
        return grad.copy()
    return np.where(_keep(k, x.shape[1]), grad, 0.0)


def nested_dropout_cutoff_probs(d, *, sigma):
    """P(k) for k = 1..D (a (D,) array summing to 1): the authors' discretised half-Gaussian
    $\\propto \\exp(-(k/\\sigma)^2)$. ``sigma`` > 0 (their ``--nested``; 0 there disables the layer)."""
    d = check_int(d, "d")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    sigma = check_real(sigma, "sigma", low=0.0, low_open=True)
    logits = -((np.arange(1, d + 1, dtype=np.float64) / sigma) ** 2)
    p = np.exp(logits - logits.max())
    return p / p.sum()
