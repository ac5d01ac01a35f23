r"""Hard Patches Mining: the relative loss of the patch-loss predictor and the easy-to-hard mask.

Paper P30 — *Bootstrap Masked Visual Modeling via Hard Patches Mining* (Wang et al.,
arXiv 2023; the extended version of the CVPR 2023 paper *Hard Patches Mining for Masked Image
Modeling*).

HPM trains a small head to predict, for every masked patch, how hard it is to reconstruct, and
then masks the patches it predicts to be hard.

**Relative loss.** For one image with predicted losses $p \in \mathbb{R}^M$ and the measured
reconstruction losses $t \in \mathbb{R}^M$ of its $M$ masked patches (a stop-gradient target), every
ordered pair $(i, j)$ with $t_i \ne t_j$ is a binary ranking problem on $z_{ij} = p_j - p_i$:

$$
\ell_{ij} =
\begin{cases}
  -\log\big(\sigma(z_{ij}) + \varepsilon\big) & t_j > t_i \\
  -\log\big(1 - \sigma(z_{ij}) + \varepsilon\big) & t_j < t_i
\end{cases}
\qquad
\mathcal{L} = \frac{\sum_b \sum_{i,j:\,t_{bi} \ne t_{bj}} \ell_{bij}}{\#\{(b, i, j) : t_{bi} \ne t_{bj}\}},
$$

with $\varepsilon = 10^{-6}$ as in the authors' code ($\mathcal{L} \le -\log \varepsilon \approx 13.8$ per
pair). Both orders of a pair give the same term, so every unordered pair counts twice. With
$s_{ij} = \operatorname{sign}(t_j - t_i)$ and $\phi(x) = -\log(\sigma(x) + \varepsilon)$,
$\ell_{ij} = \phi(s_{ij} z_{ij})$ and

$$
\frac{\partial \mathcal{L}}{\partial p_i} = \frac{2}{N_{\text{pairs}}} \sum_{j:\,t_j \ne t_i} -s_{ij}\,
\phi'(s_{ij}(p_j - p_i)), \qquad \phi'(x) = -\frac{\sigma(x)(1 - \sigma(x))}{\sigma(x) + \varepsilon}.
$$

**Easy-to-hard mask.** For an image of $L$ patches with predicted losses $q \in \mathbb{R}^L$ (from
the EMA teacher), mask ratio $\rho$ (0.75), epoch $e$ of $E$:

$$
n_{\text{keep}} = \lfloor L (1 - \rho) \rfloor, \quad n_{\text{mask}} = L - n_{\text{keep}}, \quad
\alpha = \tfrac{1}{2} \cdot \tfrac{e + 1}{E}, \quad n_{\text{hard}} = \lfloor n_{\text{mask}}\, \alpha \rfloor .
$$

The $n_{\text{hard}}$ patches with the largest $q$ are masked; of the other $L - n_{\text{hard}}$
patches the $n_{\text{keep}}$ with the smallest random key $u$ are kept and the rest are masked. The
share of loss-guided patches grows from 0 to one half over training ("easy to hard").

Semantics
---------
`hpm_relative_loss(pred, target, *, eps=1e-6, reduction="mean")`

- ``pred``, ``target``: (B, M) real, the predicted and the measured per-patch losses of the M masked
  patches of each image, in the same patch order. ``target`` receives no gradient (it is the
  stop-gradient reconstruction loss); only ``pred`` is differentiated.
- ``eps`` >= 0 (finite) is added inside the logarithm as in the authors' code. ``eps = 0`` gives the
  exact ranking loss $\operatorname{softplus}(-s z)$, computed stably. The second branch uses
  $\sigma(-z)$ for $1 - \sigma(z)$ (the same number, without the cancellation of ``1 - sigmoid``).
- ``reduction``: ``"mean"`` (default, the authors') divides the sum over every image and ordered pair by
  the number of non-tied ordered pairs in the whole batch; ``"sum"`` is that sum; ``"none"`` gives the
  (B,) per-image sums of the pair terms (not divided by anything).
- Ties ($t_i = t_j$, including $i = j$) and pairs involving a NaN target are ignored: they contribute
  nothing, not even a NaN from ``pred``. The authors' code multiplies masked terms by 0, so a NaN or
  infinite ``pred`` anywhere makes its result NaN; here a NaN ``pred`` only reaches the result through a
  non-tied pair (then the result is NaN), and an infinite ``pred`` gives the limit of the terms
  (``inf - inf`` between two infinite predictions of a non-tied pair is NaN).
- No non-tied pair in the batch (every target tied, M < 2, or B = 0): ``"mean"`` returns 0 with a
  zero gradient (the authors' code divides 0 by 0 and returns NaN); ``"sum"`` returns 0.

`easy_to_hard_mask(pred, noise, *, epoch, total_epochs, mask_ratio=0.75)`

- ``pred``: (B, L) real, predicted per-patch losses of all L patches; ``noise``: (B, L) real random
  keys (the authors draw a fresh random permutation per image; pass e.g. ``torch.rand(B, L)``). The
  result is a deterministic function of the two, so the randomness is the caller's.
- ``epoch`` (int, 0 <= epoch < total_epochs) and ``total_epochs`` (int >= 1): the easy-to-hard schedule.
  ``mask_ratio`` in [0, 1]. The counts use exactly the authors' float arithmetic:
  ``n_keep = int(L * (1 - mask_ratio))``, ``n_hard = int((L - n_keep) * (float((epoch + 1) /
  total_epochs) * 0.5))``; ``n_hard <= 0`` gives a fully random mask.
- Returns a (B, L) **bool** mask, ``True`` = patch removed (masked), the authors' ``mask == 1``. Every row
  has exactly ``L - n_keep`` ``True`` entries. No gradient.
- Order and ties: the hard patches are the first ``n_hard`` in the order (``pred`` descending, index
  ascending): among equal predictions the lower patch index is the harder. The kept patches are the
  first ``n_keep`` of the remaining ones in the order (``noise`` ascending, index ascending). NaN sorts
  above every number (NumPy's order): a NaN prediction is the hardest, a NaN key is kept last. The
  authors use ``torch.argsort`` (unstable) and ``np.random.shuffle``, whose tie order is unspecified.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_int, check_real, check_reduction

__all__ = ["hpm_relative_loss", "hpm_relative_loss_grad", "easy_to_hard_mask"]


def _relative_inputs(pred, target, eps, reduction):
    p = as_float_array(pred, "pred", 2, "(B, M)")
    t = as_float_array(target, "target", 2, "(B, M)")
    if t.shape != p.shape:
        raise ValueError(f"target must have the shape of pred {p.shape}, got {t.shape}")
    eps = check_real(eps, "eps", low=0.0)
    check_reduction(reduction)
    return p, t, eps


def _pairs(p, t):
    """z[b, i, j] = p_j - p_i, the sign s = sign(t_j - t_i) and the non-tied mask, each (B, M, M)."""
    z = p[:, None, :] - p[:, :, None]
    with np.errstate(invalid="ignore"):
        positive = t[:, None, :] > t[:, :, None]
        negative = t[:, None, :] < t[:, :, None]
        z = np.where(positive | negative, z, 0.0)
    sign = np.where(positive, 1.0, -1.0)
    return sign * z, sign, positive | negative


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _phi(x, eps):
    """-log(sigma(x) + eps); at eps = 0 the stable softplus(-x)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if eps == 0.0:
            return np.logaddexp(0.0, -x)
        return -np.log(_sigmoid(x) + eps)


