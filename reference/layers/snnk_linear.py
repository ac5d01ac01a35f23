r"""SNNK linear layer: a random-feature map of the input followed by trainable feature-space weights.

Paper P44 — *Scalable Neural Network Kernels* (Sehanobish, Choromanski, Zhao, Dubey, Likhosherstov,
ICLR 2024).

A frozen projection $G \in \mathbb{R}^{m \times d}$ (rows $g_i$) maps an input row $x \in \mathbb{R}^d$
to $m$ random features; the layer is linear in those features with a trainable
$\Psi \in \mathbb{R}^{o \times m}$ (initialised in the paper to $\phi(W)$ of an ordinary weight
matrix $W$, row by row) and an optional bias $b$:

$$
y = \phi(x)\,\Psi^\top + b, \qquad
\phi_{\mathrm{relu}}(x)_i = \frac{1}{\sqrt m}\max(g_i^\top x,\; c), \qquad
\phi_{\exp}(x)_i = \frac{A_i}{\sqrt m}\exp\!\Big(a_i\, g_i^\top x - \frac{a_i^2 \lVert x \rVert^2}{2}\Big).
$$

`feature="exp"` is the paper's universal random features (URF); with $A \equiv a \equiv 1$ it is
Performer's positive random features and $\mathbb{E}[\phi(x)^\top\phi(w)] = \exp(x^\top w)$.

Gradients (with $H = \partial y\,\Psi$, an $N \times m$ matrix, and $s_i = g_i^\top x$):

$$
\partial\Psi = \partial y^\top \phi(x), \qquad \partial b = \textstyle\sum_n \partial y_n, \qquad
\partial x_{\mathrm{relu}} = \frac{1}{\sqrt m}\big(H \odot [s > c]\big) G, \qquad
\partial x_{\exp} = (U \odot a)\,G - \Big(\sum_i U_i a_i^2\Big) x,\; U = H \odot \phi(x).
$$

Semantics
---------
- ``x``: (..., d) real, at least 2-D (rows are the leading dimensions flattened: (N, d) or
  (B, S, d)). ``projection``: $G$, (m, d), m $\ge$ 1 (m = 0 is a ``ValueError``: no features).
  ``weight``: $\Psi$, (o, m). ``bias``: (o,) or None. Output: (..., o).
- ``projection``, ``rate`` ($a$) and ``amplitude`` ($A$) are frozen inputs: they carry no gradient.
  The projection is never drawn inside; pass Gaussian rows or block-orthogonal rows with
  $\chi(d)$ norms (the authors seed it with 0). ``weight``, ``bias`` and ``x`` carry gradients.
- ``feature``: ``"relu"`` (default, the paper's ReLU-SNNK) or ``"exp"`` (URF).
- ``floor``: $c$, the ReLU floor (default 0.0, plain ReLU; a negative value gives the "leaky"
  floor of the authors' code). Any finite real. At $s_i = c$ the subgradient is 0. Used only with
  ``feature="relu"``.
- ``rate`` ($a$, (m,)) and ``amplitude`` ($A$, (m,)): per-feature coefficients of the URF map, None
  meaning all ones. Passing either with ``feature="relu"`` is a ``ValueError``.
- No max-subtraction in the exp map: the output is not normalised, so a stabiliser would change y.
  The exponent overflows (inf, then NaN through ``inf * 0``) once it passes ~88 in float32; keep
  $\lVert x\rVert$ bounded (the authors scale inputs by $d^{-1/4}$ or normalise them).
- NaN/inf in a row of ``x`` makes that row's output NaN/inf (the ReLU map propagates NaN:
  $\max(\mathrm{NaN}, c) = \mathrm{NaN}$); the weight gradient sums over rows, so it is NaN too.
  The ReLU gradient mask is $[s_i > c]$, false for a NaN pre-activation, so with
  ``feature="relu"`` a NaN row of ``x`` gets a zero ``x`` gradient; with ``"exp"`` it is NaN. Empty input (N = 0) gives an (0, o) output and zero
  weight/bias gradients.
- The 1/√m factor is inside $\phi$ (as in the authors' `phi_relu_mapping_torch`), so weights
  initialised as $\phi(W)$ reproduce $\phi(x)^\top\phi(w) \approx$ the kernel.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_choice, check_real

__all__ = ["snnk_linear", "snnk_linear_grad", "FEATURES"]

FEATURES = ("relu", "exp")


def _inputs(x, projection, weight, bias, rate, amplitude, feature, floor):
    xa = np.asarray(x)
    if xa.dtype.kind not in "fiu" or xa.dtype == np.bool_:
        raise TypeError(f"x must be a real floating-point array, got dtype {xa.dtype}")
    if xa.ndim < 2:
        raise ValueError(f"x must have shape (..., N, d) with at least 2 dimensions, got {xa.ndim} dimensions {xa.shape}")
    xa = xa.astype(np.float64)
    g = as_float_array(projection, "projection", 2, "(m, d)")
    if g.shape[0] < 1:
        raise ValueError(f"projection must have at least one row (m >= 1 random features), got shape {g.shape}")
    if g.shape[1] != xa.shape[-1]:
        raise ValueError(f"projection must have shape (m, {xa.shape[-1]}) to match x's last dimension, got {g.shape}")
    m = g.shape[0]
    w = as_float_array(weight, "weight", 2, "(out, m)")
    if w.shape[1] != m:
        raise ValueError(f"weight must have shape (out, {m}) (one column per random feature), got {w.shape}")
    b = None
    if bias is not None:
        b = as_float_array(bias, "bias", 1, "(out,)")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},) to match weight, got {b.shape}")
    check_choice(feature, "feature", FEATURES)
    floor = check_real(floor, "floor")
    if feature == "relu" and (rate is not None or amplitude is not None):
        raise ValueError("rate and amplitude apply to feature='exp' only; pass None with feature='relu'")
    coef = []
    for name, v in (("rate", rate), ("amplitude", amplitude)):
        if v is None:
            coef.append(np.ones(m))
        else:
            arr = as_float_array(v, name, 1, "(m,)")
            if arr.shape != (m,):
                raise ValueError(f"{name} must have shape ({m},), one entry per random feature, got {arr.shape}")
            coef.append(arr)
    return xa, g, w, b, coef[0], coef[1], floor


def _features(x2, g, a, amp, feature, floor):
    """Pre-activations s = x G^T and features phi (both (N, m))."""
    m = g.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        s = x2 @ g.T
        if feature == "relu":
            return s, np.maximum(s, floor) / np.sqrt(m)
        sq = (x2 * x2).sum(axis=1, keepdims=True)
        return s, amp / np.sqrt(m) * np.exp(a * s - a * a * sq / 2.0)


def snnk_linear(x, projection, weight, bias=None, rate=None, amplitude=None, *, feature="relu", floor=0.0):
    """``phi(x) @ weight.T + bias`` with the random-feature map ``phi`` of ``projection``; (..., out)."""
    xa, g, w, b, a, amp, floor = _inputs(x, projection, weight, bias, rate, amplitude, feature, floor)
    x2 = xa.reshape(-1, xa.shape[-1])
    _, phi = _features(x2, g, a, amp, feature, floor)
    with np.errstate(over="ignore", invalid="ignore"):
        y = phi @ w.T
        if b is not None:
            y = y + b
    return y.reshape(xa.shape[:-1] + (w.shape[0],))


def snnk_linear_grad(grad, x, projection, weight, bias=None, rate=None, amplitude=None, *, feature="relu",
                     floor=0.0):
    """Vector-Jacobian product: ``{"x", "weight", "bias"}`` gradients (``bias`` only when given).
    ``projection``, ``rate`` and ``amplitude`` are frozen."""
    xa, g, w, b, a, amp, floor = _inputs(x, projection, weight, bias, rate, amplitude, feature, floor)
    grad = np.asarray(grad, dtype=np.float64)
    want = xa.shape[:-1] + (w.shape[0],)
    if grad.shape != want:
        raise ValueError(f"grad must have shape {want}, got {grad.shape}")
    x2 = xa.reshape(-1, xa.shape[-1])
    dy = grad.reshape(-1, w.shape[0])
    s, phi = _features(x2, g, a, amp, feature, floor)
    m = g.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        h = dy @ w  # (N, m): d loss / d phi
        if feature == "relu":
            dx = (h * (s > floor)) @ g / np.sqrt(m)
        else:
            u = h * phi
            dx = (u * a) @ g - (u * a * a).sum(axis=1, keepdims=True) * x2
        out = {"x": dx.reshape(xa.shape), "weight": dy.T @ phi}
    if b is not None:
        out["bias"] = dy.sum(axis=0)
    return out
