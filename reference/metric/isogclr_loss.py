r"""iSogCLR: the robust (DRO) two-way contrastive loss with an individual, learnable temperature per
sample and moving-average estimators carried across steps.

Paper P19 — *Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic
Temperature Individualization* (Qiu, Hu, Yuan, Zhou, Zhang, Yang, ICML 2023).

A batch holds $B$ pairs: image features $x_i$ and text features $y_i$ (rows of two $(B, D)$ arrays,
normally L2-normalised by the model), $S = X Y^\top$, and $S_{ii}$ are the positives. Every image
$i$ carries a state $(\tau_i, s_i, b_i, u_i)$ (temperature, moving average of the partition
function, its running log-scale, momentum of the temperature gradient), and so does every text.
The image side, anchored at row $i$, with $h_{ij} = S_{ij} - S_{ii}$ ($h_{ii} = 0$ exactly):

$$
\hat h_{ij} = h_{ij} / \tau_i, \qquad b'_i = \max\bigl(b_i, \max_j \hat h_{ij}\bigr), \qquad
g_i = \frac{1}{B-1} \sum_{j=1}^{B} e^{\hat h_{ij} - b'_i},
$$

$$
s'_i = (1-\gamma)\, s_i\, e^{b_i - b'_i} + \gamma\, g_i, \qquad
w_{ij} = \frac{e^{\hat h_{ij} - b'_i}}{s'_i + \varepsilon}, \qquad
\ell^I_i = \frac{1}{B-1} \sum_j w_{ij}\, h_{ij}.
$$

The text side is the same with columns: $h'_{ij} = S_{ij} - S_{jj}$ divided by the text's own
temperature $\tau^T_j$, maxima and sums over $i$ for each column $j$, with the text state
$(\tau^T_j, s^T_j, b^T_j, u^T_j)$, giving $w'_{ij}$ and $\ell^T_j$. The loss is

$$
L = \frac{1}{B} \sum_i \ell^I_i + \frac{1}{B} \sum_j \ell^T_j .
$$

$L$ is a *surrogate*: its value is not the DRO objective
$\tau_i \log \frac{1}{B-1}\sum_j e^{h_{ij}/\tau_i} + \tau_i \rho$, but its gradient is the algorithm's
stochastic gradient of it, because the weights $w$, $w'$ (built from detached $\hat h$ and the moving
average $s'$) are constants. Hence, for an upstream gradient $\bar g$ and
$\kappa = \bar g / (B(B-1))$, the matrix $G = \bar g\, \partial L / \partial S$ is

$$
G_{ij} = \kappa\,(w_{ij} + w'_{ij}) \;(i \ne j), \qquad
G_{ii} = -\kappa \Bigl(\sum_{j \ne i} w_{ij} + \sum_{k \ne i} w'_{ki}\Bigr),
\qquad \nabla_X = G\,Y,\quad \nabla_Y = G^\top X
$$

($S_{ii}$ enters every $h_{ij}$ of row $i$ and every $h'_{ki}$ of column $i$).

The temperatures are learned by the algorithm's own update, not by autograd (the derivative of
$\tau \log \frac{1}{B-1}\sum_j e^{h_{ij}/\tau} + \tau\rho$ in $\tau$, with $s'$ in place of the
mean):

$$
\delta_i = \log s'_i + b'_i + \rho - \frac{1}{B-1} \sum_j w_{ij}\, \hat h_{ij}, \qquad
u'_i = (1-\beta_u)\, u_i + \beta_u\, \operatorname{clip}(\delta_i, -c, c), \qquad
\tau^{\text{new}}_i = \operatorname{clip}(\tau_i - \eta\, u'_i,\ \tau_{\min}, \tau_{\max}),
$$

with $c$ = ``grad_clip``, and the same for the texts. The function returns $L$ and the new states;
it never writes anywhere.

Semantics
---------
- ``image_features``, ``text_features``: (B, D) real arrays of the same shape, B >= 2 (the estimators
  divide by B - 1; B < 2, an empty batch included, raises ``ValueError``), D >= 1. They are used as
  given: normalising them is the model's job, as in the authors' code.
- ``state_image``, ``state_text``: (B, 4) arrays, one row per sample of the batch, columns
  ``(tau, s, b, u)`` in that order (`STATE_FIELDS`); the caller gathers them from per-dataset
  buffers by sample index and scatters the returned rows back. A never-seen sample has
  ``(tau_init, 0, 0, 0)`` (`isogclr_init_state`); then $s' = \gamma g$, the authors' cold start.
  Every temperature must be finite and > 0, every ``s`` finite and >= 0, ``b`` and ``u`` finite;
  otherwise ``ValueError`` naming the state (the accelerated kernels, which cannot raise without a
  device synchronisation, return NaN for the loss and for that sample's new state instead).
  Indices in a batch must be unique (else the scatter back is ambiguous); that is the caller's concern.
- Returns ``(loss, new_state_image, new_state_text)``: a scalar and two (B, 4) arrays with the
  columns ``(tau_new, s', b', u')``. The new states carry no gradient.
- Gradient (`isogclr_loss_grad`): only the features are differentiated, through $h$ and $h'$; treated
  as constants are $\hat h$, $b'$, $s'$ and therefore $w$, $w'$ (detached in the authors' code), and
  everything in the temperature update ($\tau$, $u$, $\delta$). No gradient reaches the states.
- Authors' code details kept on purpose (bimodal ``SogCLR_DRO_Loss``): $g$ sums over all $B$ columns,
  the positive's own term $e^{0 - b'_i}$ included, but divides by $B - 1$; $b'$ is a monotone running
  maximum seeded by the stored $b$ (and $\ge 0$ because $\hat h_{ii} = 0$); $\varepsilon$ is added to
  $s'$ in the weights but not in $\log s'$; the temperature gradient is clipped before the momentum.
  If $s'$ underflows to 0, $\log s' = -\infty$ and the clip gives $\delta = -c_\delta$, as in the code.
- Defaults are the authors' bimodal (CLIP) settings: ``gamma=0.8``, ``rho=8.0``, ``eta=1e-3``,
  ``beta_u=0.9``, ``grad_clip=5.0``, ``tau_min=5e-3``, ``tau_max=1.0``, ``eps=1e-10``, and
  ``tau_init=0.01`` for new samples. ``eta`` is the step size of *this* step: the authors' ``const``,
  ``cosine`` and ``exp`` schedules are computed by the caller.
- Non-finite features: a NaN or ±inf similarity $S_{ij}$ is treated as NaN; it makes row $i$'s image
  outputs and column $j$'s text outputs NaN, hence the loss and every gradient entry it reaches.
- Numerics: this reference evaluates the formulas as written, in float64. The accelerated kernels
  (fp32 inside) keep $s'$, $\log s'$ and $w$ in log space relative to the batch's own maximum, so a
  stored $b$ far above the current values (where $e^{\hat h - b'}$ underflows in fp32, and the
  authors' fp32 code gets $\log 0 = -\infty$, hence $\delta = -c$) still gives the float64 values.
  They agree with this reference wherever float64 itself does not underflow
  ($b'_i - \max_j \hat h_{ij} \lesssim 700$).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_real

__all__ = ["isogclr_loss", "isogclr_loss_grad", "isogclr_init_state", "STATE_FIELDS"]

STATE_FIELDS = ("tau", "s", "b", "u")


def isogclr_init_state(n: int, *, tau_init: float = 0.01) -> np.ndarray:
    """The state of ``n`` never-seen samples: ``(tau_init, 0, 0, 0)`` per row, an (n, 4) float64 array."""
    tau_init = check_real(tau_init, "tau_init", low=0.0, low_open=True)
    state = np.zeros((int(n), 4))
    state[:, 0] = tau_init
    return state


def _check_hyper(gamma=0.8, rho=8.0, eta=1e-3, beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0,
                 eps=1e-10) -> dict:
    """The hyper-parameters, validated (plain Python, shared with the accelerated entry)."""
    tau_min = check_real(tau_min, "tau_min", low=0.0, low_open=True)
    return dict(
        gamma=check_real(gamma, "gamma", low=0.0, high=1.0),
        rho=check_real(rho, "rho"),
        eta=check_real(eta, "eta", low=0.0),
        beta_u=check_real(beta_u, "beta_u", low=0.0, high=1.0),
        grad_clip=check_real(grad_clip, "grad_clip", low=0.0, low_open=True),
        tau_min=tau_min,
        tau_max=check_real(tau_max, "tau_max", low=tau_min),
        eps=check_real(eps, "eps", low=0.0),
    )


def _check_state(state, name: str, b: int) -> np.ndarray:
    st = as_float_array(state, name, 2, "(B, 4)")
    if st.shape != (b, 4):
        raise ValueError(f"{name} must have shape ({b}, 4), one (tau, s, b, u) row per pair, got {st.shape}")
    tau, s, run_max, u = st.T
    if not np.all(np.isfinite(tau) & (tau > 0)):
        raise ValueError(f"{name}: every temperature (column 0, tau) must be finite and > 0")
    if not np.all(np.isfinite(s) & (s >= 0)):
        raise ValueError(f"{name}: every moving average (column 1, s) must be finite and >= 0")
    if not np.all(np.isfinite(run_max) & np.isfinite(u)):
        raise ValueError(f"{name}: columns 2 and 3 (b, u) must be finite")
    return st


def _inputs(image_features, text_features, state_image, state_text, hyper):
    x = as_float_array(image_features, "image_features", 2, "(B, D)")
    y = as_float_array(text_features, "text_features", 2, "(B, D)")
    if x.shape[0] < 2:
        raise ValueError(f"image_features must hold a batch of at least 2 pairs (B >= 2), got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"image_features must have at least one feature (D >= 1), got shape {x.shape}")
    if y.shape != x.shape:
        raise ValueError(f"text_features must have the shape of image_features {x.shape}, got {y.shape}")
    b = x.shape[0]
    return x, y, _check_state(state_image, "state_image", b), _check_state(state_text, "state_text", b), \
        _check_hyper(**hyper)


def _side(sim: np.ndarray, state: np.ndarray, hp: dict):
    """One side of the loss, anchored at the rows of ``sim`` (pass ``S`` for images, ``S.T`` for texts).

    Returns the per-anchor losses, the weights ``w`` (B, B) and the anchors' new state (B, 4).
    """
    bsz = sim.shape[0]
    tau, s, run_max, u = state.T
    h = sim - np.diag(sim)[:, None]
    np.fill_diagonal(h, 0.0)  # S_ii - S_ii is exactly 0
    h_hat = h / tau[:, None]
    b_new = np.maximum(run_max, h_hat.max(axis=1))  # NaN propagates
    e = np.exp(h_hat - b_new[:, None])
    g = e.sum(axis=1) / (bsz - 1)
    s_new = (1.0 - hp["gamma"]) * s * np.exp(run_max - b_new) + hp["gamma"] * g
    w = e / (s_new + hp["eps"])[:, None]
    loss_rows = (w * h).sum(axis=1) / (bsz - 1)
    delta = np.log(s_new) + b_new + hp["rho"] - (w * h_hat).sum(axis=1) / (bsz - 1)
    u_new = (1.0 - hp["beta_u"]) * u + hp["beta_u"] * np.clip(delta, -hp["grad_clip"], hp["grad_clip"])
    tau_new = np.clip(tau - hp["eta"] * u_new, hp["tau_min"], hp["tau_max"])
    return loss_rows, w, np.stack([tau_new, s_new, b_new, u_new], axis=1)


def _both_sides(image_features, text_features, state_image, state_text, hyper):
    x, y, st_i, st_t, hp = _inputs(image_features, text_features, state_image, state_text, hyper)
    with np.errstate(all="ignore"):
        sim = x @ y.T
        sim = np.where(np.isfinite(sim), sim, np.nan)
        loss_i, w_i, new_i = _side(sim, st_i, hp)
        loss_t, w_t, new_t = _side(sim.T, st_t, hp)
    return x, y, (loss_i, w_i, new_i), (loss_t, w_t.T, new_t)  # w_t.T[i, j] = w'_ij


def isogclr_loss(image_features, text_features, state_image, state_text, *, gamma=0.8, rho=8.0, eta=1e-3,
                 beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10):
    """iSogCLR loss of P19; returns ``(loss, new_state_image, new_state_text)`` (see the module docstring)."""
    hyper = dict(gamma=gamma, rho=rho, eta=eta, beta_u=beta_u, grad_clip=grad_clip, tau_min=tau_min,
                 tau_max=tau_max, eps=eps)
    _, _, (loss_i, _, new_i), (loss_t, _, new_t) = _both_sides(image_features, text_features, state_image,
                                                               state_text, hyper)
    return np.float64(loss_i.mean() + loss_t.mean()), new_i, new_t


def _surrogate_matrix(grad, w_img: np.ndarray, w_txt: np.ndarray) -> np.ndarray:
    """``G = dL/dS`` for upstream ``grad``: ``w_img[i, j] = w_ij`` (image side), ``w_txt[i, j] = w'_ij``."""
    bsz = w_img.shape[0]
    off = ~np.eye(bsz, dtype=bool)
    w_img, w_txt = np.where(off, w_img, 0.0), np.where(off, w_txt, 0.0)
    diag = -(w_img.sum(axis=1) + w_txt.sum(axis=0))  # S_ii enters every h_ij of row i and h'_ki of column i
    return float(grad) / (bsz * (bsz - 1)) * (w_img + w_txt + np.diag(diag))


