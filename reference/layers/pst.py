r"""PST sparse linear layer and its cubic sparsity schedule.

Paper P10 — *Parameter-Efficient Sparsity for Large Language Models Fine-Tuning* (Li et al., IJCAI 2022).

A frozen linear layer $W \in \mathbb{R}^{d_{out} \times d_{in}}$ (bias $b$) is fine-tuned and pruned at
the same time with few trainable parameters: a low-rank weight update $U V$ ($U$: $d_{out} \times r_w$,
$V$: $r_w \times d_{in}$) and a mask score made of a data-free part, a low-rank part $A B$ ($A$:
$d_{out} \times r_m$, $B$: $r_m \times d_{in}$) and a structured part (row score $R \in \mathbb{R}^{d_{out}}$,
column score $C \in \mathbb{R}^{d_{in}}$):

$$
W' = W + \beta\, U V, \qquad
S = |W'| + \alpha_1 A B + \alpha_2 \left(R \mathbf{1}^\top + \mathbf{1} C^\top\right),
$$

$$
k = \lfloor \rho\, d_{out} d_{in} \rfloor, \qquad
M_{ij} = 0 \text{ on the } k \text{ smallest entries of } S, \ 1 \text{ elsewhere}, \qquad
y = x\,(M \odot W')^\top + b .
$$

Gradient (the authors' straight-through estimator: $\partial L / \partial S := \partial L / \partial M$).
With $G = \partial y^\top x$ ($d_{out} \times d_{in}$, summed over the tokens):

$$
\partial x = \partial y\,(M \odot W'), \quad
\partial S = W' \odot G, \quad
\partial W' = M \odot G + \operatorname{sign}(W') \odot \partial S = (M + |W'|) \odot G,
$$

$$
\partial U = \beta\, \partial W' V^\top, \quad \partial V = \beta\, U^\top \partial W', \quad
\partial A = \alpha_1 \partial S B^\top, \quad \partial B = \alpha_1 A^\top \partial S, \quad
\partial R_i = \alpha_2 \textstyle\sum_j \partial S_{ij}, \quad \partial C_j = \alpha_2 \sum_i \partial S_{ij}.
$$

The sparsity $\rho$ follows the cubic schedule of the authors' training loop, for step $s$ of $T$:

$$
\rho(s) = \begin{cases}
\rho_i & s \le w_i T \\
\rho_f & s > T - w_f T \\
\rho_f + (\rho_i - \rho_f)\left(1 - \dfrac{s - w_i T}{T - (w_i + w_f) T}\right)^3 & \text{otherwise.}
\end{cases}
$$

Semantics
---------
- ``x``: (..., d_in), any leading dimensions (flattened to N rows, restored in the output).
  ``weight``: (d_out, d_in); ``bias``: (d_out,) or None. Both are **frozen** (PST trains only
  U, V, A, B, R, C), so no gradient is defined for them; the accelerated layer rejects a weight or
  bias that requires grad.
- ``U`` (d_out, r_w), ``V`` (r_w, d_in), ``A`` (d_out, r_m), ``B`` (r_m, d_in), ``R`` (d_out,),
  ``C`` (d_in,). Ranks: $1 \le r \le \min(d_{out}, d_{in})$; a larger rank (or mismatched U/V or
  A/B) is a ``ValueError`` naming the argument. The authors initialise U ~ N(0, 1), V = 0,
  A ~ N(0, 1), B = 0, R = C = 0 (`PSTSparseLinear` does), so training starts at $W' = W$ and
  $S = |W|$.
- Hyper-parameters (authors' defaults): ``beta`` = ``alpha1`` = ``alpha2`` = 1, any finite real.
  ``sparsity`` $\rho \in [0, 1]$ is required (it comes from `cubic_sparsity_schedule`).
- Data-free score: $|W + \beta U V|$, as in the authors' code (the paper writes $|W|$), and it is
  **not** detached: gradients flow through it into U and V ($\operatorname{sign}(0) = 0$).
- Selection is layer-local over the flattened (row-major) score. $k = \lfloor \rho\, d_{out} d_{in}
  \rfloor$ computed in float64 as ``int(sparsity * numel)`` (the authors' ``int(numel * sparsity)``).
  **Ties**: the order is a *stable* ascending sort, so among equal scores the lowest flat index
  $i \cdot d_{in} + j$ is pruned first (the authors' unstable ``argsort`` prunes arbitrary ties).
  Equivalently, with $t$ the k-th smallest score and $p$ its flat index in that order, an entry is
  pruned iff $S < t$, or $S = t$ and its flat index is $\le p$ (the rule the kernels apply in-tile).
- NaN scores sort as the largest (kept first), as NumPy's and PyTorch's sorts do. NaN in ``x``,
  ``weight`` or a parameter propagates through the products that read it ($0 \cdot \text{NaN}$ is
  NaN: a pruned NaN weight still poisons its output column, as ``mask * weight`` does).
- $\rho = 0$: nothing is pruned ($M = 1$), but $\partial S$ is still non-zero, so A, B, R, C get
  gradients. $\rho = 1$: the weight is all zeros and $y = b$.
- Empty input (N = 0) gives a (0, d_out) output (shape (..., d_out)) and zero parameter gradients.
- `cubic_sparsity_schedule(step, total_steps, ...)` is the authors' ``schedule_sparsity_ratio``:
  defaults $\rho_i = 0$, $\rho_f = 0.9$, $w_i = 0.1$, $w_f = 0.3$ (NLU scripts). ``frequency`` > 1
  holds the sparsity constant for ``frequency`` steps (the ModelScope port's variant; 1, the
  default, is the original). ``step`` may be an int or an integer array (elementwise); steps past
  ``total_steps`` give $\rho_f$, steps below 0 give $\rho_i$. ``initial_warmup + final_warmup``
  must be < 1 (the authors' formula divides by $T(1 - w_i - w_f)$); all four fractions lie in [0, 1].
- Exporting: the deployed weight is $M \odot W'$ (`pst_masked_weight`).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_int, check_real

__all__ = ["pst_sparse_linear", "pst_sparse_linear_grad", "pst_masked_weight", "pst_mask",
           "cubic_sparsity_schedule"]


def _rank_factors(first, second, name1, name2, d_out, d_in):
    """A (d_out, r) and B (r, d_in) factor pair with 1 <= r <= min(d_out, d_in)."""
    a = as_float_array(first, name1, 2, f"(d_out, r) = ({d_out}, r)")
    b = as_float_array(second, name2, 2, f"(r, d_in) = (r, {d_in})")
    if a.shape[0] != d_out:
        raise ValueError(f"{name1} must have shape (d_out, r) with d_out = {d_out}, got {a.shape}")
    if b.shape[1] != d_in:
        raise ValueError(f"{name2} must have shape (r, d_in) with d_in = {d_in}, got {b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{name1} has rank {a.shape[1]} but {name2} has rank {b.shape[0]}: "
                         f"{name1} (d_out, r) and {name2} (r, d_in) must share r")
    r = a.shape[1]
    if not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"rank of {name1}/{name2} must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}], "
                         f"got {r}")
    return a, b


def _inputs(x, weight, bias, U, V, A, B, R, C, sparsity, beta, alpha1, alpha2):
    w = as_float_array(weight, "weight", 2, "(d_out, d_in)")
    d_out, d_in = w.shape
    if d_out < 1 or d_in < 1:
        raise ValueError(f"weight must have d_out >= 1 and d_in >= 1, got shape {w.shape}")
    xa = np.asarray(x)
    if xa.ndim < 1:
        raise ValueError("x must have shape (..., d_in), got a scalar")
    xa = as_float_array(xa, "x", xa.ndim, "(..., d_in)")
    if xa.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., d_in) with d_in = {d_in} (weight's columns), got {xa.shape}")
    b = None
    if bias is not None:
        b = as_float_array(bias, "bias", 1, "(d_out,)")
        if b.shape != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},) (d_out,), got {b.shape}")
    u, v = _rank_factors(U, V, "U", "V", d_out, d_in)
    a, bb = _rank_factors(A, B, "A", "B", d_out, d_in)
    r = as_float_array(R, "R", 1, "(d_out,)")
    if r.shape != (d_out,):
        raise ValueError(f"R must have shape ({d_out},) (d_out,), got {r.shape}")
    c = as_float_array(C, "C", 1, "(d_in,)")
    if c.shape != (d_in,):
        raise ValueError(f"C must have shape ({d_in},) (d_in,), got {c.shape}")
    sparsity = check_real(sparsity, "sparsity", low=0.0, high=1.0)
    beta = check_real(beta, "beta")
    alpha1 = check_real(alpha1, "alpha1")
    alpha2 = check_real(alpha2, "alpha2")
    return xa, w, b, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2


def _forward_parts(w, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2):
    """W' = W + beta U V, the score S, and the 0/1 mask M."""
    with np.errstate(invalid="ignore", over="ignore"):
        w_prime = w + beta * (u @ v)
        score = np.abs(w_prime) + alpha1 * (a @ bb) + alpha2 * (r[:, None] + c[None, :])
    return w_prime, score, pst_mask(score, sparsity=sparsity)


