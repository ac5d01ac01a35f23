r"""Proto-Triplet loss and ICNN loss for few-shot episodes.

Paper P25 — *SuSana Distancia is all you need: Enforcing class separability in metric learning via
two novel distance-based loss functions for few-shot image classification* (Mendez-Ruiz et al.,
arXiv 2023).

Both losses use the distance of the authors' code, with $10^{-6}$ inside the root:

$$ d(u, v) = \sqrt{\textstyle\sum_k (u_k - v_k)^2 + 10^{-6}} . $$

**Proto-Triplet loss.** Queries $q_i$ with labels $y_i$ and class prototypes $p_0, \dots, p_{W-1}$
(the per-class means of the support embeddings; row $c$ is class $c$). Each query is an anchor, its
own prototype the positive and the nearest other prototype the negative:

$$
d^+_i = d(q_i, p_{y_i}), \qquad d^-_i = \min_{c \ne y_i} d(q_i, p_c), \qquad
\ell_i = \max\big(0,\; d^+_i - d^-_i + m\big), \quad m = 0.5 .
$$

For an active query ($\ell_i > 0$), with $n_i$ the nearest other prototype,
$\partial \ell_i / \partial q_i = (q_i - p_{y_i})/d^+_i - (q_i - p_{n_i})/d^-_i$,
$\partial \ell_i / \partial p_{y_i} = -(q_i - p_{y_i})/d^+_i$ and
$\partial \ell_i / \partial p_{n_i} = (q_i - p_{n_i})/d^-_i$.

**ICNN loss** (the *modified* inter/intra-class nearest-neighbour score of the authors' code).
Origin points $o_i$ ($i < n$) with labels $y_i$ are scored against target points $t_l$ ($l < M$)
with labels $y'_l$ (by default the origin set itself). For each origin row take the $\text{ipc} + 1$
nearest targets in ascending distance and **drop the first** (meant to drop the point itself), keeping
the distances $\delta_{ij}$ and the masks $S_{ij} = [y'_{\text{nbr}(i,j)} = y_i]$, $\bar S = 1 - S$
($j = 1 \dots \text{ipc}$). With $\epsilon = 10^{-7}$ and the first $k$ columns only where marked $j \le k$:

$$
c_i = \min_{j:\,\bar S_{ij}} \delta_{ij}, \quad
\tilde u_{ij} = \frac{\delta_{ij}}{c_i + \epsilon}, \quad
\hat u_{ij} = \frac{\tilde u_{ij}}{\max(1, \max_{j \le k} \tilde u_{ij})}, \quad
\mu_i = \frac{\sum_{j \le k} \hat u_{ij} S_{ij}}{\sum_{j \le k} S_{ij} + \epsilon},
$$

$$
\lambda_{sc} = 1 - \frac{\sum_i \mu_i}{\#\{i : \sum_{j \le k} S_{ij} > 0\} + \epsilon}, \qquad
\lambda_{dc} = \left| \frac{1}{\#\{i : \sum_{j \le k} \bar S_{ij} > 0\} + \epsilon}
\sum_i \frac{\sum_{j \le k} \delta_{ij} \bar S_{ij} / (G + \epsilon)}{\sum_{j \le k} \bar S_{ij} + \epsilon}
+ o \right|,
$$

where $G = \max_{i, j \le k} \delta_{ij} \bar S_{ij}$ is a **global** maximum and $o = -1$ when no
$\bar S_{ij}$ ($j \le k$) is set anywhere, else 0. Then
$\lambda = (\lambda_{sc} + \lambda_{dc})/2$, $\gamma = \frac{1}{n} \sum_i \frac{1}{k} \sum_{j \le k} S_{ij}$
(or 1 when $k$ was clamped, below), score $= (\lambda + \gamma)/2 \in (0, 1]$ and the loss is
$-\log(\text{score})$. High scores mean that each point's nearest neighbours share its class and the
nearest other class is far.

Semantics
---------
`proto_triplet_loss(queries, query_labels, prototypes, *, margin=0.5, reduction="mean")`

- ``queries``: (N, D) real; ``query_labels``: (N,) integers in [0, W); ``prototypes``: (W, D) real,
  row c the prototype of class c (W >= 1). Gradients flow to queries and prototypes (to reach the
  support embeddings, build the prototypes with differentiable means).
- ``margin`` any finite real (0.5 in the authors' code). ``reduction``: ``"mean"`` (default) over
  queries, ``"sum"``, or ``"none"`` for the (N,) per-query losses. An empty batch gives NaN for
  ``"mean"`` (0/0, as ``torch.mean``), 0 for ``"sum"``.
- W = 1 (no other class): $d^- = +\infty$ and every loss is 0 with a zero gradient.
- Ties: the negative is the lowest-index prototype among equally near ones (only the gradient sees
  the choice). At $\ell_i = 0$ exactly the query is inactive (zero subgradient).
- A query whose distance to some prototype is not finite (NaN or ±inf in the query or in any
  prototype) gets a NaN loss; its gradient is NaN for that query and adds nothing to the
  prototypes. Labels outside [0, W) raise ``ValueError`` (the accelerated kernels return NaN for
  that query instead).
- Paper vs code: the paper writes the triplet with the hardest negative per query and a mean over
  queries, as the code does; the code sorts all W distances with ``topk`` first, which changes
  nothing here. With several prototypes per class the code would take the farthest same-class one;
  this function takes exactly one prototype per class.

`icnn_loss(origin, origin_labels, target=None, target_labels=None, *, k=4, ipc=None)`

- ``origin``: (n, D) real, n >= 1; ``origin_labels``: (n,) integers (compared for equality only).
  ``target``/``target_labels``: (M, D) and (M,), both given or both omitted (then the origin set is
  its own target). The authors' training variants: support vs support (``target`` omitted), queries
  vs prototypes or vs support, and support ∪ queries with ``ipc = shot + query``.
- ``k`` >= 1: neighbours per point; clamped to ``M - 2`` when ``k + 2 >= M`` (the code's rule), and then
  $\gamma = 1$. ``ipc`` (neighbours inspected for $c_i$): default ``k + 1`` after the clamp; must lie in
  [k, M - 1]. M >= 3 is required (the clamp must leave k >= 1); otherwise ``ValueError``.
- Neighbour order: ascending distance, ties by ascending target index (a stable sort). The first
  neighbour is always dropped, also when ``target`` is a different set (code quirk, kept): then the
  truly nearest target is ignored. With duplicated points, the lower-index duplicate is dropped.
- $c_i = +\infty$ when none of the ipc neighbours has another class: then $\hat u_{i\cdot} = 0$.
  Rows without a same-class (different-class) neighbour among the first k count 0 in the
  corresponding denominators, whose $\epsilon$ keeps 0/0 at 0.
- Gradients flow through the distances into ``origin`` and ``target`` (into ``origin`` twice when the
  target is omitted). The neighbour sets, the masks, the counts and $\gamma$ are piecewise constant.
  At the min ($c_i$), the row max ($\max(1, \cdot)$, active only above 1) and the global max $G$ the
  subgradient goes to the first position in (row, neighbour rank) order.
- Any non-finite entry in ``origin`` or ``target`` gives a NaN loss (and NaN gradients).
- Paper vs code: the paper's ICNN score has a variance term $\omega$ and exponents $p, q, r$ and
  normalises distances by their per-row min–max; the code's ``modified_score`` used for training (and
  here) drops $\omega$ and the exponents and normalises same-class distances by the nearest
  other-class distance and different-class distances by the global maximum, as written above.

Cost
----
Few-shot episodes are tiny (a 5-way 5-shot 15-query episode has 75 queries, 5 prototypes and 100
points for the ICNN loss). At these sizes the eager PyTorch form is bound by kernel launches (tens
of small operations), not by memory or arithmetic; the fused kernels save launches and the
(N, W, D) / (n, M, D) difference tensors; any speed-up over eager at episode sizes comes from
launching fewer kernels, not from bandwidth.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_int, check_real, check_reduction

__all__ = ["proto_triplet_loss", "proto_triplet_loss_grad", "icnn_loss", "icnn_loss_grad"]

DIST_EPS = 1e-6  # inside the square root
SCORE_EPS = 1e-7  # the code's eps in the ICNN score's denominators


def _distances(a, b):
    """(len(a), len(b)) distances sqrt(|a_i - b_j|^2 + 1e-6) and the differences a_i - b_j."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = a[:, None, :] - b[None, :, :]
        return np.sqrt((diff**2).sum(axis=2) + DIST_EPS), diff


