r"""Metrix: embedding mixup for the contrastive loss, on explicit triples and an explicit $\lambda$.

Paper P22 — *It Takes Two to Tango: Mixup for Deep Metric Learning* (Venkataramanan, Psomas, Kijak, Amsaleg, Karantzalos, Avrithis, ICLR 2022).

Embeddings $e_1, \dots, e_B \in \mathbb{R}^D$ with labels $y$ are compared after L2 normalisation,
$\hat e = e / \max(\lVert e \rVert_2, \varepsilon)$ with $\varepsilon = 10^{-12}$ (``F.normalize``),
by the Euclidean distance $d(u, v) = \lVert \hat u - \hat v \rVert_2$. With the hinge
$[x]_+ = \max(x, 0)$ and the *average of non-zero entries*
$\operatorname{avg}_{\ne 0}(\ell) = \sum_k \ell_k / \#\{k : \ell_k \ne 0\}$ (0 for no such entry),

**clean contrastive part**, over all ordered pairs of the batch,

$$
L_{\text{clean}} = \operatorname{avg}_{\ne 0}\big\{[d(e_a, e_p) - m^+]_+ : y_a = y_p,\ a \ne p\big\}
 + \operatorname{avg}_{\ne 0}\big\{[m^- - d(e_a, e_n)]_+ : y_a \ne y_n\big\};
$$

**mixed part**, over $M$ triples $(a_t, i_t, j_t)$ given as index arrays, mixing two embeddings
with the coefficient $\lambda$ into $z_t = \lambda e_{i_t} + (1 - \lambda) e_{j_t}$ and comparing it
with the anchor as a soft positive (weight $\lambda$) and a soft negative (weight $1 - \lambda$),

$$
L_{\text{mix}} = \operatorname{avg}_{\ne 0}\big\{\lambda [d(e_{a_t}, z_t) - m^+]_+\big\}_t
 + \operatorname{avg}_{\ne 0}\big\{(1 - \lambda) [m^- - d(e_{a_t}, z_t)]_+\big\}_t ;
$$

and the loss is $L = L_{\text{clean}} + w \, L_{\text{mix}}$.

The triples of the authors' code come from `metrix_triples` (labels and a mode):

- ``"pos_neg"`` (mix a positive with a negative of the anchor): for every anchor $a$ in index order
  that has positives $P(a) = \{p \ne a : y_p = y_a\}$, the list $(a, \min P(a), n)$ over its
  negatives $n$ in index order, repeated $|P(a)|$ times (the code loops over positive *pairs*
  and always takes the anchor's *first* positive);
- ``"anc_neg"`` (mix the anchor with a negative): for every anchor $a$ *without* positives, in
  index order, the list $(a, a, n)$ over its negatives $n$ in index order (anchors with positives
  are dropped).

Semantics
---------
- ``embeddings``: (B, D) real, D >= 1; the model's output (the authors' models L2-normalise it;
  any scale is accepted). ``labels``: (B,) integers, only compared for equality.
- ``anchors``, ``mix_a``, ``mix_b``: (M,) integer row indices in [0, B), M >= 0; triple $t$
  mixes ``mix_a[t]`` (weight $\lambda$) with ``mix_b[t]`` (weight $1 - \lambda$) and compares the
  result with ``anchors[t]``. Any triples are allowed (repeats, ``mix_a == anchors``, ...). An index
  out of range raises ``ValueError`` (the accelerated kernels, which cannot raise without a device
  synchronisation, return NaN instead).
- ``lam`` in [0, 1]: the mixing coefficient, an input, never sampled inside (the authors draw one
  $\lambda \sim \mathrm{Beta}(2, 2)$ per iteration with ``np.random.beta``). It is not differentiated.
- ``mix_weight`` $w \ge 0$: 0.4 is the authors' value for ``"pos_neg"``; their embedding variant
  uses 0.3 for ``"anc_neg"`` (`twinops.accelerated.metric.metrix_loss.MetrixLoss` picks by mode).
- ``pos_margin`` $m^+ \ge 0$ (default 0) and ``neg_margin`` $m^- \ge 0$ (default 0.5) serve both
  parts, as in the code (``ContrastiveLoss(neg_margin=0.5)`` for the clean part, the same numbers
  hard-coded for the mixed part).
- The mixed vector mixes the rows *as given* and is then normalised (the code mixes the model's
  output and ``LpDistance`` normalises both sides); for unit-norm inputs this is mixing on the
  sphere followed by re-projection.
- Reduction: the output is a scalar. Each of the four sets is reduced by the average of its entries
  that are not exactly zero (pytorch-metric-learning's ``AvgNonZeroReducer``); an empty set, or one
  whose entries are all zero, contributes 0. The counts are not differentiated; an entry exactly at
  its hinge (distance equal to the margin, or $\lambda = 0$ / $1$) is zero, so it is neither counted
  nor receives gradient.
- Gradient at $d = 0$ (duplicate rows, or a mixed vector parallel to its anchor) is defined as 0
  (the direction $(\hat u - \hat v) / d$ is undefined there). Through the normalisation the
  gradient is $(g - \hat e(\hat e \cdot g)) / \lVert e \rVert$, and $g / \varepsilon$ for rows with
  $\lVert e \rVert \le \varepsilon$ (zero rows).
- Degenerate batches: B = 0, B = 1, a single class (no negatives), no class with two samples
  (no positives), M = 0 all give the empty-set value 0 for the sets concerned; there is no error.
  Anchors without positives simply contribute no positive pair.
- NaN anywhere in a row that takes part in a pair or triple gives a NaN loss (``NaN != 0``, so NaN
  entries are *counted*; pytorch-metric-learning's ``losses > 0`` filter silently drops them
  instead). ``±inf`` entries normalise to NaN and do the same.
- Whether an entry is counted is decided by exact zeros. Where a distance is zero only up to
  rounding (a mixed vector parallel to its anchor through a non-trivial $\lambda$, say $z = \lambda
  e_a$ when $e_{j} = 0$), the count, and so the loss, depends on the rounding; exact zeros (duplicate
  rows, parallel rows differing by a power of two, $D = 1$, $\lambda = 1$ with ``mix_a == anchors``)
  are reproduced exactly by the kernels, which normalise with a correctly rounded division.

Where the paper and the code differ (this module follows the code):

- The paper writes the mixed contrastive loss of an anchor as one sum over its mixed examples of
  $\lambda$ times the positive term plus $1-\lambda$ times the negative term; the code reduces the
  $\lambda$-weighted positive terms and the $(1-\lambda)$-weighted negative terms *separately* by
  the non-zero average, so the two halves are divided by different counts.
- The paper mixes a positive with any negative; the code uses only the anchor's first positive,
  repeating the anchor's negative list once per positive (with balanced sampling this leaves the
  averages unchanged). ``"anc_neg"`` in the code drops every anchor that has a positive; with
  balanced sampling that empties the set and the code fails, where this module returns 0.
- The code builds the full $M \times M$ distance matrix between anchors and mixed vectors and keeps
  its diagonal; the diagonal is exactly $d(e_{a_t}, z_t)$, computed here directly.
- The code picks one mode uniformly at random per iteration; the mode (through the triples) and
  $\lambda$ are inputs here.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_choice, check_real

__all__ = ["metrix_loss", "metrix_loss_grad", "metrix_triples", "MODES", "EPS"]

EPS = 1e-12  # F.normalize's floor on the norm
MODES = ("pos_neg", "anc_neg")


def metrix_triples(labels, *, mode="pos_neg"):
    """The authors' triples ``(anchors, mix_a, mix_b)`` for ``labels`` and ``mode``, as int64 arrays
    (see the module docstring for the index rule)."""
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array of labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {y.ndim} dimensions {y.shape}")
    check_choice(mode, "mode", MODES)
    anchors, mix_a, mix_b = [], [], []
    for a in range(len(y)):
        positives = [p for p in range(len(y)) if p != a and y[p] == y[a]]
        negatives = [n for n in range(len(y)) if y[n] != y[a]]
        if mode == "pos_neg" and positives:
            for _ in positives:  # once per positive pair (a, p), always with the first positive
                anchors += [a] * len(negatives)
                mix_a += [positives[0]] * len(negatives)
                mix_b += negatives
        elif mode == "anc_neg" and not positives:
            anchors += [a] * len(negatives)
            mix_a += [a] * len(negatives)
            mix_b += negatives
    return tuple(np.array(v, dtype=np.int64) for v in (anchors, mix_a, mix_b))


def _prepare(embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight, pos_margin, neg_margin):
    e = as_float_array(embeddings, "embeddings", 2, "(B, D)")
    b = e.shape[0]
    if e.shape[1] < 1:
        raise ValueError(f"embeddings must have at least one column (D >= 1), got shape {e.shape}")
    y = as_int_array(labels, "labels", (b,))
    a = np.asarray(anchors)
    if a.ndim != 1:
        raise ValueError(f"anchors must have shape (M,), got {a.ndim} dimensions {a.shape}")
    idx = {}
    for name, arr in (("anchors", anchors), ("mix_a", mix_a), ("mix_b", mix_b)):
        t = as_int_array(arr, name, a.shape, what="row indices")
        bad = (t < 0) | (t >= b)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{k}] = {t[k]} is out of range: row indices must lie in [0, {b})")
        idx[name] = t
    hyper = (
        check_real(lam, "lam", low=0.0, high=1.0),
        check_real(mix_weight, "mix_weight", low=0.0),
        check_real(pos_margin, "pos_margin", low=0.0),
        check_real(neg_margin, "neg_margin", low=0.0),
    )
    return (e, y, idx["anchors"], idx["mix_a"], idx["mix_b"]) + hyper


def _normalize(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, EPS), norm


def _normalize_grad(g, x):
    """VJP of x -> x / max(|x|, eps) along the last axis."""
    xhat, norm = _normalize(x)
    proj = np.sum(xhat * g, axis=-1, keepdims=True)
    return np.where(norm > EPS, (g - xhat * proj) / np.maximum(norm, EPS), g / EPS)


def _hinge(x):
    return np.where(x < 0, 0.0, x)  # max(x, 0) that keeps NaN


def _avg_nonzero(losses):
    """Sum of the entries that are not exactly zero over their count (0 for none), and the count."""
    nonzero = losses != 0
    count = int(nonzero.sum())
    return (np.where(nonzero, losses, 0.0).sum() / count if count else 0.0), count


def _terms(e, y, anchors, mix_a, mix_b, lam, pos_margin, neg_margin):
    """Every per-pair and per-triple quantity of the loss."""
    ehat, _ = _normalize(e)
    u = ehat[:, None, :] - ehat[None, :, :]  # (B, B, D): u_ij = ê_i - ê_j
    d = np.linalg.norm(u, axis=-1)
    same = y[:, None] == y[None, :]
    pos = same & ~np.eye(len(y), dtype=bool)
    neg = ~same
    z = lam * e[mix_a] + (1.0 - lam) * e[mix_b]  # (M, D) mixed vectors
    zhat, _ = _normalize(z)
    v = ehat[anchors] - zhat
    dm = np.linalg.norm(v, axis=-1)
    return dict(
        u=u, d=d, pos=pos, neg=neg, z=z, v=v, dm=dm,
        pos_loss=_hinge(d - pos_margin), neg_loss=_hinge(neg_margin - d),
        mix_pos_loss=lam * _hinge(dm - pos_margin), mix_neg_loss=(1.0 - lam) * _hinge(neg_margin - dm),
    )


def metrix_loss(embeddings, labels, anchors, mix_a, mix_b, *, lam, mix_weight=0.4, pos_margin=0.0,
                neg_margin=0.5):
    """Metrix loss of P22: contrastive loss on all clean pairs plus ``mix_weight`` times the
    contrastive loss of each anchor against its mixed vector ``lam * e[mix_a] + (1 - lam) * e[mix_b]``."""
    e, y, an, ia, ib, lam, w, mp, mn = _prepare(embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight,
                                               pos_margin, neg_margin)
    with np.errstate(invalid="ignore", over="ignore"):
        t = _terms(e, y, an, ia, ib, lam, mp, mn)
        clean = _avg_nonzero(t["pos_loss"][t["pos"]])[0] + _avg_nonzero(t["neg_loss"][t["neg"]])[0]
        mixed = _avg_nonzero(t["mix_pos_loss"])[0] + _avg_nonzero(t["mix_neg_loss"])[0]
        return np.float64(clean + w * mixed)


def _over_distance(coef, d):
    """coef / d, with 0 where coef = 0 or d = 0 (no gradient at d = 0); NaN distances stay NaN."""
    return np.where((coef != 0) & (d != 0), coef / np.where(d == 0, 1.0, d), 0.0)


def _times(q, vectors):
    """q[..., None] * vectors, exactly 0 where q = 0 (even against NaN vectors)."""
    return np.where(q[..., None] != 0, q[..., None] * vectors, 0.0)


def metrix_loss_grad(grad, embeddings, labels, anchors, mix_a, mix_b, *, lam, mix_weight=0.4, pos_margin=0.0,
                     neg_margin=0.5):
    """Vector-Jacobian product: ``grad`` (a scalar) times d loss / d embeddings, a (B, D) array."""
    e, y, an, ia, ib, lam, w, mp, mn = _prepare(embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight,
                                               pos_margin, neg_margin)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != ():
        raise ValueError(f"grad must be a scalar (the loss is a scalar), got shape {g.shape}")
    g = float(g)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        t = _terms(e, y, an, ia, ib, lam, mp, mn)
        # d loss / d distance of every ordered clean pair: +1/C+ per counted positive pair, -1/C- per
        # counted negative pair (the counts are constants).
        pos_nz = t["pos"] & (t["pos_loss"] != 0)
        neg_nz = t["neg"] & (t["neg_loss"] != 0)
        coef = g * (pos_nz / max(pos_nz.sum(), 1) - neg_nz / max(neg_nz.sum(), 1))
        r = _times(_over_distance(coef, t["d"]), t["u"])  # d loss / d ê_i from pair (i, j)
        grad_hat = r.sum(axis=1) - r.sum(axis=0)  # ê_i gets +r_ij as first, -r_ji as second of a pair
        # Mixed part: d loss / d dm per triple.
        mpos_nz = t["mix_pos_loss"] != 0
        mneg_nz = t["mix_neg_loss"] != 0
        coef_m = g * w * (lam * mpos_nz / max(mpos_nz.sum(), 1) - (1.0 - lam) * mneg_nz / max(mneg_nz.sum(), 1))
        rm = _times(_over_distance(coef_m, t["dm"]), t["v"])  # d loss / d ê_anchor; d loss / d ẑ = -rm
        np.add.at(grad_hat, an, rm)
        grad_z = _normalize_grad(-rm, t["z"])
        grad_e = _normalize_grad(grad_hat, e)
        np.add.at(grad_e, ia, lam * grad_z)
        np.add.at(grad_e, ib, (1.0 - lam) * grad_z)
        return grad_e
