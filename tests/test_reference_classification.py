"""Self-checks of the classification references: finite-difference gradients and independent anchors."""

import numpy as np
import pytest

from twinops.reference.classification import (
    aldr_kl_loss,
    aldr_kl_loss_grad,
    comp_sum_loss,
    comp_sum_loss_grad,
    ldr_kl_loss,
    ldr_kl_loss_grad,
    spherical_z_loss,
    spherical_z_loss_grad,
)

REDUCTIONS = ["none", "mean", "sum"]
IGNORE = -100


def fd_vjp(f, x, g, h=1e-6):
    """Central finite differences of ``sum(g * f(x))`` w.r.t. every entry of ``x`` (step h, relative)."""
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        if not np.isfinite(x[idx]):
            continue
        step = h * max(1.0, abs(x[idx]))
        xp, xm = x.copy(), x.copy()
        xp[idx] += step
        xm[idx] -= step
        out[idx] = (np.sum(g * f(xp)) - np.sum(g * f(xm))) / (2 * step)
    return out


def make_batch(seed, n=6, c=5, scale=2.0, ignored=(1, 4)):
    """Random logits and labels; ``ignored`` rows get ignore_index and NaN logits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=(n, c))
    t = rng.integers(0, c, size=n)
    for i in ignored:
        t[i] = IGNORE
        x[i, 0] = np.nan
    return x, t


def upstream(reduction, n, seed=0):
    rng = np.random.default_rng(seed + 100)
    return rng.uniform(0.3, 2.0, size=n) if reduction == "none" else np.float64(rng.uniform(0.3, 2.0))


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce(x, t):
    """Hand-written float64 cross-entropy per row: -log softmax(x)[t]."""
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(t)), t]


def check_grad(loss_fn, grad_fn, x, t, reduction, rtol=1e-6, atol=1e-7, **kw):
    g = upstream(reduction, x.shape[0])
    analytic = grad_fn(g, x, t, reduction=reduction, **kw)
    numeric = fd_vjp(lambda z: loss_fn(z, t, reduction=reduction, **kw), x, g)
    assert analytic.shape == x.shape
    ignored = t == IGNORE
    assert np.all(analytic[ignored] == 0.0)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


# --- comp_sum_loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_comp_sum_grad_fd(reduction, tau, weighted):
    x, t = make_batch(1, scale=1.0)
    weight = np.random.default_rng(2).uniform(0.2, 3.0, size=x.shape[1]) if weighted else None
    check_grad(comp_sum_loss, comp_sum_loss_grad, x, t, reduction, tau=tau, weight=weight)


def test_comp_sum_anchors():
    x, t = make_batch(3, ignored=())
    py = softmax(x)[np.arange(len(t)), t]
    cases = {1.0: ce(x, t), 2.0: 1 - py, 0.0: 1 / py - 1, 1.5: (1 - py**0.5) / 0.5}
    for tau, expected in cases.items():
        np.testing.assert_allclose(comp_sum_loss(x, t, tau=tau, reduction="none"), expected, rtol=1e-12)


def test_comp_sum_weighted_mean():
    x, t = make_batch(4)
    w = np.arange(1.0, x.shape[1] + 1)
    per_row = comp_sum_loss(x, t, weight=w, reduction="none")
    active = t != IGNORE
    expected = per_row.sum() / w[t[active]].sum()
    np.testing.assert_allclose(comp_sum_loss(x, t, weight=w), expected, rtol=1e-14)


# --- spherical_z_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("a,b", [(1.0, 0.0), (2.5, 1.5), (0.5, -1.0)])
def test_spherical_z_grad_fd(reduction, a, b):
    x, t = make_batch(5)
    check_grad(spherical_z_loss, spherical_z_loss_grad, x, t, reduction, a=a, b=b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spherical_z_constant_rows_and_single_class(reduction):
    x = np.array([[2.0, 2.0, 2.0, 2.0], [-1.0, -1.0, -1.0, -1.0], [0.5, -0.3, 1.2, 0.0]])
    t = np.array([1, 3, 2])
    # eps = 1 makes the FD step negligible against sigma + eps on the constant rows.
    check_grad(spherical_z_loss, spherical_z_loss_grad, x, t, reduction, eps=1.0, a=2.0, b=0.5)
    # Closed form on a constant row: -(sigmoid(a b) / eps) (onehot - 1/C), of order 1/eps.
    a, b, eps = 2.0, 0.5, 1e-6
    grad = spherical_z_loss_grad(np.ones(3), x, t, a=a, b=b, eps=eps, reduction="none")
    s = 1 / (1 + np.exp(-a * b))
    for i in (0, 1):
        expected = -(s / eps) * (np.eye(4)[t[i]] - 0.25)
        np.testing.assert_allclose(grad[i], expected, rtol=1e-12)
    loss = spherical_z_loss(x, t, a=a, b=b, eps=eps, reduction="none")
    np.testing.assert_allclose(loss[:2], np.log1p(np.exp(a * b)) / a, rtol=1e-14)
    # C = 1: z = 0, gradient 0.
    one = np.array([[3.0], [-7.0]])
    np.testing.assert_allclose(spherical_z_loss(one, np.array([0, 0]), reduction="none"), np.log(2.0), rtol=1e-14)
    assert np.all(spherical_z_loss_grad(np.float64(1.0), one, np.array([0, 0])) == 0.0)


def test_spherical_z_shift_scale_invariance():
    x, t = make_batch(6, ignored=())
    eps = 1e-12
    loss = spherical_z_loss(x, t, a=1.7, b=0.4, eps=eps, reduction="none")
    loss_t = spherical_z_loss(3 * x + 5, t, a=1.7, b=0.4, eps=eps, reduction="none")
    np.testing.assert_allclose(loss_t, loss, rtol=1e-9)
    g = np.ones(len(t))
    grad = spherical_z_loss_grad(g, x, t, a=1.7, b=0.4, eps=eps, reduction="none")
    grad_t = spherical_z_loss_grad(g, 3 * x + 5, t, a=1.7, b=0.4, eps=eps, reduction="none")
    np.testing.assert_allclose(grad_t, grad / 3, rtol=1e-8, atol=1e-14)
    # The gradient sums to zero over classes, and is orthogonal to the logits (up to eps).
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-13)
    np.testing.assert_allclose((grad * x).sum(axis=1), 0.0, atol=1e-10)


def test_spherical_z_anchor_formula():
    x, t = make_batch(7, ignored=())
    mu = x.mean(axis=1)
    sigma = np.sqrt(np.mean((x - mu[:, None]) ** 2, axis=1))
    z = (x[np.arange(len(t)), t] - mu) / (sigma + 1e-6)
    expected = np.log1p(np.exp(2.0 * (0.3 - z))) / 2.0
    np.testing.assert_allclose(spherical_z_loss(x, t, a=2.0, b=0.3, reduction="none"), expected, rtol=1e-13)


def test_spherical_z_large_offset_two_pass():
    # E[o^2] - mu^2 would lose all digits here; the two-pass variance does not.
    x, t = make_batch(8, ignored=(), scale=1.0)
    np.testing.assert_allclose(
        spherical_z_loss(x + 1e9, t, eps=1e-12, reduction="none"),
        spherical_z_loss(x, t, eps=1e-12, reduction="none"),
        rtol=1e-6,
    )


# --- ldr_kl_loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin,lam", [(0.1, 1.0), (0.0, 0.3), (1.0, 5.0)])
def test_ldr_kl_grad_fd(reduction, margin, lam):
    x, t = make_batch(9)
    check_grad(ldr_kl_loss, ldr_kl_loss_grad, x, t, reduction, margin=margin, lam=lam)


@pytest.mark.parametrize("margin,lam", [(0.1, 1.0), (0.0, 0.3), (2.0, 10.0)])
def test_ldr_kl_equals_scaled_ce(margin, lam):
    x, t = make_batch(10, ignored=())
    k = x.shape[1]
    onehot = np.eye(k)[t]
    expected = lam * ce(x / lam + (margin / lam) * (1 - onehot), t) - lam * np.log(k)
    np.testing.assert_allclose(ldr_kl_loss(x, t, margin=margin, lam=lam, reduction="none"), expected, rtol=1e-12)


def test_ldr_kl_limits_and_single_class():
    x, t = make_batch(11, ignored=(), scale=5.0)
    d = x - x[np.arange(len(t)), t][:, None] + 0.1 * (1 - np.eye(x.shape[1])[t])
    # lam -> 0: max_k d_k (stable, no overflow); lam -> inf: mean_k d_k.
    np.testing.assert_allclose(ldr_kl_loss(x, t, lam=1e-4, reduction="none"), d.max(axis=1), atol=1e-3)
    np.testing.assert_allclose(ldr_kl_loss(x, t, lam=1e7, reduction="none"), d.mean(axis=1), rtol=1e-5, atol=1e-6)
    one = np.array([[3.0], [-2.0]])
    assert np.all(ldr_kl_loss(one, np.array([0, 0]), reduction="none") == 0.0)
    assert np.all(ldr_kl_loss_grad(np.float64(1.0), one, np.array([0, 0])) == 0.0)


# --- aldr_kl_loss -------------------------------------------------------------------------------


def ldr_rows(x, t, lams, margin):
    """Per-row LDR-KL loss with a per-row temperature (0 for ignored rows)."""
    return np.array(
        [0.0 if t[i] == IGNORE else ldr_kl_loss(x[i : i + 1], t[i : i + 1], margin=margin, lam=lams[i])[()]
         for i in range(len(t))]
    )


def reduce(rows, t, reduction):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / np.sum(t != IGNORE)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin,lam0,alpha", [(0.1, 1.0, 2.0), (0.5, 10.0, 1.5), (0.0, 0.5, 4.0)])
def test_aldr_kl_grad_fd_with_lam_fixed(reduction, margin, lam0, alpha):
    x, t = make_batch(12)
    lam_prev = np.random.default_rng(13).uniform(0.5, 2.0, size=len(t)) * lam0
    kw = dict(margin=margin, lam0=lam0, alpha=alpha)
    loss, lam_new = aldr_kl_loss(x, t, lam_prev, reduction=reduction, **kw)
    g = upstream(reduction, len(t))
    analytic = aldr_kl_loss_grad(g, x, t, lam_prev, reduction=reduction, **kw)
    numeric = fd_vjp(lambda z: reduce(ldr_rows(z, t, lam_new, margin), t, reduction), x, g)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)
    assert np.all(analytic[t == IGNORE] == 0.0)
    # Forward: LDR at lam_new minus the constant penalty.
    k = x.shape[1]
    rows = ldr_rows(x, t, lam_new, margin) - np.where(
        t != IGNORE, alpha * np.log(k) / (2 * lam0) * (lam_new - lam0) ** 2, 0.0
    )
    np.testing.assert_allclose(loss, reduce(rows, t, reduction), rtol=1e-12)


def test_aldr_kl_lambda_update():
    k, lam0, alpha = 5, 2.0, 3.0
    x = np.array([[0.0] * k, [1000.0] + [0.0] * (k - 1), [1.0, 2.0, 3.0, 4.0, 5.0], [np.nan] * k])
    t = np.array([0, 0, 2, IGNORE])
    lam_prev = np.array([1.0, 1.0, 0.7, 0.123])
    lam_prev_copy = lam_prev.copy()
    _, lam_new = aldr_kl_loss(x, t, lam_prev, lam0=lam0, alpha=alpha, reduction="none")
    np.testing.assert_array_equal(lam_prev, lam_prev_copy)  # inputs are never written
    # Uniform scores: p uniform, KL 0, lam_new = lam0.
    np.testing.assert_allclose(lam_new[0], lam0, rtol=1e-14)
    # One-hot scores: p = (1 + 1e-5, 1e-5, ...) / (1 + K 1e-5).
    p = np.array([1 + 1e-5] + [1e-5] * (k - 1)) / (1 + k * 1e-5)
    kl = np.sum(p * np.log(k * p))
    np.testing.assert_allclose(lam_new[1], lam0 * (1 - kl / (alpha * np.log(k))), rtol=1e-12)
    # General row, and the bound lam0 (1 - 1/alpha) < lam_new <= lam0.
    q = softmax(x[2:3] / 0.7)[0] + 1e-5
    q /= q.sum()
    np.testing.assert_allclose(lam_new[2], lam0 * (1 - np.sum(q * np.log(k * q)) / (alpha * np.log(k))), rtol=1e-12)
    assert np.all((lam_new[:3] > lam0 * (1 - 1 / alpha)) & (lam_new[:3] <= lam0))
    # Ignored row: lam_prev unchanged.
    assert lam_new[3] == 0.123


def test_aldr_kl_single_class():
    one = np.array([[3.0], [-2.0], [0.0]])
    t = np.array([0, 0, IGNORE])
    lam_prev = np.array([0.3, 0.4, 0.5])
    loss, lam_new = aldr_kl_loss(one, t, lam_prev, lam0=1.5, reduction="none")
    assert np.all(loss == 0.0)
    np.testing.assert_array_equal(lam_new, [1.5, 1.5, 0.5])
    assert np.all(aldr_kl_loss_grad(np.ones(3), one, t, lam_prev, lam0=1.5, reduction="none") == 0.0)


# --- shared behaviour: ignored rows, NaN, bad inputs --------------------------------------------


def _aldr(x, t, **kw):
    return aldr_kl_loss(x, t, np.ones(len(t)), **kw)[0]


LOSSES = [comp_sum_loss, spherical_z_loss, ldr_kl_loss, _aldr]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_all_ignored_mean_is_nan(loss_fn):
    x = np.full((3, 4), np.nan)
    t = np.full(3, IGNORE)
    assert np.isnan(loss_fn(x, t))
    assert loss_fn(x, t, reduction="sum") == 0.0
    assert np.all(loss_fn(x, t, reduction="none") == 0.0)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_nan_row_gives_nan(loss_fn):
    x, t = make_batch(14, ignored=())
    x[2, 3] = np.nan
    rows = loss_fn(x, t, reduction="none")
    assert np.isnan(rows[2]) and np.all(np.isfinite(np.delete(rows, 2)))
    assert np.isnan(loss_fn(x, t))


GRADS = [
    lambda g, x, t, **kw: comp_sum_loss_grad(g, x, t, **kw),
    lambda g, x, t, **kw: spherical_z_loss_grad(g, x, t, **kw),
    lambda g, x, t, **kw: ldr_kl_loss_grad(g, x, t, **kw),
    lambda g, x, t, **kw: aldr_kl_loss_grad(g, x, t, np.ones(len(t)), **kw),
]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_common_bad_inputs(loss_fn):
    x = np.zeros((3, 4))
    t = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="target"):
        loss_fn(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="target"):
        loss_fn(x, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="target"):
        loss_fn(x, np.array([0, 1]))
    with pytest.raises(TypeError, match="target"):
        loss_fn(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="logits"):
        loss_fn(np.zeros(4), np.array([0]))
    with pytest.raises(TypeError, match="logits"):
        loss_fn(np.zeros((3, 4), dtype=bool), t)
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(x, t, reduction="average")
    with pytest.raises(TypeError, match="ignore_index"):
        loss_fn(x, t, ignore_index=1.5)


@pytest.mark.parametrize("grad_fn", GRADS)
def test_grad_shape_errors(grad_fn):
    x, t = np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="grad"):
        grad_fn(np.ones(3), x, t, reduction="mean")
    with pytest.raises(ValueError, match="grad"):
        grad_fn(np.float64(1.0), x, t, reduction="none")


@pytest.mark.parametrize(
    "fn,kw,exc,name",
    [
        (comp_sum_loss, dict(tau=-0.5), ValueError, "tau"),
        (spherical_z_loss, dict(a=0.0), ValueError, "a"),
        (spherical_z_loss, dict(a=-1.0), ValueError, "a"),
        (spherical_z_loss, dict(b=np.inf), ValueError, "b"),
        (spherical_z_loss, dict(eps=0.0), ValueError, "eps"),
        (spherical_z_loss, dict(a="1"), TypeError, "a"),
        (ldr_kl_loss, dict(lam=0.0), ValueError, "lam"),
        (ldr_kl_loss, dict(margin=-0.1), ValueError, "margin"),
        (_aldr, dict(alpha=1.0), ValueError, "alpha"),
        (_aldr, dict(alpha=0.5), ValueError, "alpha"),
        (_aldr, dict(lam0=0.0), ValueError, "lam0"),
        (_aldr, dict(margin=-1.0), ValueError, "margin"),
    ],
)
def test_bad_hyperparameters(fn, kw, exc, name):
    with pytest.raises(exc, match=rf"^{name} "):
        fn(np.zeros((3, 4)), np.array([0, 1, 2]), **kw)


@pytest.mark.parametrize(
    "lam_prev,exc",
    [(np.ones(2), ValueError), (np.array([1.0, 0.0, 1.0]), ValueError), (np.array([1.0, np.nan, 1.0]), ValueError),
     (np.array(["a", "b", "c"]), TypeError)],
)
def test_aldr_bad_lam_prev(lam_prev, exc):
    with pytest.raises(exc, match="lam_prev"):
        aldr_kl_loss(np.zeros((3, 4)), np.array([0, 1, 2]), lam_prev)
