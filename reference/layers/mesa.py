r"""Mesa: 8-bit running-range quantisation of saved activations, and the memory-saving GELU,
softmax and LayerNorm built on it.

Paper P21 — *Mesa: A Memory-saving Training Framework for Transformers* (Pan, Chen, He, Liu, Cai, Zhuang,
arXiv 2021).

A tensor $x$ is split into $G$ groups along one axis ("head-wise": the axis is cut into $G$ equal
contiguous chunks). Each group $g$ keeps a running range $\alpha_g$ and a running minimum
$\beta_g$. In training mode, before quantising, they are updated from the current tensor
(exponential moving average with ``momentum`` $m$, PyTorch's convention; Mesa's
``ema_decay`` $\lambda = 1 - m = 0.9$):

$$
\alpha_g \leftarrow (1 - m)\,\alpha_g + m\,(\max_g x - \min_g x), \qquad
\beta_g \leftarrow (1 - m)\,\beta_g + m\,\min_g x ,
$$

and on the very first step (``first_step=True``) $\alpha_g = \max_g x - \min_g x$,
$\beta_g = \min_g x$. With the updated estimate, scale $s_g = 255 / \max(|\alpha_g|, 10^{-8})$ and
rounding noise $u \in [0, 1)$ ($u = \tfrac12$ when no noise is given: round to nearest),

$$
q = \operatorname{clip}\bigl(\operatorname{rint}((x - \beta_g)\,s_g + u - \tfrac12),\ 0,\ 255\bigr)
\in \{0,\dots,255\}, \qquad \hat x = q / s_g + \beta_g .
$$

``mesa_gelu``, ``mesa_softmax`` and ``mesa_layernorm`` compute the *exact* operation in the
forward pass; what they keep for the backward pass is only $q$ (1 byte per element) plus the
per-group $(\alpha, \beta)$ (and, for LayerNorm, the exact per-row mean and inverse standard
deviation). Their gradient is therefore **the true gradient of the operation evaluated at the
dequantised activation** $\hat x$ (softmax: at the dequantised output $\hat y$):

$$
\text{GELU: } \bar x = \bar y \odot \mathrm{GELU}'(\hat x), \qquad
\text{softmax: } \bar x = \hat y \odot (\bar y - \textstyle\sum_j \bar y_j \hat y_j), \qquad
\text{LayerNorm: } \hat n = (\hat x - \mu)\,r,\ \
\bar x = r\,(\bar y w - \overline{\bar y w} - \hat n\,\overline{\bar y w \hat n}),
$$

with $\mu, r$ the exact row mean and $1/\sqrt{\sigma^2 + \epsilon}$ of the forward pass and
$\bar{\cdot}$ the mean over the normalised axis; $\bar w = \sum \bar y \hat n$,
$\bar b = \sum \bar y$. The ``*_grad`` functions here quantise exactly as the forward pass does and
evaluate those formulas, so a kernel and this reference approximate the same thing. The
approximation error against the full-precision gradient is $O(|\alpha| / 255)$.

Semantics
---------
- ``mesa_quantize(x, running_range, running_min, noise=None, *, groups=1, dim=-1, momentum=0.1,
  training=True, first_step=False)`` returns ``(q, new_running_range, new_running_min)``; ``q`` is
  ``uint8`` with the shape of ``x``. ``mesa_dequantize(q, running_range, running_min, *, groups=1,
  dim=-1)`` returns $\hat x$ (in the kernels: in ``running_range``'s dtype). No gradient:
  quantisation is not trained through.
- ``x``: any rank >= 1, at least one element; ``x.shape[dim]`` must be divisible by ``groups``
  (``ValueError`` naming ``groups``). Group $g$ holds indices
  ``[g * D/G, (g + 1) * D/G)`` of axis ``dim``. ``mesa_gelu`` and ``mesa_layernorm`` group the last
  axis (channel chunks); ``mesa_softmax`` takes (B, H, N, M) scores, normalises the last axis and
  groups the head axis 1 (``H`` divisible by ``groups``; Mesa's README uses $G$ = number of heads).
- ``running_range``, ``running_min``: (G,) finite arrays (``ValueError`` otherwise, "non-finite
  running statistics"); the returned state is float (float32 in the kernels). ``momentum`` in
  (0, 1]. ``training=False`` leaves the state unchanged and quantises with it (``first_step=True``
  with ``training=False`` raises ``ValueError``: eval mode before any running statistic exists).
- Scale: $|\alpha|$ is clamped below at $10^{-8}$ (a constant group would give an infinite scale
  and NaN in Mesa's code). Values above the running range are clamped to 255 (Mesa's CUDA kernel
  only clamps at 0 and lets values above 255 wrap around modulo 256: a bug we do not copy).
- ``noise``: optional array of the shape of ``x`` with values in [0, 1): stochastic rounding
  (unbiased for values inside the range). Mesa draws it inside its kernel; here it is an explicit
  input so both sides compute the same ``q`` (its values are not checked: outside [0, 1) the codes are
  biased). ``None``: deterministic round-half-to-even. The modules draw it with ``torch.rand_like``
  when ``stochastic=True`` (their default, as in Mesa).
- ``x`` must be finite for the quantising operations (``ValueError``): a NaN or inf would poison
  the running range forever. The kernels cannot raise without synchronising the device; they
  return a NaN new state instead.
- ``mesa_layernorm(x, weight, bias, running_range, running_min, noise=None, *, groups=1,
  eps=1e-5, momentum=0.1, training=True, first_step=False)``: normalises the last axis (size C);
  ``weight``/``bias`` (C,) (``ValueError`` naming them otherwise); biased variance, ``eps`` inside
  the square root, as ``torch.nn.functional.layer_norm``.
- Every layer returns ``(y, new_running_range, new_running_min)``; only ``y`` is differentiated.
  ``<name>_grad(grad, ...)`` takes the same inputs as the forward call and returns the gradient
  (a dict for LayerNorm: ``x``, ``weight``, ``bias``).
- Saved bytes per element: 1 (``q``) against 2 for a bf16 activation (4 for fp32), plus
  $8G$ bytes of state (and $8R$ bytes of mean/rstd for LayerNorm's $R$ rows). At the benchmark shapes
  (bf16): GELU / LayerNorm on 64 x 197 x 768 save 9.68 MB (+ 0.1 MB of LayerNorm statistics)
  instead of 19.37 MB (50%); softmax on 64 x 12 x 197 x 197 saves 29.81 MB instead of 59.61 MB (50%).
- Mesa's ``mesa_linear`` (saves the 8-bit input of a linear layer) is not part of this module.
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_bool, check_int, check_real

LEVELS = 255  # 8 bits: q in {0, ..., 255}
RANGE_FLOOR = 1e-8


# ------------------------------------------------------------------------------------- checks


def _as_float(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _axis(x: np.ndarray, dim, name="x") -> int:
    dim = check_int(dim, "dim")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be in [-{x.ndim}, {x.ndim}) for {name} of rank {x.ndim}, got {dim}")
    return dim % x.ndim


def _check_groups(x: np.ndarray, groups, axis: int, name="x") -> int:
    groups = check_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if x.shape[axis] % groups:
        raise ValueError(f"groups ({groups}) must divide {name}.shape[{axis}] = {x.shape[axis]}")
    return groups


def _check_state(running_range, running_min, groups: int):
    out = []
    for name, s in (("running_range", running_range), ("running_min", running_min)):
        s = _as_float(s, name)
        if s.shape != (groups,):
            raise ValueError(f"{name} must have shape ({groups},), one entry per group, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} must be finite (non-finite running statistics)")
        out.append(s)
    return out


def _check_noise(noise, shape):
    if noise is None:
        return None
    u = _as_float(noise, "noise")
    if u.shape != shape:
        raise ValueError(f"noise must have the shape of x {shape}, got {u.shape}")
    return u


def _check_step(momentum, training, first_step):
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0, low_open=True)
    training, first_step = check_bool(training, "training"), check_bool(first_step, "first_step")
    if first_step and not training:
        raise ValueError("first_step=True needs training=True: eval mode before any running statistic exists")
    return momentum, training, first_step


def _grouped(x: np.ndarray, groups: int, axis: int) -> np.ndarray:
    """View of ``x`` as (outer, G, D/G, inner)."""
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return x.reshape(outer, groups, x.shape[axis] // groups, inner)


# ------------------------------------------------------------------------------ quantisation


def _update_state(x, rng_, min_, *, groups, axis, momentum, training, first_step):
    if not training:
        return rng_.copy(), min_.copy()
    v = _grouped(x, groups, axis)
    lo, hi = v.min(axis=(0, 2, 3)), v.max(axis=(0, 2, 3))
    if first_step:
        return hi - lo, lo
    return (1 - momentum) * rng_ + momentum * (hi - lo), (1 - momentum) * min_ + momentum * lo


def _scale(running_range: np.ndarray) -> np.ndarray:
    return LEVELS / np.maximum(np.abs(running_range), RANGE_FLOOR)


def _quantize(x, rng_, min_, u, groups, axis) -> np.ndarray:
    s = _scale(rng_)[None, :, None, None]
    b = min_[None, :, None, None]
    v = _grouped(x, groups, axis)
    u = 0.5 if u is None else _grouped(u, groups, axis)
    q = np.clip(np.rint((v - b) * s + (u - 0.5)), 0, LEVELS)
    return q.astype(np.uint8).reshape(x.shape)


def _dequantize(q, rng_, min_, groups, axis) -> np.ndarray:
    s = _scale(rng_)[None, :, None, None]
    v = _grouped(q.astype(np.float64), groups, axis)
    return (v / s + min_[None, :, None, None]).reshape(q.shape)


def _prepare(x, running_range, running_min, noise, groups, axis, momentum, training, first_step, name="x"):
    """Checks shared by every quantising operation; returns the updated state and q."""
    if x.size == 0:
        raise ValueError(f"{name} must hold at least one element")
    groups = _check_groups(x, groups, axis, name)
    rng_, min_ = _check_state(running_range, running_min, groups)
    u = _check_noise(noise, x.shape)
    momentum, training, first_step = _check_step(momentum, training, first_step)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite: a NaN or inf would poison the running range")
    new_range, new_min = _update_state(x, rng_, min_, groups=groups, axis=axis, momentum=momentum,
                                       training=training, first_step=first_step)
    return _quantize(x, new_range, new_min, u, groups, axis), new_range, new_min, groups


def mesa_quantize(x, running_range, running_min, noise=None, *, groups=1, dim=-1, momentum=0.1, training=True,
                  first_step=False):
    """8-bit group-wise quantisation with a running range; returns ``(q, new_range, new_min)``."""
    x = _as_float(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension")
    axis = _axis(x, dim)
    q, new_range, new_min, _ = _prepare(x, running_range, running_min, noise, groups, axis, momentum,
                                        training, first_step)
    return q, new_range, new_min


def mesa_dequantize(q, running_range, running_min, *, groups=1, dim=-1):
    """$\\hat x = q / s_g + \\beta_g$ for uint8 codes ``q``."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise TypeError(f"q must be an integer (uint8) array of codes, got dtype {q.dtype}")
    if q.ndim < 1:
        raise ValueError("q must have at least one dimension")
    if q.size and (q.min() < 0 or q.max() > LEVELS):
        raise ValueError("q must hold codes in [0, 255]")
    axis = _axis(q, dim, "q")
    groups = _check_groups(q, groups, axis, "q")
    rng_, min_ = _check_state(running_range, running_min, groups)
    return _dequantize(q, rng_, min_, groups, axis)


