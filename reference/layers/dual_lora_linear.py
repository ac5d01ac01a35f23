r"""Quality-weighted dual LoRA linear layer: a frozen linear map plus two low-rank adapters mixed per row.

Paper P2 — *PETALface: Parameter Efficient Transfer Learning for Low-resolution Face Recognition*
(Narayan, VS, Patel, WACV 2025).

For rows $x_n \in \mathbb{R}^{d_\text{in}}$, a frozen weight $W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$
and bias $b$, two LoRA pairs $A_i \in \mathbb{R}^{r_i \times d_\text{in}}$,
$B_i \in \mathbb{R}^{d_\text{out} \times r_i}$, a per-row quality weight $\alpha_n$ and a scale $s$,

$$
y_n = W x_n + b + s\,(1 - \alpha_n)\, M^{(1)}_n \odot B_1 A_1 x_n + s\,\alpha_n\, M^{(2)}_n \odot B_2 A_2 x_n ,
$$

where $M^{(i)}$ are the branches' dropout masks on the (N, d_out) adapter outputs (all ones when
not given). With $u^{(i)}_n = A_i x_n$ (rank $r_i$), $c^{(1)}_n = s(1 - \alpha_n)$, $c^{(2)}_n = s\alpha_n$,
$\tilde G^{(i)} = G \odot M^{(i)}$ for the upstream gradient $G$ and $p^{(i)}_n = B_i^\top \tilde G^{(i)}_n$:

$$
\partial x_n = W^\top G_n + \sum_i c^{(i)}_n A_i^\top p^{(i)}_n,\quad
\partial A_i = \sum_n c^{(i)}_n\, p^{(i)}_n x_n^\top,\quad
\partial B_i = \sum_n c^{(i)}_n\, \tilde G^{(i)}_n u^{(i)\top}_n,\quad
\partial \alpha_n = s\,(p^{(2)}_n \cdot u^{(2)}_n - p^{(1)}_n \cdot u^{(1)}_n).
$$

Semantics
---------
- Shapes: ``x`` (N, d_in) (flatten leading dimensions first; the module does), ``weight``
  (d_out, d_in) and ``bias`` (d_out,) or None in `torch.nn.Linear` layout; ``lora_a1`` (r1, d_in),
  ``lora_b1`` (d_out, r1), ``lora_a2`` (r2, d_in), ``lora_b2`` (d_out, r2) (the authors'
  ``trainable_lora_down`` / ``trainable_lora_up`` weights); ``alpha`` (N,). Output (N, d_out).
- Ranks: $1 \le r_i \le \min(d_\text{in}, d_\text{out})$; a larger rank (no longer low rank) or a
  factor of the wrong shape is a ``ValueError`` naming the argument. The two ranks may differ
  (the authors use one r, 8 in their scripts).
- ``scale`` $s$ (keyword, default 1.0): a plain multiplier, as the authors' ``lora_scale``; it is
  **not** PEFT's ``lora_alpha / r`` (pass that value to get PEFT's convention). Finite, any sign.
- ``alpha``: the per-row mixing weight, computed outside the layer (the authors use
  $\alpha = 0.5 + (q - \tau_q)$ from an image-quality score $q$, repeated over each image's tokens).
  It is **not clamped** (code parity): values outside [0, 1] extrapolate. $\alpha_n = 0$ silences
  branch 2 exactly for that row (zero contribution and zero gradient), $\alpha_n = 1$ branch 1.
- Dropout: the authors apply ``nn.Dropout(0.1)`` to each branch's (N, d_out) output, with
  independent masks. Here the masks are explicit inputs ``dropout_mask1`` / ``dropout_mask2``
  (N, d_out), multiplied in as given: pass Bernoulli(1 - p) / (1 - p) draws for inverted dropout.
  None (the default, and evaluation mode) means no dropout. Masks carry no gradient.
- Gradients flow to ``x``, the four LoRA factors and ``alpha``. ``weight`` and ``bias`` are
  frozen (the point of the adapter): no gradient is defined for them, and the accelerated path
  rejects a weight or bias that requires grad.
- NaN/inf: a NaN in a row of ``x`` or in ``alpha_n`` makes that output row NaN; NaN in a factor
  spreads through the products as the maths says (with $\alpha_n = 1$, a NaN in branch 1 still
  gives NaN: $0 \cdot \text{NaN}$).
- Empty shapes: N = 0 gives a (0, d_out) result and zero gradients for the factors.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_real

__all__ = ["dual_lora_linear", "dual_lora_linear_grad"]


def _shape(arr, name, shape, what):
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {arr.shape}")


def _inputs(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias, dropout_mask1, dropout_mask2, scale):
    x = as_float_array(x, "x", 2, "(N, d_in)")
    n, d_in = x.shape
    weight = as_float_array(weight, "weight", 2, "(d_out, d_in)")
    d_out = weight.shape[0]
    _shape(weight, "weight", (d_out, d_in), "(d_out, d_in)")
    factors = []
    for a_name, b_name, a, b in (("lora_a1", "lora_b1", lora_a1, lora_b1), ("lora_a2", "lora_b2", lora_a2, lora_b2)):
        a = as_float_array(a, a_name, 2, "(r, d_in)")
        r = a.shape[0]
        if r < 1:
            raise ValueError(f"{a_name} must have rank r >= 1 rows, got shape {a.shape}")
        if r > min(d_in, d_out):
            raise ValueError(f"{a_name} has rank r = {r}, larger than the dimensions of weight "
                             f"(d_out, d_in) = {(d_out, d_in)}: the rank must be <= min(d_in, d_out)")
        _shape(a, a_name, (r, d_in), "(r, d_in)")
        b = as_float_array(b, b_name, 2, "(d_out, r)")
        _shape(b, b_name, (d_out, r), "(d_out, r)")
        factors += [a, b]
    alpha = as_float_array(alpha, "alpha", 1, "(N,)")
    _shape(alpha, "alpha", (n,), "(N,)")
    if bias is not None:
        bias = as_float_array(bias, "bias", 1, "(d_out,)")
        _shape(bias, "bias", (d_out,), "(d_out,)")
    masks = []
    for name, m in (("dropout_mask1", dropout_mask1), ("dropout_mask2", dropout_mask2)):
        if m is None:
            masks.append(np.ones((n, d_out)))
        else:
            m = as_float_array(m, name, 2, "(N, d_out)")
            _shape(m, name, (n, d_out), "(N, d_out)")
            masks.append(m)
    scale = check_real(scale, "scale")
    return x, weight, factors, alpha, bias, masks, scale


def dual_lora_linear(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias=None,
                     dropout_mask1=None, dropout_mask2=None, *, scale=1.0):
    """Frozen ``x @ weight.T + bias`` plus the two LoRA branches mixed by (1 - alpha) and alpha, (N, d_out)."""
    x, w, (a1, b1, a2, b2), alpha, bias, (m1, m2), s = _inputs(
        x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias, dropout_mask1, dropout_mask2, scale)
    with np.errstate(invalid="ignore", over="ignore"):
        y = x @ w.T
        if bias is not None:
            y = y + bias
        branch1 = m1 * ((x @ a1.T) @ b1.T)
        branch2 = m2 * ((x @ a2.T) @ b2.T)
        return y + (s * (1.0 - alpha))[:, None] * branch1 + (s * alpha)[:, None] * branch2


def dual_lora_linear_grad(grad, x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias=None,
                          dropout_mask1=None, dropout_mask2=None, *, scale=1.0):
    """Vector-Jacobian product: ``{"x", "lora_a1", "lora_b1", "lora_a2", "lora_b2", "alpha"}`` for
    the upstream ``grad`` (N, d_out). The frozen ``weight`` and ``bias`` get none."""
    x, w, (a1, b1, a2, b2), alpha, bias, (m1, m2), s = _inputs(
        x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias, dropout_mask1, dropout_mask2, scale)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != (x.shape[0], w.shape[0]):
        raise ValueError(f"grad must have shape {(x.shape[0], w.shape[0])}, got {g.shape}")
    c1, c2 = s * (1.0 - alpha), s * alpha
    with np.errstate(invalid="ignore", over="ignore"):
        u1, u2 = x @ a1.T, x @ a2.T
        g1, g2 = g * m1, g * m2
        p1, p2 = g1 @ b1, g2 @ b2
        q1, q2 = c1[:, None] * p1, c2[:, None] * p2
        return {
            "x": g @ w + q1 @ a1 + q2 @ a2,
            "lora_a1": q1.T @ x,
            "lora_b1": g1.T @ (c1[:, None] * u1),
            "lora_a2": q2.T @ x,
            "lora_b2": g2.T @ (c2[:, None] * u2),
            "alpha": s * ((p2 * u2).sum(axis=1) - (p1 * u1).sum(axis=1)),
        }
