r"""Poincaré-ball operations and the Hyp-OC losses: exponential map at the origin (with feature
clipping), geodesic distance, hyperbolic multinomial logistic regression cross-entropy, and the
pairwise-confusion loss.

Paper P48 — *Hyp-OC: Hyperbolic One Class Classification for Face Anti-Spoofing* (Narayan, Patel, FG 2024).

The Poincaré ball of curvature $-c$ ($c > 0$) is $\mathbb{B}_c = \{x \in \mathbb{R}^D : c\lVert x\rVert^2 < 1\}$,
with Möbius addition
$$
u \oplus_c v = \frac{(1 + 2c\langle u,v\rangle + c\lVert v\rVert^2)\,u + (1 - c\lVert u\rVert^2)\,v}
{1 + 2c\langle u,v\rangle + c^2\lVert u\rVert^2\lVert v\rVert^2}
$$
and conformal factor $\lambda_p = 2 / (1 - c\lVert p\rVert^2)$.

**`poincare_expmap0`** (feature clipping, then the exponential map at 0, then projection):
$$
u = x\,\min\!\Big(1, \frac{r}{\lVert x\rVert + 10^{-5}}\Big), \qquad
y = \frac{\tanh(\sqrt{c}\,\lVert u\rVert)}{\sqrt{c}\,\lVert u\rVert}\,u, \qquad
y \leftarrow \frac{1-\epsilon}{\sqrt c}\,\frac{y}{\lVert y\rVert} \ \text{ if } \lVert y\rVert > \frac{1-\epsilon}{\sqrt c}.
$$

**`poincare_distance`** (row $i$ of $x$ against row $i$ of $y$), with $\delta = \lVert x - y\rVert^2$:
$$
d_c(x, y) = \frac{2}{\sqrt c}\operatorname{artanh}\!\big(\sqrt c\,\lVert(-x)\oplus_c y\rVert\big)
= \frac{1}{\sqrt c}\operatorname{arcosh}\!\Big(1 + \frac{2c\,\delta}{(1 - c\lVert x\rVert^2)(1 - c\lVert y\rVert^2)}\Big).
$$

**`hyperbolic_mlr_ce`**: class $k$ has an offset $p_k \in \mathbb{B}_c$ and a normal $a_k \in \mathbb{R}^D$; the logit of a
point $x \in \mathbb{B}_c$ is the signed distance to the hyperbolic hyperplane
$$
\xi_k(x) = \frac{\lambda_{p_k}\lVert a_k\rVert}{\sqrt c}\,
\operatorname{asinh}\!\Big(\frac{2\sqrt c\,\langle z_k, a_k\rangle}{(1 - c\lVert z_k\rVert^2)\,\lVert a_k\rVert}\Big),
\qquad z_k = (-p_k)\oplus_c x,
$$
evaluated without forming $z_k$: with $\langle x,a_k\rangle$, $\langle x,p_k\rangle$ (two matrix products),
$\langle p_k,a_k\rangle$, $\beta_k = 1 - c\lVert p_k\rVert^2$, $\omega = 1 - c\lVert x\rVert^2$ and
$\alpha_k = 1 - 2c\langle x,p_k\rangle + c\lVert x\rVert^2$,
$$
\xi_k = \frac{2\lVert a_k\rVert}{\beta_k\sqrt c}\,\operatorname{asinh}\!\Big(
\frac{2\sqrt c\,(\beta_k\langle x,a_k\rangle - \alpha_k\langle p_k,a_k\rangle)}{\lVert a_k\rVert\,\beta_k\,\omega}\Big),
$$
and the loss is the cross-entropy $\ell_i = \log\sum_k e^{\xi_k(x_i)} - \xi_{y_i}(x_i)$ ("Hyp-CE").

**`hyp_pc_loss`** pairs row $i$ with row $i + B/2$ of a batch of $B$ ball points:
$$
L = \frac{1}{B}\sum_{i < B/2} d_c(z_i, z_{i+B/2}).
$$

Semantics
---------
- Curvature ``c`` is the positive number in the curvature $-c$; default 0.1 (Hyp-OC's ``--curvature``).
  ``c <= 0``, NaN or infinite raises ``ValueError`` naming ``c``.
- **`poincare_expmap0(x, *, c=0.1, clip_r=2.0, eps=1e-3)`**: ``x`` (N, D) Euclidean features, any
  real values; returns (N, D) ball points. ``clip_r`` (> 0, or ``None`` for no clipping) is the
  authors' feature clipping radius ``clip_r=2``; the ``1e-5`` is added to the norm inside the
  clipping factor, as in their code. ``eps`` (in (0, 1)) sets the projection radius
  $(1-\epsilon)/\sqrt c$; the default ``1e-3`` is hyptorch's float32 value. The projection is
  applied to the output of the exponential map and nowhere else (the other operations require points
  strictly inside the ball and do not move them). The authors clamp $\lVert u\rVert$ below at
  ``1e-5`` and the tanh argument to ±15; here $\tanh(s)/s$ is evaluated exactly (its limit 1 at
  $s = 0$), which differs from the clamped form by less than $c\cdot 10^{-10}$ relative, and the tanh
  clamp has no effect because the projection takes over long before $s = 15$. A zero row maps to
  zero. The gradient is the exact derivative of this forward (clip and projection included; at the
  switching points the non-clipped / non-projected branch is used). hyptorch rescales the incoming
  gradient by $(1 - c\lVert y\rVert^2)^2/4$ (a Riemannian-gradient convention, not the derivative
  of the forward); that rescaling is not applied.
- **`poincare_distance(x, y, *, c=0.1)`**: ``x``, ``y`` (N, D) ball points of the same shape; returns
  the (N,) row-wise distances. Evaluated in the arcosh form, with $\operatorname{arcosh}(1+t) =
  \operatorname{log1p}(t + \sqrt{t(t+2)})$, so no artanh argument needs clamping (hyptorch clamps it at
  $1 - 10^{-5}$, which caps distances near $6.1/\sqrt c$, less than the distance between two points on
  the projection sphere). Every row must lie strictly inside the ball ($c\lVert x_i\rVert^2 < 1$);
  otherwise ``ValueError`` naming the argument and the row. Accelerated kernels cannot raise
  without a device synchronisation and return NaN for such a row instead. At $x_i = y_i$ the
  distance is 0 and its gradient (undefined there, the distance behaves like a norm) is defined as 0.
- **`hyperbolic_mlr_ce(x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean")`**:
  ``x`` (N, D) ball points, ``target`` (N,) integers in [0, K) or ``ignore_index``, ``p`` (K, D) class
  offsets in the ball, ``a`` (K, D) class normals. hyptorch trains free parameters and sets
  $p_k = \mathrm{expmap}_0(\tilde p_k)$, $a_k = \tilde a_k(1 - c\lVert p_k\rVert^2)$; that
  parametrisation is left to the caller (`poincare_expmap0` provides the first step). Rows of ``x``
  that are not ignored and every row of ``p`` must lie strictly inside the ball, else ``ValueError``
  naming ``x`` / ``p`` (accelerated: NaN for the row, resp. for every row when a class offset is
  outside). A class with $a_k = 0$ has logit 0 (the limit of $\xi_k$ as $a_k \to 0$) and passes no
  gradient through its own parameters (the derivative in $a_k$ is unbounded there). ``reduction``:
  ``"none"`` the (N,) per-row losses, ``"sum"`` their sum, ``"mean"`` (default, as Hyp-OC) the sum over
  the number of non-ignored rows (NaN when every row is ignored, as PyTorch). Ignored rows give loss 0
  and gradient exactly 0, whatever their values (NaN included). Labels outside [0, K) that are not
  ``ignore_index`` raise ``ValueError`` (accelerated: NaN row). Gradients flow to ``x``, ``p`` and
  ``a``. hyptorch's asinh clamps its log argument at ``1e-5`` (wrong below about $-4\cdot 10^3$ in
  float32); the true asinh is used.
- **`hyp_pc_loss(z, *, c=0.1)`**: ``z`` (B, D) ball points, B even (odd B raises ``ValueError``
  naming ``z``, as the authors' assertion); the scalar loss divides the sum over the B/2 pairs by B,
  not B/2, matching the authors' code. B = 0 gives 0. The paper's Poincaré (artanh) distance is
  used; the authors' code uses $(2/\sqrt c)\arctan(\sqrt c\lVert(-x)\oplus_c y\rVert)$, the distance
  of the positively curved (spherical) model, which is not provided.
- NaN in a row gives NaN for that row's outputs (and for a sum or mean over it); a row with an
  infinite entry is outside the ball (an error where points are required inside, a NaN row from
  `poincare_expmap0`).
"""

