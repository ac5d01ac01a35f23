r"""PYRA token merging: ToMe's bipartite soft matching with PYRA's re-activation of the merged tokens.

Paper P20 — *PYRA: Parallel Yielding Re-Activation for Training-Inference Efficient Task Adaptation*
(Xiong et al., ECCV 2024).

One ViT block merges $r$ pairs of tokens (between attention and the MLP). Tokens $x \in
\mathbb{R}^{N \times T \times C}$ carry sizes $m \in \mathbb{R}^{N \times T}$ (how many patches each
token already stands for, 1 at the start) and a matching metric $k \in \mathbb{R}^{N \times T \times
C_k}$ (the keys averaged over heads).

**Matching** (bipartite soft matching, no gradient). With $\hat k_i = k_i / \max(\lVert k_i \rVert,
10^{-12})$, the even tokens $0, 2, 4, \dots$ form set $\mathcal A$ and the odd tokens $1, 3, \dots$ set
$\mathcal B$. For each $a \in \mathcal A$

$$s_a = \max_{j \in \mathcal B} \hat k_a \cdot \hat k_j, \qquad \pi(a) = \operatorname{argmax}_{j
\in \mathcal B} \hat k_a \cdot \hat k_j ,$$

the $\mathcal A$ tokens are ranked by $s_a$ (descending) and the first $r$ of the ranking,
$a_1, \dots, a_r$, are merged into their partners $\pi(a_1), \dots, \pi(a_r)$.

**Re-activation** (PYRA). In size-weighted space $\tilde x = x \odot m$, pair $k$ has source
$S_k = \tilde x_{a_k}$, destination $D_k = \tilde x_{\pi(a_k)}$ and $P_k = S_k + D_k$;
$Y_k = \mathrm{LayerNorm}_{\gamma, \beta}(P_k)$ (over the $C$ channels, variance biased,
$\epsilon$ inside the square root). With the learned $\alpha \in \mathbb{R}^{r}$ (argument `a`, one weight
per rank) and $b \in \mathbb{R}^{C}$

$$u_c = \sum_{k=1}^{r} \alpha_k Y_{kc}, \quad w^{(1)}_c = 2\sigma(u_c), \qquad v_k = \sum_c Y_{kc}
b_c, \quad w^{(2)}_k = 2\sigma(v_k) - 1, \qquad S'_k = S_k \odot (1 + w^{(1)} w^{(2)}_k).$$

**Merge** (size-weighted mean). Every token that is not a source survives; destination $j$ becomes

$$x'_j = \frac{\tilde x_j + \sum_{k : \pi(a_k) = j} S'_k}{m_j + \sum_{k : \pi(a_k) = j} m_{a_k}}, \qquad
m'_j = m_j + \sum_{k : \pi(a_k) = j} m_{a_k},$$

and an unmerged token keeps $x'_i = \tilde x_i / m_i$ ($= x_i$), $m'_i = m_i$. With $b = 0$ (PYRA's
initialisation) $w^{(2)} = 0$ and the layer is exactly ToMe's `merge_wavg`.

Semantics
---------
- Shapes: `x` (N, T, C), `size` (N, T) (ToMe's (N, T, 1) without the last axis), `metric` (N, T, C_k),
  `a` (r,) (PYRA's (r, 1) parameter), `b` (C,) (PYRA's (1, C)), `ln_weight`, `ln_bias` (C,). Returns
  `(x_out, size_out)` of shapes (N, T − r, C) and (N, T − r). `size_out` is the merged sizes (explicit
  state: feed it to the next block, and to proportional attention); it carries no gradient.
- `r` must satisfy $0 \le r \le \lfloor (T - p)/2 \rfloor$ with $p$ the number of protected tokens
  (`class_token` + `distill_token`); a larger `r` is a `ValueError` naming `r` (ToMe silently clips it,
  but PYRA's `a` has exactly r entries, so a clipped r could not use it). `a` must have shape (r,).
  `r = 0` is the identity (`x`, `size` returned unchanged, as ToMe's `do_nothing`).
- Tie-breaking: the argmax over $\mathcal B$ takes the lowest index; the ranking is a stable descending
  sort, so equal $s_a$ are ranked by ascending index. The rank $k$ matters: it picks $\alpha_k$.
- `class_token=True`: token 0 is never a source (its scores are $-\infty$) and the unmerged tokens are
  re-sorted by index so it stays first. `distill_token=True`: token 1 (the first of $\mathcal B$) is
  never a destination. Output order (ToMe): unmerged $\mathcal A$ tokens in ranking order (index order
  with a class token), then all of $\mathcal B$ in index order; with a distillation token
  `[unm[0], B[0], unm[1:], B[1:]]`.
- Zero keys: $\hat k = k / \max(\lVert k \rVert, 10^{-12})$ (ToMe divides by the norm and gets NaN;
  deviation) so a zero key scores 0 against everything.
- Where the modulation acts (authors' `model/adaptive_merge.py`, as read): on the sources in
  size-weighted space, the LayerNorm taking source + destination; the sizes are merged without
  modulation. The gates are recomputed for every call (nothing is stored between blocks).
- Gradients reach `x`, `a`, `b`, `ln_weight` and `ln_bias` (the matching indices are piecewise
  constant in `metric`, which gets none). A destination that several sources pick accumulates all of
  them.
- Bad values: `size` must be finite and > 0 and `metric` finite (`ValueError`; the kernels return NaN
  instead). NaN in `x` propagates: a NaN source or destination row makes $u$, hence every merged token
  of its image, NaN; a NaN unmerged row stays in its own row.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_bool, check_int, check_real

__all__ = ["pyra_token_merge", "pyra_token_merge_grad", "bipartite_match"]

NORM_EPS = 1e-12


def _check(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps):
    x = as_float_array(x, "x", 3, "(N, T, C)")
    n, t, c = x.shape
    if c < 1:
        raise ValueError(f"x must have at least one channel (C >= 1), got shape {x.shape}")
    size = as_float_array(size, "size", 2, "(N, T)")
    if size.shape != (n, t):
        raise ValueError(f"size must have shape ({n}, {t}) to match x, got {size.shape}")
    metric = as_float_array(metric, "metric", 3, "(N, T, C_k)")
    if metric.shape[:2] != (n, t) or metric.shape[2] < 1:
        raise ValueError(f"metric must have shape ({n}, {t}, C_k) with C_k >= 1, got {metric.shape}")
    r = check_int(r, "r")
    class_token = check_bool(class_token, "class_token")
    distill_token = check_bool(distill_token, "distill_token")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    limit = (t - int(class_token) - int(distill_token)) // 2
    if r < 0 or r > limit:
        raise ValueError(f"r must lie in [0, {limit}] = [0, (T - protected tokens) // 2] for T = {t}, got {r}")
    a = as_float_array(a, "a", 1, "(r,)")
    if a.shape != (r,):
        raise ValueError(f"a must have shape ({r},), one weight per merged pair (r = {r}), got {a.shape}")
    params = []
    for name, p in (("b", b), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        p = as_float_array(p, name, 1, "(C,)")
        if p.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) to match x's channels, got {p.shape}")
        params.append(p)
    if not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError("size must hold finite token sizes > 0")
    if not np.all(np.isfinite(metric)):
        raise ValueError("metric must be finite (it decides which tokens merge)")
    return x, size, metric, a, *params, r, class_token, distill_token, eps


def bipartite_match(metric, r, *, class_token=False, distill_token=False):
    """ToMe's matching: ``(src, dst, unm)`` as token indices into T, shapes (N, r), (N, r), (N, A − r)
    with A = ceil(T / 2). ``src[:, k]`` (rank k) merges into ``dst[:, k]``; ``unm`` is in output order."""
    k = metric / np.maximum(np.linalg.norm(metric, axis=-1, keepdims=True), NORM_EPS)
    scores = k[:, 0::2] @ np.swapaxes(k[:, 1::2], 1, 2)  # (N, A, B)
    if class_token:
        scores[:, 0, :] = -np.inf
    if distill_token:
        scores[:, :, 0] = -np.inf
    node_idx = np.argmax(scores, axis=2)  # first maximum: lowest index
    node_max = np.max(scores, axis=2)
    order = np.argsort(-node_max, axis=1, kind="stable")  # descending, ties by ascending index
    src_a, unm_a = order[:, :r], order[:, r:]
    if class_token:
        unm_a = np.sort(unm_a, axis=1)
    dst_b = np.take_along_axis(node_idx, src_a, axis=1)
    return 2 * src_a, 2 * dst_b + 1, 2 * unm_a


def _output_tokens(t, unm, distill_token):
    """(N, T − r) input token of every output position."""
    n = unm.shape[0]
    b_tok = np.broadcast_to(np.arange(1, t, 2), (n, t // 2))
    if distill_token:
        return np.concatenate([unm[:, :1], b_tok[:, :1], unm[:, 1:], b_tok[:, 1:]], axis=1)
    return np.concatenate([unm, b_tok], axis=1)


def _forward(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps):
    """Every intermediate, for the function and its gradient."""
    n, t, c = x.shape
    src, dst, unm = bipartite_match(metric, r, class_token=class_token, distill_token=distill_token)
    rows = np.arange(n)[:, None]
    xs = x * size[..., None]
    S, D = xs[rows, src], xs[rows, dst]  # (N, r, C)
    P = S + D
    mean = P.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((P - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    Yhat = (P - mean) * rstd
    Y = Yhat * ln_weight + ln_bias
    u = np.einsum("k,nkc->nc", a, Y)
    w1 = 2.0 / (1.0 + np.exp(-u))  # (N, C)
    v = Y @ b
    w2 = 2.0 / (1.0 + np.exp(-v)) - 1.0  # (N, r)
    gate = 1.0 + w1[:, None, :] * w2[:, :, None]
    S_mod = S * gate
    num, den = xs.copy(), size.copy()
    for i in range(n):  # unbuffered: a destination picked by several sources gets all of them
        np.add.at(num[i], dst[i], S_mod[i])
        np.add.at(den[i], dst[i], size[i, src[i]])
    out_tok = _output_tokens(t, unm, distill_token)
    return dict(src=src, dst=dst, out_tok=out_tok, rows=rows, S=S, Yhat=Yhat, Y=Y, rstd=rstd, w1=w1, w2=w2,
                gate=gate, num=num, den=den)


def pyra_token_merge(x, size, metric, a, b, ln_weight, ln_bias, *, r, class_token=False, distill_token=False,
                     eps=1e-5):
    """Merge ``r`` token pairs per image with PYRA's modulation; returns ``(x_out, size_out)``."""
    x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps = _check(
        x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps)
    if r == 0:
        return x.copy(), size.copy()
    f = _forward(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps)
    rows, out_tok = f["rows"], f["out_tok"]
    den = f["den"][rows, out_tok]
    return f["num"][rows, out_tok] / den[..., None], den


