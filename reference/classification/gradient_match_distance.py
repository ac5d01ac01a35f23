r"""Gradient-matching distance of dataset condensation (DC / DSA / DCC): a layer-wise, row-wise
cosine distance between the gradients a network receives from synthetic and from real data.

Paper P17 — *Dataset Condensation with Contrastive Signals* (Lee, Chun, Jung, Yun, Yoon, ICML 2022).

Given two lists of parameter gradients of the same shapes, $G^s = (g^s_\ell)$ (synthetic data,
carries the gradient) and $G^r = (g^r_\ell)$ (real data, a constant), each tensor is viewed as a
matrix whose rows are the output units of its layer, and for row $o$ with $a = g^r_{\ell,o}$,
$b = g^s_{\ell,o}$

$$
d_{\ell,o} = 1 - \frac{\langle a, b\rangle}{\lVert a\rVert\,\lVert b\rVert + \varepsilon},
\qquad
D_{\text{ours}}(G^s, G^r) = \sum_{\ell:\ \dim g_\ell \ge 2}\ \sum_o d_{\ell,o}.
$$

With $s = \langle a, b\rangle$, $n_a = \lVert a\rVert$, $n_b = \lVert b\rVert$ and
$Q = n_a n_b + \varepsilon$, the gradient with respect to the synthetic row is

$$
\frac{\partial d_{\ell,o}}{\partial b} = -\frac{a}{Q} + \frac{s\, n_a}{n_b\, Q^2}\, b
\qquad (\text{second term } 0 \text{ when } n_b = 0).
$$

The two other metrics of the authors' code compare the concatenation $\mathbf{a}$, $\mathbf{b}$ of
*all* tensors (1-D ones included): `"mse"` is $\lVert \mathbf{b} - \mathbf{a}\rVert^2$ (gradient
$2(\mathbf{b} - \mathbf{a})$) and `"cos"` is
$1 - \langle \mathbf{a}, \mathbf{b}\rangle / (\lVert\mathbf{a}\rVert\,\lVert\mathbf{b}\rVert + \varepsilon)$
(the row formula above applied to the whole concatenation).

Semantics
---------
- ``grads_syn``, ``grads_real``: sequences (list or tuple) of the same length $L \ge 0$; entry
  $\ell$ of both has the same shape, with 1 to 4 dimensions. Row views, as in the authors'
  ``distance_wb``: 4-D $(O, I, k_h, k_w) \to (O, I k_h k_w)$ (convolution weights), 3-D
  $(C, h, w) \to (C, h w)$, 2-D $(O, I)$ as is (linear weights); 1-D tensors (biases, norm scales
  and shifts) contribute exactly 0 to ``"ours"`` and receive a zero gradient, whatever their
  values (NaN included). 0-D or 5-D and higher tensors are a ``ValueError``.
- The result is a 0-d array: a **sum** over rows and tensors (no mean). An empty list gives 0 for
  ``"ours"`` and ``"mse"`` and $1 - 0/\varepsilon = 1$ for ``"cos"``; a tensor with no rows
  contributes 0; a row of length 0 (or of zeros) has $s = 0$ and contributes $d = 1$.
- ``eps`` $\ge 0$ (default ``1e-6``, the authors' value) is added to the product of the norms,
  not to each norm; ``"mse"`` ignores it. With ``eps = 0`` a zero row gives NaN (0/0).
- Gradient: only ``grads_syn`` is differentiated; the real gradients are constants (the authors
  detach them). A zero synthetic row gets gradient $-a/\varepsilon$ (the second term is defined
  as 0 there, as PyTorch's norm backward does at 0). ``gradient_match_distance_grad`` returns a
  list shaped like ``grads_syn``.
- NaN or $\pm\infty$ in a compared row propagates to the distance (and to that row's gradient);
  it is not masked.
- ``gradient_match_distance_named`` is the same distance with the tensors passed by keyword,
  ``g_s_0, g_r_0, g_s_1, g_r_1, …`` (index order is list order): the form the conformance suite,
  golden vectors and ports use, since their inputs are named arrays.
"""

from __future__ import annotations

import re

import numpy as np

from .._checks import check_choice, check_real

__all__ = [
    "gradient_match_distance",
    "gradient_match_distance_grad",
    "gradient_match_distance_named",
    "gradient_match_distance_named_grad",
]

METRICS = ("ours", "mse", "cos")