from __future__ import annotations

import numpy as np

from .._checks import (
    as_float_array,
    as_int_array,
    check_int,
    check_real,
    check_reduction,
    reduce_rows,
    reduce_rows_grad,
)

__all__ = [
    "poincare_expmap0", "poincare_expmap0_grad",
    "poincare_distance", "poincare_distance_grad",
    "hyperbolic_mlr_ce", "hyperbolic_mlr_ce_grad",
    "hyp_pc_loss", "hyp_pc_loss_grad",
]

CLIP_EPS = 1e-5  # added to ||x|| in the clipping factor (authors' code)
SMALL_S = 1e-3   # below this sqrt(c)*||u|| the tanh(s)/s terms use their Taylor series


# ------------------------------------------------------------------------------------ checks


def check_curvature(c) -> float:
    return check_real(c, "c", low=0.0, low_open=True)


def _check_ball(x: np.ndarray, name: str, c: float, rows=None) -> None:
    """Every (selected, non-NaN) row strictly inside the ball: c ||x||^2 < 1."""
    with np.errstate(over="ignore", invalid="ignore"):
        cx2 = c * np.sum(x * x, axis=1)
    bad = ~(cx2 < 1.0) & ~np.isnan(cx2)
    if rows is not None:
        bad &= rows
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] lies outside the Poincaré ball: c*||{name}[{i}]||^2 = {cx2[i]:.6g} "
                         f"must be < 1 (c = {c:g})")