def pyra_token_merge_grad(grad, x, size, metric, a, b, ln_weight, ln_bias, *, r, class_token=False,
                          distill_token=False, eps=1e-5):
    """VJP of ``x_out`` for the upstream gradient ``grad`` (N, T − r, C): a dict with the gradients of
    ``x``, ``a``, ``b``, ``ln_weight`` and ``ln_bias``."""
    x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps = _check(
        x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps)
    n, t, c = x.shape
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != (n, t - r, c):
        raise ValueError(f"grad must have shape {(n, t - r, c)}, got {grad.shape}")
    if r == 0:
        return {"x": grad.copy(), "a": np.zeros(0), "b": np.zeros(c), "ln_weight": np.zeros(c),
                "ln_bias": np.zeros(c)}
    f = _forward(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps)
    rows, src, dst, out_tok = f["rows"], f["src"], f["dst"], f["out_tok"]
    S, Yhat, Y, rstd, w1, w2, gate = f["S"], f["Yhat"], f["Y"], f["rstd"], f["w1"], f["w2"], f["gate"]
    # d/d(numerator) of every surviving token (the quotient's denominator holds no x).
    g_num = np.zeros_like(x)
    g_num[rows, out_tok] = grad / f["den"][rows, out_tok][..., None]
    G = g_num[rows, dst]  # d/dS'_k: the gradient of its destination's numerator
    dw1 = np.einsum("nkc,nkc,nk->nc", G, S, w2)
    dw2 = np.einsum("nkc,nkc,nc->nk", G, S, w1)
    du = dw1 * w1 * (1.0 - w1 / 2.0)  # w1 = 2 sigma(u)
    dv = dw2 * (1.0 + w2) * (1.0 - w2) / 2.0  # w2 = 2 sigma(v) - 1
    dY = a[None, :, None] * du[:, None, :] + b[None, None, :] * dv[:, :, None]
    dYhat = dY * ln_weight
    dP = rstd * (dYhat - dYhat.mean(-1, keepdims=True) - Yhat * (dYhat * Yhat).mean(-1, keepdims=True))
    g_xs = g_num.copy()  # sources are not outputs: their g_num is 0
    g_xs[rows, src] += G * gate + dP
    for i in range(n):
        np.add.at(g_xs[i], dst[i], dP[i])
    return {
        "x": g_xs * size[..., None],
        "a": np.einsum("nkc,nc->k", Y, du),
        "b": np.einsum("nkc,nk->c", Y, dv),
        "ln_weight": np.einsum("nkc,nkc->c", dY, Yhat),
        "ln_bias": dY.sum(axis=(0, 1)),
    }