def hpm_relative_loss(pred, target, *, eps=1e-6, reduction="mean"):
    """HPM's pairwise ranking loss of predicted patch losses ``pred`` against measured ones ``target``."""
    p, t, eps = _relative_inputs(pred, target, eps, reduction)
    x, _, valid = _pairs(p, t)
    per_image = np.where(valid, _phi(x, eps), 0.0).sum(axis=(1, 2))
    if reduction == "none":
        return per_image
    total = per_image.sum()
    if reduction == "sum":
        return np.float64(total)
    count = valid.sum()
    return np.float64(total / count) if count > 0 else np.float64(0.0)


def hpm_relative_loss_grad(grad, pred, target, *, eps=1e-6, reduction="mean"):
    """Vector-Jacobian product with respect to ``pred``, a (B, M) array (``target`` gets none)."""
    p, t, eps = _relative_inputs(pred, target, eps, reduction)
    x, sign, valid = _pairs(p, t)
    grad = np.asarray(grad, dtype=np.float64)
    b = p.shape[0]
    if reduction == "none":
        if grad.shape != (b,):
            raise ValueError(f"grad must have shape ({b},) for reduction='none', got {grad.shape}")
        image_grad = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        count = valid.sum()
        scale = 1.0 if reduction == "sum" else (1.0 / count if count > 0 else 0.0)
        image_grad = np.full(b, float(grad) * scale)
    s = _sigmoid(x)
    with np.errstate(invalid="ignore"):
        dphi = -s * _sigmoid(-x) / (s + eps) if eps > 0 else -_sigmoid(-x)
        # l_ij and l_ji are the same term; d l_ij / d p_i = -s_ij phi'(x_ij), twice for the two orders.
        per_pair = np.where(valid, -sign * dphi, 0.0)
    return 2.0 * image_grad[:, None] * per_pair.sum(axis=2)


def _mask_counts(length, epoch, total_epochs, mask_ratio):
    n_keep = int(length * (1 - mask_ratio))
    keep_ratio = float((epoch + 1) / total_epochs) * 0.5  # the share of hard patches among the masked
    n_hard = int((length - n_keep) * keep_ratio)
    return n_keep, max(n_hard, 0)


def easy_to_hard_mask(pred, noise, *, epoch, total_epochs, mask_ratio=0.75):
    """HPM's easy-to-hard mask: (B, L) bool, True where a patch is removed."""
    q = as_float_array(pred, "pred", 2, "(B, L)")
    u = as_float_array(noise, "noise", 2, "(B, L)")
    if u.shape != q.shape:
        raise ValueError(f"noise must have the shape of pred {q.shape}, got {u.shape}")
    total_epochs = check_int(total_epochs, "total_epochs")
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    epoch = check_int(epoch, "epoch")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must lie in [0, total_epochs) = [0, {total_epochs}), got {epoch}")
    mask_ratio = check_real(mask_ratio, "mask_ratio", low=0.0, high=1.0)
    b, length = q.shape
    n_keep, n_hard = _mask_counts(length, epoch, total_epochs, mask_ratio)
    mask = np.ones((b, length), dtype=bool)
    for row in range(b):
        # np.argsort(kind="stable") sorts NaN last and keeps equal keys in index order.
        hardest_first = np.argsort(-q[row], kind="stable") if not np.isnan(q[row]).any() else _nan_first_desc(q[row])
        hard = hardest_first[:n_hard]
        rest = np.setdiff1d(np.arange(length), hard)  # ascending index
        kept = rest[np.argsort(u[row, rest], kind="stable")[:n_keep]]
        mask[row, kept] = False
    return mask


def _nan_first_desc(values):
    """Indices in the order (value descending, index ascending) with NaN above every number."""
    nan = np.isnan(values)
    order = np.argsort(-np.where(nan, 0.0, values), kind="stable")
    return np.concatenate([np.flatnonzero(nan), order[~nan[order]]])