def _matrix(x, name: str) -> np.ndarray:
    return as_float_array(x, name, 2, "(N, D)")


# ------------------------------------------------------------------------------------ expmap0


def _expmap0_parts(x, c, clip_r, eps):
    x = _matrix(x, "x")
    c = check_curvature(c)
    if clip_r is not None:
        clip_r = check_real(clip_r, "clip_r", low=0.0, low_open=True)
    eps = check_real(eps, "eps", low=0.0, high=1.0, low_open=True, high_open=True)
    with np.errstate(over="ignore", invalid="ignore"):
        n = np.linalg.norm(x, axis=1)
        k = np.ones_like(n) if clip_r is None else np.minimum(1.0, clip_r / (n + CLIP_EPS))
        rho = k * n  # ||u||, u = k x
        s = np.sqrt(c) * rho
        t = np.tanh(s)
        safe_s = np.where(s < SMALL_S, 1.0, s)
        f = np.where(s < SMALL_S, 1.0 - s * s / 3.0, t / safe_s)  # tanh(s)/s
        projected = t > 1.0 - eps
    return x, c, clip_r, eps, n, k, rho, s, t, f, projected


def poincare_expmap0(x, *, c=0.1, clip_r=2.0, eps=1e-3):
    """Clip features to norm ``clip_r``, map them to the Poincaré ball with the exponential map at 0,
    and project onto the ball of radius (1 - eps)/sqrt(c). ``x`` (N, D) → (N, D)."""
    x, c, clip_r, eps, n, k, rho, s, t, f, projected = _expmap0_parts(x, c, clip_r, eps)
    with np.errstate(over="ignore", invalid="ignore"):
        # projected: y = (1 - eps)/sqrt(c) * u/||u|| = (1 - eps)/sqrt(c) * x/||x||
        scale = np.where(projected, (1.0 - eps) / (np.sqrt(c) * np.where(n > 0, n, 1.0)), f * k)
        return scale[:, None] * x


def poincare_expmap0_grad(grad, x, *, c=0.1, clip_r=2.0, eps=1e-3):
    """VJP of `poincare_expmap0`: ``grad`` (N, D) times dy/dx, an (N, D) array."""
    x, c, clip_r, eps, n, k, rho, s, t, f, projected = _expmap0_parts(x, c, clip_r, eps)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"grad must have shape {x.shape}, got {g.shape}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        u = k[:, None] * x
        ug = np.sum(u * g, axis=1)
        # Not projected: y = f(rho) u, so gu = f g + (f'(rho)/rho) (u.g) u, with
        # f'(rho)/rho = c [(1 - t^2)/s^2 - t/s^3] -> c (-2/3 + 8 s^2/15) as s -> 0.
        safe_s = np.where(s < SMALL_S, 1.0, s)
        df = c * np.where(s < SMALL_S, -2.0 / 3.0 + 8.0 * s * s / 15.0, (1.0 - t * t) / safe_s**2 - t / safe_s**3)
        gu_free = f[:, None] * g + (df * ug)[:, None] * u
        # Projected: y = P u/||u||, P = (1 - eps)/sqrt(c), so gu = (P/rho) (g - (u.g) u/rho^2).
        safe_rho = np.where(rho > 0, rho, 1.0)
        pr = (1.0 - eps) / (np.sqrt(c) * safe_rho)
        gu_proj = pr[:, None] * (g - (ug / safe_rho**2)[:, None] * u)
        gu = np.where(projected[:, None], gu_proj, gu_free)
        if clip_r is None:
            return gu
        # Clip active (k < 1): u = R x/(n + e), gx = R/(n + e) (gu - (x.gu) x/(n (n + e))).
        clipped = k < 1.0
        safe_n = np.where(n > 0, n, 1.0)
        xgu = np.sum(x * gu, axis=1)
        gx_clip = k[:, None] * (gu - (xgu / (safe_n * (n + CLIP_EPS)))[:, None] * x)
        return np.where(clipped[:, None], gx_clip, gu)