# ------------------------------------------------------------------------------------ GELU

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_prime(x):
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _layer_input(x, name="x"):
    x = _as_float(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension")
    return x


def mesa_gelu(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
              first_step=False):
    """Exact (erf) GELU; keeps only the 8-bit ``x`` for backward. Returns ``(y, new_range, new_min)``."""
    x = _layer_input(x)
    _, new_range, new_min, _ = _prepare(x, running_range, running_min, noise, groups, x.ndim - 1, momentum,
                                        training, first_step)
    return _gelu(x), new_range, new_min


def mesa_gelu_grad(grad, x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
                   first_step=False):
    """$\\bar y \\odot \\mathrm{GELU}'(\\hat x)$ with $\\hat x$ the dequantised saved input."""
    x = _layer_input(x)
    axis = x.ndim - 1
    q, new_range, new_min, groups = _prepare(x, running_range, running_min, noise, groups, axis, momentum,
                                             training, first_step)
    return np.asarray(grad, dtype=np.float64) * _gelu_prime(_dequantize(q, new_range, new_min, groups, axis))


# --------------------------------------------------------------------------------- softmax


def _scores(x):
    x = _as_float(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, H, N, M), got {x.ndim} dimensions {x.shape}")
    return x


def _softmax(x):
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def mesa_softmax(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
                 first_step=False):
    """Exact softmax over the last axis of (B, H, N, M) scores; keeps only the 8-bit output (grouped
    by heads). Returns ``(y, new_range, new_min)``; the running state tracks the output ``y``."""
    x = _scores(x)
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError("x must be finite: a NaN or inf would poison the running range")
    y = _softmax(x) if x.size else x
    _, new_range, new_min, _ = _prepare(y, running_range, running_min, noise, groups, 1, momentum, training,
                                        first_step)
    return y, new_range, new_min


def mesa_softmax_grad(grad, x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
                      first_step=False):
    """$\\hat y \\odot (\\bar y - \\sum_j \\bar y_j \\hat y_j)$ with $\\hat y$ the dequantised output."""
    x = _scores(x)
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError("x must be finite: a NaN or inf would poison the running range")
    y = _softmax(x) if x.size else x
    q, new_range, new_min, groups = _prepare(y, running_range, running_min, noise, groups, 1, momentum,
                                             training, first_step)
    yh = _dequantize(q, new_range, new_min, groups, 1)
    g = np.asarray(grad, dtype=np.float64)
    return yh * (g - np.sum(g * yh, axis=-1, keepdims=True))


# ------------------------------------------------------------------------------- LayerNorm


def _ln_params(x, weight, bias):
    c = x.shape[-1]
    w, b = _as_float(weight, "weight"), _as_float(bias, "bias")
    if w.shape != (c,):
        raise ValueError(f"weight must have shape ({c},), got {w.shape}")
    if b.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {b.shape}")
    return w, b


def _ln_stats(x, eps):
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return mean, rstd


def mesa_layernorm(x, weight, bias, running_range, running_min, noise=None, *, groups=1, eps=1e-5,
                   momentum=0.1, training=True, first_step=False):
    """Exact LayerNorm over the last axis; keeps the 8-bit ``x`` plus exact mean / rstd.
    Returns ``(y, new_range, new_min)``."""
    x = _layer_input(x)
    w, b = _ln_params(x, weight, bias)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    _, new_range, new_min, _ = _prepare(x, running_range, running_min, noise, groups, x.ndim - 1, momentum,
                                        training, first_step)
    mean, rstd = _ln_stats(x, eps)
    return (x - mean) * rstd * w + b, new_range, new_min


def mesa_layernorm_grad(grad, x, weight, bias, running_range, running_min, noise=None, *, groups=1, eps=1e-5,
                        momentum=0.1, training=True, first_step=False):
    """LayerNorm's VJP at the dequantised input (exact mean / rstd); dict for ``x``, ``weight``, ``bias``."""
    x = _layer_input(x)
    w, _ = _ln_params(x, weight, bias)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    axis = x.ndim - 1
    q, new_range, new_min, groups = _prepare(x, running_range, running_min, noise, groups, axis, momentum,
                                             training, first_step)
    mean, rstd = _ln_stats(x, eps)
    n_hat = (_dequantize(q, new_range, new_min, groups, axis) - mean) * rstd
    g = np.asarray(grad, dtype=np.float64)
    gw = g * w
    dx = rstd * (gw - gw.mean(axis=-1, keepdims=True) - n_hat * (gw * n_hat).mean(axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return {"x": dx, "weight": np.sum(g * n_hat, axis=lead), "bias": np.sum(g, axis=lead)}
