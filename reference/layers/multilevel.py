r"""Multi-level training operators: coalesce, de-coalesce and interpolate parameters.

Paper P34 — *A Multi-Level Framework for Accelerating Training Transformer Models*
(Zou, Zhang, Deng, ICLR 2024).

A group map $g: \{0, \dots, s-1\} \to \{0, \dots, t-1\}$ assigns every one of the $s$ channels of
a large model to one of the $t$ channels of a small one (0/1 matrix $S \in \{0,1\}^{t \times s}$,
group sizes $D = \operatorname{diag}(S \mathbf 1)$). For a Linear weight
$W \in \mathbb{R}^{s_{out} \times s_{in}}$:

$$
\text{coalesce:}\quad W' = D_{out}^{-1} S_{out}\, W\, S_{in}^\top, \qquad
W'_{ij} = \frac{1}{|g^{-1}_{out}(i)|} \sum_{a:\, g_{out}(a) = i}\ \sum_{c:\, g_{in}(c) = j} W_{ac}
$$

(output rows **averaged**, input columns **summed**), and for a small weight
$W_s \in \mathbb{R}^{t_{out} \times t_{in}}$

$$
\text{de-coalesce:}\quad W_l = S_{out}^\top\, W_s\, D_{in}^{-1} S_{in}, \qquad
(W_l)_{ac} = \frac{(W_s)_{g_{out}(a),\, g_{in}(c)}}{|g^{-1}_{in}(g_{in}(c))|}
$$

(outputs copied, inputs split evenly), so that $\mathrm{coalesce}(\mathrm{decoalesce}(W_s)) = W_s$
exactly, while $\mathrm{decoalesce}(\mathrm{coalesce}(W))$ projects onto group-constant weights.
After training the small model, its de-coalesced parameters are merged with the large model's
parameters from *before* coalescing:

$$
\text{interpolate:}\quad \theta = (1 - \alpha)\, \theta_{M_1} + \alpha\, \theta_{\text{deco}} .
$$

Semantics
---------
- ``weight``: (s_out, s_in) for a Linear weight, or (s_out,) for a bias, LayerNorm $\gamma$/$\beta$
  or any per-channel vector (coalesce averages it over each group, de-coalesce copies it). Depth
  coalescing (merging layers) is the 1-D/2-D case on stacked parameters: put each layer's flattened
  parameters in one row of an (L, P) array, pass the layer groups as ``out_groups`` and the identity
  ``in_groups=np.arange(P)``, ``in_width=P``. An embedding table's columns are averaged by coalescing
  its transpose (``coalesce(E.T, out_groups=g).T``); the authors' hard-coded ×2 / ×0.5 rescale of
  BERT/GPT-2 embeddings is architecture wiring and is left to the caller.
- ``out_groups`` / ``in_groups``: integer (s,) maps into [0, t). ``None`` (default) is the authors'
  default scheme: channel $i$ is paired with channel $i + t$, $s = 2t$ ($g(i) = i \bmod t$); it
  needs an even size. ``in_groups`` is only for 2-D weights.
- ``out_width`` / ``in_width`` (coalesce): the small widths $t$; ``None`` means $s / 2$ (the authors'
  two-way merging; odd $s$ is then a ``ValueError``). De-coalesce reads $t$ from the small weight's
  shape and $s$ from the group maps (default $s = 2t$).
- Every group must be non-empty and every entry of a map in $[0, t)$: ``ValueError`` naming the map
  (the authors' code silently leaves zero rows for empty groups). The accelerated path, which checks
  values without synchronising the device, returns an all-NaN result instead.
- ``interpolate_params(original, decoalesced, alpha=0.5)``: any matching shapes, $\alpha \in [0, 1]$
  (0.5 in the authors' GPT-2 scripts, 0.25 in their DeiT example); computed literally as
  $(1-\alpha)\theta_{M_1} + \alpha\theta_{deco}$, so $\alpha = 0$ returns $\theta_{M_1}$ exactly
  when $\theta_{deco}$ is finite (a NaN or inf anywhere propagates, $0 \cdot \infty$ included).
- These are one-shot transforms between training runs, never trained through: no gradients.
- NaN/inf in a weight propagate to exactly the outputs whose groups contain them.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_int_array, check_int, check_real

__all__ = ["coalesce", "decoalesce", "interpolate_params"]


def _weight(weight, name="weight") -> np.ndarray:
    arr = np.asarray(weight)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (s_out, s_in) or (s_out,), got {arr.ndim} dimensions {arr.shape}")
    return arr.astype(np.float64)


def _group_map(groups, name: str, size: int, width: int) -> np.ndarray:
    """A checked (size,) map into [0, width) with no empty group; None is the default pairing."""
    if groups is None:
        if size != 2 * width:
            raise ValueError(f"{name}=None pairs channel i with i + t and needs s = 2t; got s={size}, t={width}")
        return np.arange(size) % width
    g = as_int_array(groups, name, (size,), "group indices")
    if g.size and (g.min() < 0 or g.max() >= width):
        raise ValueError(f"{name} entries must be in [0, {width}), got values in [{g.min()}, {g.max()}]")
    empty = np.setdiff1d(np.arange(width), g)
    if empty.size:
        raise ValueError(f"{name} leaves group {int(empty[0])} empty: every small channel needs at least one member")
    return g


def _width(width, name: str, size: int) -> int:
    if width is None:
        if size % 2:
            raise ValueError(f"{name}=None merges channels in pairs and needs an even size, got {size}")
        return size // 2
    width = check_int(width, name)
    if not 1 <= width <= size:
        raise ValueError(f"{name} must be in [1, {size}], got {width}")
    return width


def _one_hot(g: np.ndarray, width: int) -> np.ndarray:
    """S in {0, 1}^(t x s): S[i, a] = 1 when g(a) = i."""
    return (np.arange(width)[:, None] == g[None, :]).astype(np.float64)


def _masked_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b where the zero entries of ``a`` (a 0/1 or group-averaging matrix) never touch ``b``, so a
    NaN or inf reaches only the outputs whose groups contain it (0 * inf would give NaN everywhere)."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        keep = a[i] != 0
        out[i] = a[i, keep] @ b[keep] if keep.any() else 0.0
    return out


def coalesce(weight, out_groups=None, in_groups=None, *, out_width=None, in_width=None):
    """Merge a large weight into a small one: rows averaged over ``out_groups``, columns summed over ``in_groups``."""
    w = _weight(weight)
    t_out = _width(out_width, "out_width", w.shape[0])
    s_out = _one_hot(_group_map(out_groups, "out_groups", w.shape[0], t_out), t_out)
    rows = _masked_matmul(s_out / s_out.sum(axis=1, keepdims=True), w.reshape(w.shape[0], -1))
    if w.ndim == 1:
        if in_groups is not None or in_width is not None:
            raise ValueError("in_groups and in_width apply to 2-D weights only; weight is 1-D")
        return rows[:, 0]
    t_in = _width(in_width, "in_width", w.shape[1])
    s_in = _one_hot(_group_map(in_groups, "in_groups", w.shape[1], t_in), t_in)
    return _masked_matmul(s_in, rows.T).T


def decoalesce(weight, out_groups=None, in_groups=None):
    """Grow a small weight into a large one: rows copied to every member of their group, columns
    split evenly among their group's members."""
    w = _weight(weight)
    t_out = w.shape[0]
    s_large = 2 * t_out if out_groups is None else np.shape(out_groups)[0] if np.ndim(out_groups) == 1 else -1
    if s_large < 0:
        raise ValueError(f"out_groups must be a 1-D array of group indices, got shape {np.shape(out_groups)}")
    g_out = _group_map(out_groups, "out_groups", s_large, t_out)
    grown = w[g_out]
    if w.ndim == 1:
        if in_groups is not None:
            raise ValueError("in_groups applies to 2-D weights only; weight is 1-D")
        return grown
    t_in = w.shape[1]
    s_in = 2 * t_in if in_groups is None else np.shape(in_groups)[0] if np.ndim(in_groups) == 1 else -1
    if s_in < 0:
        raise ValueError(f"in_groups must be a 1-D array of group indices, got shape {np.shape(in_groups)}")
    g_in = _group_map(in_groups, "in_groups", s_in, t_in)
    sizes = np.bincount(g_in, minlength=t_in).astype(np.float64)
    return grown[:, g_in] / sizes[g_in][None, :]


def interpolate_params(original, decoalesced, *, alpha=0.5):
    """``(1 - alpha) * original + alpha * decoalesced``: the V-cycle's merge of the large model before
    coalescing with the de-coalesced trained small model."""
    a = np.asarray(original)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"original must be a real floating-point array, got dtype {a.dtype}")
    b = np.asarray(decoalesced)
    if b.dtype.kind not in "fiu" or b.dtype == np.bool_:
        raise TypeError(f"decoalesced must be a real floating-point array, got dtype {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"decoalesced must have the shape of original {a.shape}, got {b.shape}")
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    with np.errstate(invalid="ignore"):
        return (1.0 - alpha) * a.astype(np.float64) + alpha * b.astype(np.float64)