# ------------------------------------------------------------------------------------ distance


def _distance_parts(x, y, c):
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
    c = check_curvature(c)
    _check_ball(x, "x", c)
    _check_ball(y, "y", c)
    a = 1.0 - c * np.sum(x * x, axis=1)
    b = 1.0 - c * np.sum(y * y, axis=1)
    delta = np.sum((x - y) ** 2, axis=1)
    t = 2.0 * c * delta / (a * b)  # gamma - 1 >= 0
    return x, y, c, a, b, delta, t


def poincare_distance(x, y, *, c=0.1):
    """Geodesic distance between row i of ``x`` and row i of ``y`` on the Poincaré ball; (N,)."""
    x, y, c, a, b, delta, t = _distance_parts(x, y, c)
    return np.log1p(t + np.sqrt(t * (t + 2.0))) / np.sqrt(c)


def _distance_vjp(g, x, y, c, a, b, delta, t):
    """(gx, gy) for per-row upstream gradients ``g`` (N,); zero where x_i = y_i."""
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(t * (t + 2.0))  # sqrt(gamma^2 - 1)
        coef = np.where(delta > 0, g * 4.0 * np.sqrt(c) / (a * b * np.where(delta > 0, root, 1.0)), 0.0)
        coef = np.where(np.isnan(delta), np.nan, coef)
    gx = coef[:, None] * ((x - y) + (c * delta / a)[:, None] * x)
    gy = coef[:, None] * ((y - x) + (c * delta / b)[:, None] * y)
    return gx, gy


def poincare_distance_grad(grad, x, y, *, c=0.1):
    """VJP of `poincare_distance`: ``{"x": (N, D), "y": (N, D)}`` for ``grad`` (N,)."""
    parts = _distance_parts(x, y, c)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != (parts[0].shape[0],):
        raise ValueError(f"grad must have shape ({parts[0].shape[0]},), got {g.shape}")
    gx, gy = _distance_vjp(g, *parts)
    return {"x": gx, "y": gy}


# ------------------------------------------------------------------------------------ hyp_pc_loss


def _pc_halves(z, c):
    z = as_float_array(z, "z", 2, "(B, D)")
    if z.shape[0] % 2:
        raise ValueError(f"z must have an even number of rows B (row i is paired with row i + B/2), got B = {z.shape[0]}")
    h = z.shape[0] // 2
    c = check_curvature(c)
    _check_ball(z, "z", c)
    return z, z[:h], z[h:], c


def hyp_pc_loss(z, *, c=0.1):
    """Hyp-PC: sum of the Poincaré distances between rows i and i + B/2 of ``z`` (B, D), over B."""
    z, z1, z2, c = _pc_halves(z, c)
    if z.shape[0] == 0:
        return np.float64(0.0)
    return np.float64(poincare_distance(z1, z2, c=c).sum() / z.shape[0])


def hyp_pc_loss_grad(grad, z, *, c=0.1):
    """VJP of `hyp_pc_loss`: scalar ``grad`` times d L / d z, a (B, D) array."""
    z, z1, z2, c = _pc_halves(z, c)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != ():
        raise ValueError(f"grad must be a scalar, got shape {g.shape}")
    if z.shape[0] == 0:
        return np.zeros_like(z)
    gx, gy = _distance_vjp(np.full(z1.shape[0], float(g) / z.shape[0]), *_distance_parts(z1, z2, c))
    return np.concatenate([gx, gy], axis=0)


# ------------------------------------------------------------------------------------ hyperbolic MLR


