r"""KD-Loss for facial landmark regression: a main loss plus two teacher-assisted terms.

Paper P14 — *Facial Landmark Points Detection Using Knowledge Distillation-Based Neural Networks*
(Ali Pourramezan Fard, Mohammad H. Mahoor, Computer Vision and Image Understanding 2022).

Every operation is elementwise over (N, 2L) landmark coordinates: the student's prediction $p$,
the ground truth $g$, the tough teacher's prediction $u$ and the tolerant teacher's prediction $o$.
The teachers are *reflected* to the student's side of the ground truth, with
$\sigma = \operatorname{sign}(p - g)$ and reflection factor $\beta$ (0.15):

$$
T_u = g + \sigma\,|u - g|, \qquad b_u = g + \beta\,\sigma\,|u - g|, \qquad
T_o = g + \sigma\,|o - g|, \qquad b_o = g + \beta\,\sigma\,|o - g|.
$$

Assistive weight maps (piecewise constant in $p$): beyond the teacher pull towards it, between
$b$ and the teacher push away from it,

$$
W_u = \alpha_u\,[\operatorname{sign}(p - T_u)\operatorname{sign}(T_u - g) > 0]
    + \alpha_u^-\,[\operatorname{sign}(T_u - p)\operatorname{sign}(p - b_u) \ge 0],
$$

and $W_o$ likewise with $(\alpha_o, \alpha_o^-, T_o, b_o)$. The main term is a 3·L1 / L2 hybrid with
threshold $d = |g - o|$ (continuous at $e = d$), with $e = |g - p|$:

$$
m = \begin{cases} 3e & e \le d \\ e^2 + 3d - d^2 & e > d \end{cases}, \qquad
\ell = w_{\text{main}}\, m + w_u\, W_u\, |T_u - p| + w_o\, W_o\, |T_o - p|,
$$

and the loss is the mean of $\ell$ over all $N \cdot 2L$ entries (the authors' three
``reduce_mean`` terms). Its gradient with respect to $p$ ($T$, $b$, $W$ are piecewise constant) is

$$
\frac{\partial \ell}{\partial p} = w_{\text{main}}\bigl(3\operatorname{sign}(p - g)\,[e \le d]
 + 2(p - g)\,[e > d]\bigr) + w_u W_u \operatorname{sign}(p - T_u) + w_o W_o \operatorname{sign}(p - T_o).
$$

Semantics
---------
- ``pred`` (student), ``target`` (ground truth), ``tough`` and ``tolerant`` (teacher predictions):
  real arrays of one shape (N, 2L) with N >= 1 and 2L >= 1 (no broadcasting). Only ``pred``
  receives a gradient: the teachers are constants of the loss and the targets are data.
- Defaults are the authors' (aliprf/KD-Loss: ``custom_Losses.kd_loss``, the alphas of
  ``student_train.py``, the weights of ``main.py``): ``alpha_tough=1.9``,
  ``alpha_tough_neg=-0.45``, ``alpha_tolerant=1.8``, ``alpha_tolerant_neg=-0.4``,
  ``main_weight=2.0``, ``tough_weight=1.0``, ``tolerant_weight=1.0``, ``reflection=0.15``.
  Alphas and weights are any finite reals; ``reflection`` lies in [0, 1] (so $b$ lies between
  $g$ and $T$).
- Boundaries follow the code exactly: $\operatorname{sign}(0) = 0$; the positive map uses a strict
  ``> 0`` and the negative map an inclusive ``>= 0``; the main term takes the L1 branch at
  $e = d$ (``<=``). Consequences: at $p = g$ both reflected teachers collapse onto $g$, the
  negative maps are active but multiply $|T - p| = 0$, and the loss and gradient of the
  assistive terms are 0; at $p = T$ the negative map is active with $|T - p| = 0$ and the
  gradient term $\operatorname{sign}(0) = 0$; a teacher equal to the ground truth ($u = g$)
  gives $W_u = 0$; $o = g$ gives $d = 0$, so the main term is the L2 branch $e^2$ for every
  $p \ne g$ (and 0 at $p = g$).
- The authors' code measures the main term's threshold with the *reflected* tolerant teacher,
  $|g - T_o| = |\sigma|\,|g - o|$, which differs from $|g - o|$ only at $p = g$, where both give
  $m = 0$ and a zero gradient; the reference uses $d = |g - o|$.
- ``reduction``: ``"mean"`` (default, the paper's: sum over all entries divided by $N \cdot 2L$),
  ``"sum"``, or ``"none"`` for the (N, 2L) elementwise losses $\ell$.
- NaN in any input gives NaN at that entry (and in a mean or sum), in the loss and in the
  gradient. Infinite inputs follow IEEE arithmetic through the formulas above (e.g. an infinite
  ``pred`` gives an infinite loss).
- Region tests compare computed values of $T$ and $b$ with $p$: an implementation in another
  precision may pick the other side of a boundary when $p$ lies within rounding of $b$. Ties at
  $p = g$, $p = T$ and $e = d$ are decided exactly in any precision whose arithmetic forms
  $u - g$, $o - g$ and $p - g$ without rounding (e.g. inputs on a common power-of-two grid).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_real, check_reduction

__all__ = ["kd_landmark_loss", "kd_landmark_loss_grad"]

def check_kd_hyper(alpha_tough, alpha_tough_neg, alpha_tolerant, alpha_tolerant_neg,
                   main_weight, tough_weight, tolerant_weight, reflection, reduction) -> tuple:
    """The hyper-parameters as floats, in the order above (shared with the accelerated entry)."""
    values = tuple(check_real(v, name) for v, name in (
        (alpha_tough, "alpha_tough"), (alpha_tough_neg, "alpha_tough_neg"),
        (alpha_tolerant, "alpha_tolerant"), (alpha_tolerant_neg, "alpha_tolerant_neg"),
        (main_weight, "main_weight"), (tough_weight, "tough_weight"), (tolerant_weight, "tolerant_weight"),
    ))
    check_reduction(reduction)
    return values + (check_real(reflection, "reflection", low=0.0, high=1.0),)


def _inputs(pred, target, tough, tolerant):
    p = as_float_array(pred, "pred", 2, "(N, 2L)")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"pred must have at least one row and one coordinate, got shape {p.shape}")
    out = [p]
    for x, name in ((target, "target"), (tough, "tough"), (tolerant, "tolerant")):
        a = as_float_array(x, name, 2, "(N, 2L)")
        if a.shape != p.shape:
            raise ValueError(f"{name} must have the shape of pred {p.shape}, got {a.shape}")
        out.append(a)
    return out


def _assist(p, g, teacher, alpha, alpha_neg, reflection):
    """Reflected teacher T and the weight map W of one assistive term."""
    side = np.sign(p - g)
    t = g + side * np.abs(teacher - g)
    b = g + reflection * side * np.abs(teacher - g)
    with np.errstate(invalid="ignore"):
        pull = np.sign(p - t) * np.sign(t - g) > 0
        push = np.sign(t - p) * np.sign(p - b) >= 0
    return t, alpha * pull + alpha_neg * push


def _terms(pred, target, tough, tolerant, hyper):
    a_u, a_u_neg, a_o, a_o_neg, w_main, w_u, w_o, reflection = hyper
    p, g, u, o = _inputs(pred, target, tough, tolerant)
    with np.errstate(invalid="ignore", over="ignore"):
        t_u, map_u = _assist(p, g, u, a_u, a_u_neg, reflection)
        t_o, map_o = _assist(p, g, o, a_o, a_o_neg, reflection)
        e, d = np.abs(g - p), np.abs(g - o)
        linear = e <= d
    return p, g, t_u, map_u, t_o, map_o, e, d, linear, (w_main, w_u, w_o)


def kd_landmark_loss(pred, target, tough, tolerant, *, alpha_tough=1.9, alpha_tough_neg=-0.45,
                     alpha_tolerant=1.8, alpha_tolerant_neg=-0.4, main_weight=2.0, tough_weight=1.0,
                     tolerant_weight=1.0, reflection=0.15, reduction="mean"):
    """KD-Loss of P14: the 3·L1 / L2 main term plus the tough and tolerant teachers' assistive terms."""
    hyper = check_kd_hyper(alpha_tough, alpha_tough_neg, alpha_tolerant, alpha_tolerant_neg,
                           main_weight, tough_weight, tolerant_weight, reflection, reduction)
    p, g, t_u, map_u, t_o, map_o, e, d, linear, (w_main, w_u, w_o) = _terms(pred, target, tough, tolerant, hyper)
    with np.errstate(invalid="ignore", over="ignore"):
        main = np.where(linear, 3.0 * e, e * e + 3.0 * d - d * d)
        loss = w_main * main + w_u * (map_u * np.abs(t_u - p)) + w_o * (map_o * np.abs(t_o - p))
    if reduction == "none":
        return loss
    return np.float64(loss.sum() if reduction == "sum" else loss.mean())


def kd_landmark_loss_grad(grad, pred, target, tough, tolerant, *, alpha_tough=1.9, alpha_tough_neg=-0.45,
                          alpha_tolerant=1.8, alpha_tolerant_neg=-0.4, main_weight=2.0, tough_weight=1.0,
                          tolerant_weight=1.0, reflection=0.15, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d pred, an (N, 2L) array."""
    hyper = check_kd_hyper(alpha_tough, alpha_tough_neg, alpha_tolerant, alpha_tolerant_neg,
                           main_weight, tough_weight, tolerant_weight, reflection, reduction)
    p, g, t_u, map_u, t_o, map_o, e, d, linear, (w_main, w_u, w_o) = _terms(pred, target, tough, tolerant, hyper)
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != p.shape:
            raise ValueError(f"grad must have shape {p.shape} for reduction='none', got {grad.shape}")
    elif grad.shape != ():
        raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
    elif reduction == "mean":
        grad = grad / p.size
    with np.errstate(invalid="ignore", over="ignore"):
        main = np.where(linear, 3.0 * np.sign(p - g), 2.0 * (p - g))
        local = w_main * main + w_u * (map_u * np.sign(p - t_u)) + w_o * (map_o * np.sign(p - t_o))
        return grad * local