def pst_mask(score, *, sparsity):
    """The 0/1 float mask of a (d_out, d_in) score: 0 on the ``int(sparsity * numel)`` smallest
    entries (stable order: among ties the lowest flat index is pruned first; NaN sorts last)."""
    s = as_float_array(score, "score", 2, "(d_out, d_in)")
    sparsity = check_real(sparsity, "sparsity", low=0.0, high=1.0)
    k = int(sparsity * s.size)
    mask = np.ones(s.size)
    mask[np.argsort(s.reshape(-1), kind="stable")[:k]] = 0.0
    return mask.reshape(s.shape)


def pst_sparse_linear(x, weight, bias, U, V, A, B, R, C, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0):
    """y = x (M ⊙ W')ᵀ + b with W' = W + βUV and M pruning the ``sparsity`` share of smallest scores."""
    xa, w, b, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2 = _inputs(
        x, weight, bias, U, V, A, B, R, C, sparsity, beta, alpha1, alpha2)
    w_prime, _, mask = _forward_parts(w, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2)
    with np.errstate(invalid="ignore", over="ignore"):
        y = xa.reshape(-1, w.shape[1]) @ (mask * w_prime).T
        if b is not None:
            y = y + b
    return y.reshape(xa.shape[:-1] + (w.shape[0],))