def _mlr_parts(x, target, p, a, c, ignore_index, reduction):
    x = _matrix(x, "x")
    p = as_float_array(p, "p", 2, "(K, D)")
    a = as_float_array(a, "a", 2, "(K, D)")
    n, d = x.shape
    if p.shape[1] != d:
        raise ValueError(f"p must have shape (K, {d}) to match x, got {p.shape}")
    if a.shape != p.shape:
        raise ValueError(f"a must have the shape of p {p.shape}, got {a.shape}")
    k = p.shape[0]
    if k < 1:
        raise ValueError(f"p must have at least one class (K >= 1), got shape {p.shape}")
    ignore_index = check_int(ignore_index, "ignore_index")
    y = as_int_array(target, "target", (n,), "class indices")
    bad = (y != ignore_index) & ((y < 0) | (y >= k))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target[{i}] = {y[i]} is out of range: class indices must lie in [0, {k}) "
                         f"or equal ignore_index={ignore_index}")
    check_reduction(reduction)
    c = check_curvature(c)
    active = y != ignore_index
    _check_ball(x, "x", c, rows=active)
    _check_ball(p, "p", c)
    x = np.where(active[:, None], x, 0.0)  # ignored rows cannot reach the result, NaN included
    return x, np.where(active, y, 0), active, p, a, c


def _mlr_terms(x, p, a, c):
    """Every (N, K) intermediate of the closed form, for the loss and its gradient."""
    sc = np.sqrt(c)
    xa, xp = x @ a.T, x @ p.T
    x2 = np.sum(x * x, axis=1)[:, None]
    pa = np.sum(p * a, axis=1)[None, :]
    beta = 1.0 - c * np.sum(p * p, axis=1)[None, :]
    na = np.linalg.norm(a, axis=1)[None, :]
    na_safe = np.where(na > 0, na, 1.0)
    omega = 1.0 - c * x2
    alpha = 1.0 - 2.0 * c * xp + c * x2
    num = beta * xa - alpha * pa
    arg = 2.0 * sc * num / (na_safe * beta * omega)
    xi = 2.0 * na / (beta * sc) * np.arcsinh(arg)  # 0 where a_k = 0
    return dict(xa=xa, xp=xp, x2=x2, pa=pa, beta=beta, na=na, na_safe=na_safe, omega=omega, alpha=alpha,
                arg=arg, xi=xi)


def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def hyperbolic_mlr_ce(x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the hyperbolic MLR logits of ball points ``x`` (N, D) for classes with offsets
    ``p`` (K, D) and normals ``a`` (K, D)."""
    x, y, active, p, a, c = _mlr_parts(x, target, p, a, c, ignore_index, reduction)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        logp = _log_softmax(_mlr_terms(x, p, a, c)["xi"])
    loss = np.where(active, -logp[np.arange(x.shape[0]), y], 0.0)
    return reduce_rows(loss, active.astype(np.float64), reduction)


def hyperbolic_mlr_ce_grad(grad, x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean"):
    """VJP of `hyperbolic_mlr_ce`: ``{"x": (N, D), "p": (K, D), "a": (K, D)}``."""
    x, y, active, p, a, c = _mlr_parts(x, target, p, a, c, ignore_index, reduction)
    row_grad = reduce_rows_grad(grad, active.astype(np.float64), reduction)
    n, k = x.shape[0], p.shape[0]
    sc = np.sqrt(c)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = _mlr_terms(x, p, a, c)
        prob = np.exp(_log_softmax(m["xi"]))
        G = np.where(active, row_grad, 0.0)[:, None] * (prob - np.eye(k)[y])  # dL/dxi
        G = np.where(active[:, None], G, 0.0)
        beta, omega, arg, na, na_safe = m["beta"], m["omega"], m["arg"], m["na"], m["na_safe"]
        T = G * 2.0 * na / (beta * sc) / np.sqrt(1.0 + arg * arg)  # dL/darg
        U = T * 2.0 * sc / (na_safe * beta * omega)                  # dL/dnum
        d_xa = U * beta
        d_xp = U * 2.0 * c * m["pa"]
        d_x2 = -c * m["pa"] * U + c * T * arg / omega
        d_pa = -m["alpha"] * U
        d_beta = U * m["xa"] - T * arg / beta - G * m["xi"] / beta
        d_na = (G * m["xi"] - T * arg) / na_safe
    gx = d_xa @ a + d_xp @ p + 2.0 * d_x2.sum(axis=1)[:, None] * x
    s_pa, s_beta, s_na = d_pa.sum(axis=0)[:, None], d_beta.sum(axis=0)[:, None], d_na.sum(axis=0)[:, None]
    ga = d_xa.T @ x + s_pa * p + s_na * a / na_safe.T
    gp = d_xp.T @ x + s_pa * a - 2.0 * c * s_beta * p
    return {"x": np.where(active[:, None], gx, 0.0), "p": gp, "a": ga}
