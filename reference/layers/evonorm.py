r"""EvoNorm-S0 and EvoNorm-B0: normalisation and activation fused into one layer.

Paper P51 — *Evolving Normalization-Activation Layers* (Liu, Brock, Simonyan, Le, NeurIPS 2020).

For an input $x$ of shape (N, C, H, W) and per-channel parameters $v_c$ (init 1),
$\gamma_c$ (``weight``, init 1) and $\beta_c$ (``bias``, init 0):

**EvoNorm-S0** (batch-independent). The C channels form G groups of C/G channels; for sample $n$
and group $g$ the statistics run over the $M = (C/G)\,H W$ entries of the group:

$$
y = \gamma_c\,\frac{x\,\sigma(v_c x)}{\sqrt{\operatorname{Var}_{n,g}(x) + \varepsilon}} + \beta_c .
$$

**EvoNorm-B0** (batch-dependent). With the instance standard deviation
$s_{nc} = \sqrt{\operatorname{Var}_{H,W}(x_{nc}) + \varepsilon}$ and the batch standard deviation
$a_c = \sqrt{\operatorname{Var}_{N,H,W}(x_{\cdot c}) + \varepsilon}$ (training) or
$a_c = \sqrt{r_c + \varepsilon}$ from the running variance $r$ (evaluation):

$$
y = \gamma_c\,\frac{x}{\max(a_c,\; v_c x + s_{nc})} + \beta_c,
\qquad r_c \leftarrow (1 - m)\, r_c + m \operatorname{Var}_{N,H,W}(x_{\cdot c}) \quad \text{(training)}.
$$

Gradients (upstream $g$, $u = \gamma_c g$). S0, with $h = x\sigma(vx)$,
$h' = \sigma(vx) + v x \sigma(vx)(1 - \sigma(vx))$, $s = \sqrt{\operatorname{Var}_{n,g} + \varepsilon}$
and group mean $\mu$:

$$
\partial x_i = \frac{u_i h'_i}{s} - \frac{x_i - \mu}{M s^3} \sum_{j \in (n,g)} u_j h_j, \quad
\partial v_c = \sum_{i \in c} \frac{u_i x_i^2 \sigma(1 - \sigma)}{s}, \quad
\partial \gamma_c = \sum_{i \in c} \frac{g_i h_i}{s}, \quad \partial \beta_c = \sum_{i \in c} g_i .
$$

B0, with $m_i = \max(a_c, b_i)$, $b_i = v_c x_i + s_{nc}$, $d_i = -u_i x_i / m_i^2$ and branch weights
$w^b_i = [b_i > a_c] + \tfrac12 [b_i = a_c]$, $w^a_i = 1 - w^b_i$:

$$
\partial x_i = \frac{u_i}{m_i} + v_c w^b_i d_i
+ \frac{x_i - \mu_{nc}}{HW\, s_{nc}} \sum_{j \in (n,c)} w^b_j d_j
+ \frac{x_i - \mu_c}{NHW\, a_c} \sum_{j \in c} w^a_j d_j \;\text{(training only)}, \qquad
\partial v_c = \sum_{i \in c} w^b_i d_i x_i .
$$

Semantics
---------
- ``x``: (N, C, H, W) real, N, C, H, W >= 1 (an empty input is a ``ValueError``). ``v``, ``weight``,
  ``bias``: shape (C,); any other shape is a ``ValueError`` naming the argument. Output: the shape of ``x``.
- Variances are biased (divide by the count), computed about the mean (two-pass), as in the
  authors' TensorFlow code (`tf.nn.moments`). A constant group or channel has variance 0, so its
  standard deviation is $\sqrt{\varepsilon}$ (finite).
- ``eps`` is added to the variance inside the square root, for every statistic of both variants.
  Defaults: ``eps = 1e-5`` for S0 and B0 (TensorFlow reference, ``EPSILON``). timm uses 1e-5 for
  ``EvoNorm2dS0`` but 1e-3 for ``EvoNorm2dB0`` and ``EvoNorm2dS0a``: pass ``eps=1e-3`` to match it.
- S0 ``groups``: default 32 (the authors'). C must be divisible by ``groups`` (``ValueError`` naming
  ``groups``), as timm asserts; the TensorFlow code silently lowers G until it divides C instead.
- B0 ``training`` (default True): batch statistics, and the running variance is updated with
  ``momentum`` $m$ (default 0.1, TensorFlow's decay 0.9) from the *biased* batch variance, as in the
  TensorFlow code (timm multiplies it by $NHW/(NHW - 1)$ first; not done here). ``training=False``:
  $a_c$ comes from ``running_var`` and it is returned unchanged. ``evonorm_b0`` returns
  ``(y, new_running_var)``; the gradient flows through ``y`` only (the running variance is state).
- ``running_var``: shape (C,), finite and >= 0, else ``ValueError`` naming it (device kernels cannot
  raise on values without a synchronisation: they return NaN in the new running variance, and in
  evaluation in ``y``, instead). ``running_var=None`` is accepted in training (nothing to update; the
  second output is ``None``, like ``F.batch_norm`` without running statistics) and is a ``ValueError``
  in evaluation: there is no batch standard deviation to use. The module form starts its buffer at 1,
  like BatchNorm, so an evaluation before any training step uses $a_c = \sqrt{1 + \varepsilon}$.
- B0 ties $a_c = b_i$: the gradient of the maximum is split 50/50 between the two branches (the
  semantics of ``torch.maximum``).
- NaN or inf in ``x`` propagates to its whole group (S0), or to its instance and, in training, its
  whole channel over the batch (B0), through the statistics. N H W = 1 in B0 training is fine
  (batch variance 0).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_bool, check_int, check_real

__all__ = ["evonorm_s0", "evonorm_s0_grad", "evonorm_b0", "evonorm_b0_grad"]


def _param(p, name: str, c: int) -> np.ndarray:
    arr = as_float_array(p, name, 1, "(C,)")
    if arr.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},), one entry per channel of x, got {arr.shape}")
    return arr


def _inputs(x, v, weight, bias):
    x = as_float_array(x, "x", 4, "(N, C, H, W)")
    if x.size == 0:
        raise ValueError(f"x must not be empty, got shape {x.shape}")
    c = x.shape[1]
    return x, _param(v, "v", c), _param(weight, "weight", c), _param(bias, "bias", c)


def _per_channel(p):
    return p[None, :, None, None]


def _sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _s0_setup(x, v, weight, bias, groups, eps):
    x, v, weight, bias = _inputs(x, v, weight, bias)
    groups = check_int(groups, "groups")
    n, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"groups must be >= 1 and divide the {c} channels of x, got groups={groups}")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    xg = x.reshape(n, groups, -1)
    with np.errstate(invalid="ignore"):
        mean = xg.mean(axis=2, keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=2, keepdims=True)
    std = np.sqrt(var + eps)
    expand = lambda t: np.broadcast_to(t, xg.shape).reshape(x.shape)  # noqa: E731
    return x, v, weight, bias, expand(mean), expand(std), groups


def evonorm_s0(x, v, weight, bias, *, groups=32, eps=1e-5):
    """EvoNorm-S0: ``weight * x * sigmoid(v x) / group_std(x) + bias`` on (N, C, H, W) ``x``."""
    x, v, weight, bias, _, std, _ = _s0_setup(x, v, weight, bias, groups, eps)
    with np.errstate(invalid="ignore", over="ignore"):
        h = x * _sigmoid(_per_channel(v) * x)
        return _per_channel(weight) * h / std + _per_channel(bias)


def evonorm_s0_grad(grad, x, v, weight, bias, *, groups=32, eps=1e-5):
    """VJP of `evonorm_s0`: ``{"x", "v", "weight", "bias"}``."""
    x, v, weight, bias, mean, std, groups = _s0_setup(x, v, weight, bias, groups, eps)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {x.shape}, got {g.shape}")
    n, c = x.shape[:2]
    with np.errstate(invalid="ignore", over="ignore"):
        sig = _sigmoid(_per_channel(v) * x)
        h = x * sig
        dh = sig + _per_channel(v) * x * sig * (1.0 - sig)
        u = _per_channel(weight) * g
        m = x.size // (n * groups)
        uh = (u * h).reshape(n, groups, -1).sum(axis=2, keepdims=True)
        uh = np.broadcast_to(uh, (n, groups, m)).reshape(x.shape)
        dx = u * dh / std - (x - mean) * uh / (m * std**3)
        dv = (u * x * x * sig * (1.0 - sig) / std).sum(axis=(0, 2, 3))
        dweight = (g * h / std).sum(axis=(0, 2, 3))
    return {"x": dx, "v": dv, "weight": dweight, "bias": g.sum(axis=(0, 2, 3))}


def _b0_setup(x, v, weight, bias, running_var, training, momentum, eps):
    x, v, weight, bias = _inputs(x, v, weight, bias)
    check_bool(training, "training")
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    c = x.shape[1]
    if running_var is None:
        if not training:
            raise ValueError("running_var is required in eval mode (training=False): it gives the batch std there")
    else:
        running_var = _param(running_var, "running_var", c)
        if not np.all(np.isfinite(running_var)) or np.any(running_var < 0):
            raise ValueError("running_var must be finite and >= 0 in every channel")
    with np.errstate(invalid="ignore"):
        inst_mean = x.mean(axis=(2, 3), keepdims=True)
        inst_std = np.sqrt(((x - inst_mean) ** 2).mean(axis=(2, 3), keepdims=True) + eps)
        if training:
            batch_mean = x.mean(axis=(0, 2, 3), keepdims=True)
            batch_var = ((x - batch_mean) ** 2).mean(axis=(0, 2, 3))
            batch_std = np.sqrt(_per_channel(batch_var) + eps)
        else:
            batch_mean = batch_var = None
            batch_std = np.sqrt(_per_channel(running_var) + eps)
    return x, v, weight, bias, running_var, inst_mean, inst_std, batch_mean, batch_var, batch_std, momentum


def evonorm_b0(x, v, weight, bias, running_var, *, training=True, momentum=0.1, eps=1e-5):
    """EvoNorm-B0: ``weight * x / max(batch_std, v x + instance_std) + bias``; returns
    ``(y, new_running_var)`` (``new_running_var`` is ``running_var`` itself when not training)."""
    (x, v, weight, bias, running_var, _, inst_std, _, batch_var, batch_std,
     momentum) = _b0_setup(x, v, weight, bias, running_var, training, momentum, eps)
    with np.errstate(invalid="ignore", over="ignore"):
        den = np.maximum(batch_std, _per_channel(v) * x + inst_std)
        y = _per_channel(weight) * x / den + _per_channel(bias)
    if running_var is None:
        return y, None
    new_running = (1.0 - momentum) * running_var + momentum * batch_var if training else running_var.copy()
    return y, new_running


def evonorm_b0_grad(grad, x, v, weight, bias, running_var, *, training=True, momentum=0.1, eps=1e-5):
    """VJP of `evonorm_b0`'s first output ``y``: ``{"x", "v", "weight", "bias"}``."""
    (x, v, weight, bias, running_var, inst_mean, inst_std, batch_mean, _, batch_std,
     _) = _b0_setup(x, v, weight, bias, running_var, training, momentum, eps)
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {x.shape}, got {g.shape}")
    n, c, hh, ww = x.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        b = _per_channel(v) * x + inst_std
        a = np.broadcast_to(batch_std, x.shape)
        den = np.maximum(a, b)
        wb = np.where(b > a, 1.0, np.where(b == a, 0.5, 0.0))
        u = _per_channel(weight) * g
        d = -u * x / den**2
        dx = u / den + _per_channel(v) * wb * d
        dx = dx + (x - inst_mean) / (hh * ww * inst_std) * (wb * d).sum(axis=(2, 3), keepdims=True)
        if training:
            da = ((1.0 - wb) * d).sum(axis=(0, 2, 3), keepdims=True)
            dx = dx + (x - batch_mean) / (n * hh * ww * batch_std) * da
        dv = (wb * d * x).sum(axis=(0, 2, 3))
        dweight = (g * x / den).sum(axis=(0, 2, 3))
    return {"x": dx, "v": dv, "weight": dweight, "bias": g.sum(axis=(0, 2, 3))}