def pst_masked_weight(weight, U, V, A, B, R, C, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0):
    """The deployed weight M ⊙ W' (d_out, d_in), what the authors export after training."""
    w = as_float_array(weight, "weight", 2, "(d_out, d_in)")
    _, w, _, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2 = _inputs(
        np.zeros((1, w.shape[1])), w, None, U, V, A, B, R, C, sparsity, beta, alpha1, alpha2)
    w_prime, _, mask = _forward_parts(w, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2)
    with np.errstate(invalid="ignore"):
        return mask * w_prime


def pst_sparse_linear_grad(grad, x, weight, bias, U, V, A, B, R, C, *, sparsity, beta=1.0, alpha1=1.0,
                           alpha2=1.0):
    """Straight-through VJP: ``{"x", "U", "V", "A", "B", "R", "C": gradient}`` for ``grad`` (..., d_out).
    ``weight`` and ``bias`` are frozen and get none."""
    xa, w, b, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2 = _inputs(
        x, weight, bias, U, V, A, B, R, C, sparsity, beta, alpha1, alpha2)
    d_out, d_in = w.shape
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != xa.shape[:-1] + (d_out,):
        raise ValueError(f"grad must have shape {xa.shape[:-1] + (d_out,)}, got {g.shape}")
    g2, x2 = g.reshape(-1, d_out), xa.reshape(-1, d_in)
    w_prime, _, mask = _forward_parts(w, u, v, a, bb, r, c, sparsity, beta, alpha1, alpha2)
    with np.errstate(invalid="ignore", over="ignore"):
        big_g = g2.T @ x2                                  # (d_out, d_in)
        d_score = w_prime * big_g                          # straight through the mask
        d_wprime = mask * big_g + np.sign(w_prime) * d_score
        return {
            "x": (g2 @ (mask * w_prime)).reshape(xa.shape),
            "U": beta * d_wprime @ v.T,
            "V": beta * u.T @ d_wprime,
            "A": alpha1 * d_score @ bb.T,
            "B": alpha1 * a.T @ d_score,
            "R": alpha2 * d_score.sum(axis=1),
            "C": alpha2 * d_score.sum(axis=0),
        }


def _schedule_hyper(total_steps, initial_sparsity, final_sparsity, initial_warmup, final_warmup, frequency):
    """The schedule's hyper-parameters, checked (shared with the accelerated entry)."""
    total = check_int(total_steps, "total_steps")
    if total < 1:
        raise ValueError(f"total_steps must be >= 1, got {total}")
    rho_i = check_real(initial_sparsity, "initial_sparsity", low=0.0, high=1.0)
    rho_f = check_real(final_sparsity, "final_sparsity", low=0.0, high=1.0)
    w_i = check_real(initial_warmup, "initial_warmup", low=0.0, high=1.0)
    w_f = check_real(final_warmup, "final_warmup", low=0.0, high=1.0)
    if w_i + w_f >= 1.0:
        raise ValueError(f"initial_warmup + final_warmup must be < 1, got {w_i} + {w_f}")
    freq = check_int(frequency, "frequency")
    if freq < 1:
        raise ValueError(f"frequency must be >= 1, got {freq}")
    return total, rho_i, rho_f, w_i, w_f, freq


def cubic_sparsity_schedule(step, total_steps, *, initial_sparsity=0.0, final_sparsity=0.9, initial_warmup=0.1,
                            final_warmup=0.3, frequency=1):
    """The sparsity at ``step`` of ``total_steps`` (float64; an array for an array of steps)."""
    s = np.asarray(step)
    if s.dtype.kind not in "iu":
        raise TypeError(f"step must be an int or an integer array, got dtype {s.dtype}")
    s = as_int_array(s, "step", s.shape, "steps").astype(np.float64)
    total, rho_i, rho_f, w_i, w_f, freq = _schedule_hyper(total_steps, initial_sparsity, final_sparsity,
                                                         initial_warmup, final_warmup, frequency)
    start = w_i * total
    span = total - (w_f + w_i) * total
    progress = s - start if freq == 1 else np.floor((s - start) / freq) * freq
    cubic = rho_f + (rho_i - rho_f) * (1.0 - progress / span) ** 3
    out = np.where(s <= start, rho_i, np.where(s > total - w_f * total, rho_f, cubic))
    return out.astype(np.float64)