def _as_grad(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if not 1 <= arr.ndim <= 4:
        raise ValueError(f"{name} must have 1 to 4 dimensions (a parameter gradient), got shape {arr.shape}")
    return arr.astype(np.float64)


def _inputs(grads_syn, grads_real, metric, eps):
    for seq, name in ((grads_syn, "grads_syn"), (grads_real, "grads_real")):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of gradient arrays, got {type(seq).__name__}")
    if len(grads_real) != len(grads_syn):
        raise ValueError(f"grads_real has {len(grads_real)} tensors but grads_syn has {len(grads_syn)}")
    syn = [_as_grad(g, f"grads_syn[{i}]") for i, g in enumerate(grads_syn)]
    real = [_as_grad(g, f"grads_real[{i}]") for i, g in enumerate(grads_real)]
    for i, (s, r) in enumerate(zip(syn, real)):
        if s.shape != r.shape:
            raise ValueError(f"grads_real[{i}] has shape {r.shape} but grads_syn[{i}] has shape {s.shape}")
    check_choice(metric, "metric", METRICS)
    eps = check_real(eps, "eps", low=0.0)
    return syn, real, eps


def _rows(x: np.ndarray) -> np.ndarray:
    """The row view of a gradient of 2 to 4 dimensions: one row per output unit."""
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def gradient_match_distance(grads_syn, grads_real, *, metric="ours", eps=1e-6):
    """Distance between synthetic and real parameter gradients (P17 / DC's ``match_loss``)."""
    syn, real, eps = _inputs(grads_syn, grads_real, metric, eps)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if metric == "ours":
            total = 0.0
            for b, a in zip(syn, real):
                if b.ndim == 1:
                    continue
                a, b = _rows(a), _rows(b)
                dot = (a * b).sum(axis=1)
                q = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps
                total += float(np.sum(1.0 - dot / q))
            return np.float64(total)
        a = np.concatenate([g.reshape(-1) for g in real] + [np.zeros(0)])
        b = np.concatenate([g.reshape(-1) for g in syn] + [np.zeros(0)])
        if metric == "mse":
            return np.float64(np.sum((b - a) ** 2))
        return np.float64(1.0 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps))


def _cos_row_grad(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """d/db of 1 - <a,b>/(|a||b| + eps) for each row of the (R, L) arrays a, b."""
    dot = (a * b).sum(axis=-1, keepdims=True)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    q = na * nb + eps
    second = np.where(nb > 0, dot * na / np.where(nb > 0, nb, 1.0) / q**2, 0.0)
    return -a / q + second * b


def gradient_match_distance_grad(grad, grads_syn, grads_real, *, metric="ours", eps=1e-6):
    """Vector-Jacobian product with respect to ``grads_syn``: a list of arrays shaped like it."""
    syn, real, eps = _inputs(grads_syn, grads_real, metric, eps)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != ():
        raise ValueError(f"grad must be a scalar (the distance is a scalar), got shape {g.shape}")
    g = float(g)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if metric == "ours":
            return [np.zeros_like(b) if b.ndim == 1 else g * _cos_row_grad(_rows(a), _rows(b), eps).reshape(b.shape)
                    for b, a in zip(syn, real)]
        if metric == "mse":
            return [2.0 * g * (b - a) for b, a in zip(syn, real)]
        a = np.concatenate([x.reshape(-1) for x in real] + [np.zeros(0)])
        b = np.concatenate([x.reshape(-1) for x in syn] + [np.zeros(0)])
        flat = g * _cos_row_grad(a, b, eps)
        out, start = [], 0
        for x in syn:
            out.append(flat[start:start + x.size].reshape(x.shape))
            start += x.size
        return out


_NAME = re.compile(r"g_([sr])_(\d+)$")


def split_named(tensors: dict) -> tuple[list, list]:
    """``{g_s_0, g_r_0, g_s_1, …}`` as ``(grads_syn, grads_real)`` lists, in index order."""
    syn, real = {}, {}
    for key, value in tensors.items():
        m = _NAME.match(key)
        if m is None:
            raise TypeError(f"unexpected argument {key!r}: tensors are passed as g_s_<i> and g_r_<i>")
        (syn if m.group(1) == "s" else real)[int(m.group(2))] = value
    count = max(len(syn), len(real))
    for side, found in (("g_s", syn), ("g_r", real)):
        missing = [i for i in range(count) if i not in found]
        if missing:
            raise ValueError(f"{side}_{missing[0]} is missing: g_s_<i> and g_r_<i> must both be given "
                             "for i = 0, 1, ... without gaps")
    return [syn[i] for i in range(count)], [real[i] for i in range(count)]


def gradient_match_distance_named(*, metric="ours", eps=1e-6, **tensors):
    """`gradient_match_distance` with the tensors passed as ``g_s_0=…, g_r_0=…, g_s_1=…, …``."""
    syn, real = split_named(tensors)
    return gradient_match_distance(syn, real, metric=metric, eps=eps)


def gradient_match_distance_named_grad(grad, *, metric="ours", eps=1e-6, **tensors):
    """`gradient_match_distance_grad` for the named form: ``{"g_s_<i>": gradient}``."""
    syn, real = split_named(tensors)
    grads = gradient_match_distance_grad(grad, syn, real, metric=metric, eps=eps)
    return {f"g_s_{i}": g for i, g in enumerate(grads)}