def isogclr_loss_grad(grad, image_features, text_features, state_image, state_text, *, gamma=0.8, rho=8.0,
                      eta=1e-3, beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10):
    """Vector-Jacobian product of the loss (the algorithm's surrogate gradient): ``grad`` (a scalar)
    times dL/d features, as ``{"image_features": (B, D), "text_features": (B, D)}``."""
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != ():
        raise ValueError(f"grad must be a scalar (the loss is a scalar), got shape {grad.shape}")
    hyper = dict(gamma=gamma, rho=rho, eta=eta, beta_u=beta_u, grad_clip=grad_clip, tau_min=tau_min,
                 tau_max=tau_max, eps=eps)
    x, y, (_, w_i, _), (_, w_t, _) = _both_sides(image_features, text_features, state_image, state_text, hyper)
    with np.errstate(all="ignore"):
        big_g = _surrogate_matrix(grad, w_i, w_t)
        return {"image_features": big_g @ y, "text_features": big_g.T @ x}


def _frozen_weight_loss(image_features, text_features, state_image, state_text, **hyper):
    """The function whose exact gradient the surrogate gradient is: ``L`` with ``w`` and ``w'`` frozen
    at their values for these inputs (for finite-difference checks). Returns ``f(image_features,
    text_features, **ignored)``."""
    _, _, (_, w_i, _), (_, w_t, _) = _both_sides(image_features, text_features, state_image, state_text, hyper)
    bsz = w_i.shape[0]

    def frozen(image_features, text_features, **_):
        sim = np.asarray(image_features) @ np.asarray(text_features).T
        d = np.diag(sim)
        h_img, h_txt = sim - d[:, None], sim - d[None, :]
        return np.float64(((w_i * h_img).sum() + (w_t * h_txt).sum()) / (bsz * (bsz - 1)))

    return frozen