# ------------------------------------------------------------------------------- proto-triplet


def _proto_inputs(queries, query_labels, prototypes, margin, reduction):
    q = as_float_array(queries, "queries", 2, "(N, D)")
    p = as_float_array(prototypes, "prototypes", 2, "(W, D)")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"prototypes must have D = {q.shape[1]} columns like queries, got {p.shape[1]}")
    if p.shape[0] < 1:
        raise ValueError("prototypes must have at least one row (one per class)")
    y = as_int_array(query_labels, "query_labels", (q.shape[0],))
    bad = (y < 0) | (y >= p.shape[0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"query_labels[{i}] = {y[i]} is out of range: labels must lie in [0, {p.shape[0]})")
    return q, y, p, check_real(margin, "margin"), check_reduction(reduction)


def _proto_parts(q, y, p, margin):
    dist, diff = _distances(q, p)
    rows = np.arange(q.shape[0])
    d_pos = dist[rows, y]
    others = np.where(np.arange(p.shape[0])[None, :] == y[:, None], np.inf, dist)
    neg = np.argmin(others, axis=1)  # first (lowest index) among equally near prototypes
    d_neg = others[rows, neg]  # +inf when W = 1
    finite = np.isfinite(dist).all(axis=1)
    with np.errstate(invalid="ignore"):
        loss = np.where(finite, np.maximum(d_pos - d_neg + margin, 0.0), np.nan)
    return loss, d_pos, d_neg, neg, diff, finite


def proto_triplet_loss(queries, query_labels, prototypes, *, margin=0.5, reduction="mean"):
    """Proto-Triplet loss of P25: hinge on (own-prototype distance - nearest other prototype + margin)."""
    q, y, p, margin, reduction = _proto_inputs(queries, query_labels, prototypes, margin, reduction)
    loss = _proto_parts(q, y, p, margin)[0]
    if reduction == "none":
        return loss
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(loss.sum() if reduction == "sum" else loss.sum() / loss.shape[0])


def proto_triplet_loss_grad(grad, queries, query_labels, prototypes, *, margin=0.5, reduction="mean"):
    """Vector-Jacobian product: ``{"queries": (N, D), "prototypes": (W, D)}``."""
    q, y, p, margin, reduction = _proto_inputs(queries, query_labels, prototypes, margin, reduction)
    loss, d_pos, d_neg, neg, diff, finite = _proto_parts(q, y, p, margin)
    n = q.shape[0]
    grad = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        if grad.shape != (n,):
            raise ValueError(f"grad must have shape ({n},) for reduction='none', got {grad.shape}")
        row_grad = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        with np.errstate(invalid="ignore", divide="ignore"):
            row_grad = np.full(n, float(grad) if reduction == "sum" else float(grad) / n)
    rows = np.arange(n)
    active = finite & (loss > 0)
    g = np.where(active, row_grad, 0.0)[:, None]
    to_pos = diff[rows, y] / d_pos[:, None]  # (q_i - p_y) / d+
    with np.errstate(invalid="ignore"):
        to_neg = np.where(active[:, None], diff[rows, neg] / d_neg[:, None], 0.0)  # (q_i - p_n) / d-
    grad_q = np.where(finite[:, None], g * (to_pos - to_neg), np.nan)
    grad_p = np.zeros_like(p)
    np.add.at(grad_p, y[finite], -(g * to_pos)[finite])
    np.add.at(grad_p, neg[finite], (g * to_neg)[finite])
    return {"queries": grad_q, "prototypes": grad_p}


# ------------------------------------------------------------------------------------ ICNN


def _icnn_inputs(origin, origin_labels, target, target_labels, k, ipc):
    o = as_float_array(origin, "origin", 2, "(n, D)")
    if o.shape[0] < 1:
        raise ValueError("origin must have at least one row")
    y_o = as_int_array(origin_labels, "origin_labels", (o.shape[0],))
    if (target is None) != (target_labels is None):
        raise ValueError("target and target_labels must be given together (or both omitted)")
    if target is None:
        t, y_t = o, y_o
    else:
        t = as_float_array(target, "target", 2, "(M, D)")
        if t.shape[1] != o.shape[1]:
            raise ValueError(f"target must have D = {o.shape[1]} columns like origin, got {t.shape[1]}")
        y_t = as_int_array(target_labels, "target_labels", (t.shape[0],))
    m = t.shape[0]
    if m < 3:
        raise ValueError(f"target must have at least 3 rows (k is clamped to M - 2 >= 1), got M = {m}")
    k = check_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    clamped = k + 2 >= m
    if clamped:
        k = m - 2
    ipc = k + 1 if ipc is None else check_int(ipc, "ipc")
    if not k <= ipc <= m - 1:
        raise ValueError(f"ipc must lie in [k, M - 1] = [{k}, {m - 1}] (k after clamping), got {ipc}")
    return o, y_o, t, y_t, k, ipc, clamped


def _icnn_parts(o, y_o, t, y_t, k, ipc, clamped):
    """Every intermediate of the modified ICNN score, for the loss and its gradient."""
    n = o.shape[0]
    dist_all, diff_all = _distances(o, t)
    nbr = np.argsort(dist_all, axis=1, kind="stable")[:, 1:ipc + 1]  # drop the first column
    dist = np.take_along_axis(dist_all, nbr, axis=1)  # (n, ipc), ascending
    same = y_t[nbr] == y_o[:, None]
    other = ~same
    c = np.where(other, dist, np.inf).min(axis=1)  # nearest other-class neighbour among ipc
    c_pos = np.argmin(np.where(other, dist, np.inf), axis=1)
    u = dist[:, :k] / (c[:, None] + SCORE_EPS)  # 0 when c = inf
    r_pos = np.argmax(u, axis=1)
    r = np.maximum(1.0, u.max(axis=1))
    same_k, other_k = same[:, :k], other[:, :k]
    cnt, dcnt = same_k.sum(axis=1), other_k.sum(axis=1)
    mu = (u / r[:, None] * same_k).sum(axis=1) / (cnt + SCORE_EPS)
    n_sc, n_dc = np.count_nonzero(cnt), np.count_nonzero(dcnt)
    lam_sc = 1.0 - mu.sum() / (n_sc + SCORE_EPS)
    dd = dist[:, :k] * other_k
    big = dd.max()
    big_pos = np.unravel_index(np.argmax(dd), dd.shape)
    big_lam = ((dd / (big + SCORE_EPS)).sum(axis=1) / (dcnt + SCORE_EPS)).sum() / (n_dc + SCORE_EPS)
    offset = -1.0 if not other_k.any() else 0.0
    lam_dc = abs(big_lam + offset)
    gamma = 1.0 if clamped else float((cnt / k).sum() / n)
    score = ((lam_sc + lam_dc) / 2 + gamma) / 2
    return dict(nbr=nbr, dist=dist, diff=np.take_along_axis(diff_all, nbr[:, :, None], axis=1), same_k=same_k,
                other_k=other_k, other=other, c=c, c_pos=c_pos, u=u, r=r, r_pos=r_pos, cnt=cnt, dcnt=dcnt,
                mu=mu, n_sc=n_sc, n_dc=n_dc, big=big, big_pos=big_pos, big_lam=big_lam, offset=offset,
                score=score, finite=bool(np.isfinite(o).all() and np.isfinite(t).all()))


def icnn_loss(origin, origin_labels, target=None, target_labels=None, *, k=4, ipc=None):
    """ICNN loss of P25: ``-log`` of the authors' modified inter/intra-class nearest-neighbour score."""
    o, y_o, t, y_t, k, ipc, clamped = _icnn_inputs(origin, origin_labels, target, target_labels, k, ipc)
    parts = _icnn_parts(o, y_o, t, y_t, k, ipc, clamped)
    if not parts["finite"]:
        return np.float64(np.nan)
    return np.float64(-np.log(parts["score"]))


def icnn_loss_grad(grad, origin, origin_labels, target=None, target_labels=None, *, k=4, ipc=None):
    """Vector-Jacobian product: ``{"origin": (n, D), "target": (M, D)}`` (only ``"origin"``, both roles
    summed, when the target is omitted)."""
    o, y_o, t, y_t, k, ipc, clamped = _icnn_inputs(origin, origin_labels, target, target_labels, k, ipc)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != ():
        raise ValueError(f"grad must be a scalar, got shape {grad.shape}")
    P = _icnn_parts(o, y_o, t, y_t, k, ipc, clamped)
    if not P["finite"]:
        nan_o, nan_t = np.full_like(o, np.nan), np.full_like(t, np.nan)
        return {"origin": nan_o} if target is None else {"origin": nan_o, "target": nan_t}
    n = o.shape[0]
    rows = np.arange(n)
    a = float(grad) * (-1.0 / P["score"]) * 0.25  # d loss / d lambda_sc and d loss / d lambda_dc
    g_dist = np.zeros_like(P["dist"])  # d loss / d delta_ij, (n, ipc)

    # Same-class part: lambda_sc = 1 - sum_i mu_i / (n_sc + eps), mu_i = sum_j w_ij u_ij / r_i.
    g_mu = a * -1.0 / (P["n_sc"] + SCORE_EPS)
    w = P["same_k"] / (P["cnt"][:, None] + SCORE_EPS)
    g_u = w / P["r"][:, None]
    above = P["u"].max(axis=1) > 1.0  # r_i = max_j u_ij (else the constant 1)
    g_u[rows[above], P["r_pos"][above]] -= (P["mu"] / P["r"])[above]
    g_u *= g_mu
    has_c = np.isfinite(P["c"])
    scale = np.where(has_c, 1.0 / (P["c"] + SCORE_EPS), 0.0)
    g_dist[:, :k] += g_u * scale[:, None]
    g_c = -(g_u * P["u"]).sum(axis=1) * scale  # u_ij = delta_ij / (c_i + eps)
    g_dist[rows[has_c], P["c_pos"][has_c]] += g_c[has_c]

    # Different-class part: lambda_dc = |Lambda + o|,
    # Lambda = sum_i sum_j dd_ij / (G + eps) / (dcnt_i + eps) / (n_dc + eps).
    g_lam = a * np.sign(P["big_lam"] + P["offset"])
    den = P["big"] + SCORE_EPS
    g_dist[:, :k] += g_lam * P["other_k"] / (den * (P["dcnt"][:, None] + SCORE_EPS) * (P["n_dc"] + SCORE_EPS))
    if P["other_k"].any():
        g_dist[P["big_pos"]] += g_lam * -P["big_lam"] / den

    # delta_ij = sqrt(|o_i - t_nbr(i,j)|^2 + 1e-6): d delta / d o_i = (o_i - t) / delta = -d delta / d t.
    along = g_dist[:, :, None] * P["diff"] / P["dist"][:, :, None]  # (n, ipc, D)
    grad_o = along.sum(axis=1)
    grad_t = np.zeros_like(t)
    np.add.at(grad_t, P["nbr"].reshape(-1), -along.reshape(-1, t.shape[1]))
    if target is None:
        return {"origin": grad_o + grad_t}
    return {"origin": grad_o, "target": grad_t}
