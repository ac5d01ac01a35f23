"""Behaviour of the classification kernels beyond numerical agreement: independent anchors, views,
errors, modules. (The contract every technique keeps — inputs never written, no graph under
no_grad, one graph under torch.compile — is in test_accelerated_contract.py.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import twinops.accelerated.classification as acc
import twinops.reference.classification as ref


def _logits(n=6, c=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_comp_sum_at_tau_1_is_cross_entropy(reduction):
    """Independent anchor: torch's own cross-entropy, with class weights and ignored rows."""
    x = _logits()
    t = torch.tensor([0, 5, -100, 36, 2, -100])
    w = torch.rand(37) + 0.5
    want = F.cross_entropy(x.double(), t, weight=w.double(), ignore_index=-100, reduction=reduction)
    got = acc.comp_sum_loss(x, t, tau=1.0, weight=w, reduction=reduction)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    r = ref.comp_sum_loss(x.double().numpy(), t.numpy(), tau=1.0, weight=w.double().numpy(), reduction=reduction)
    np.testing.assert_allclose(r, want.numpy(), rtol=1e-12)
    xg = x.clone().requires_grad_(True)
    xd = x.double().requires_grad_(True)
    g = torch.rand_like(got) + 0.5
    (gx,) = torch.autograd.grad(acc.comp_sum_loss(xg, t, weight=w, reduction=reduction), xg, g)
    (gd,) = torch.autograd.grad(F.cross_entropy(xd, t, weight=w.double(), reduction=reduction), xd, g.double())
    np.testing.assert_allclose(gx.numpy(), gd.numpy(), rtol=1e-5, atol=1e-7)


CALLS = {
    "comp_sum_loss": lambda x, t, **kw: acc.comp_sum_loss(x, t, tau=0.5, **kw),
    "spherical_z_loss": lambda x, t, **kw: acc.spherical_z_loss(x, t, **kw),
    "ldr_kl_loss": lambda x, t, **kw: acc.ldr_kl_loss(x, t, **kw),
    "aldr_kl_loss": lambda x, t, **kw: acc.aldr_kl_loss(x, t, torch.full((x.shape[0],), 0.8), **kw)[0],
}


@pytest.mark.parametrize("name", list(CALLS))
def test_transposed_view_equals_contiguous(name):
    x = _logits(5, 33)
    xt = x.t().contiguous().t()  # same values, column-major strides, no copy inside the kernel
    t = torch.tensor([0, 5, 32, 1, 2])
    assert not xt.is_contiguous()
    torch.testing.assert_close(CALLS[name](xt, t, reduction="none"), CALLS[name](x, t, reduction="none"))


@pytest.mark.parametrize("name", list(CALLS))
def test_out_of_range_label_poisons_its_row_only(name):
    x = _logits(3, 7)
    out = CALLS[name](x, torch.tensor([0, 7, 3]), reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_class_weight_requiring_grad_is_rejected():
    w = torch.ones(37, requires_grad=True)
    with pytest.raises(ValueError, match="weight"):
        acc.comp_sum_loss(_logits(), torch.zeros(6, dtype=torch.long), weight=w)


@pytest.mark.parametrize("bad, match", [
    (dict(logits=torch.zeros(4, 3, dtype=torch.float64)), "float32"),
    (dict(logits=torch.zeros(4, 3, 2)), "logits"),
    (dict(target=torch.zeros(5, dtype=torch.long)), "target"),
    (dict(target=torch.zeros(4)), "target"),
    (dict(logits=[[0.0]]), "logits"),
])
def test_bad_tensors_name_the_argument(bad, match):
    args = dict(logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long)) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc.comp_sum_loss(args["logits"], args["target"])


def test_modules_match_functions():
    x, t = _logits(), torch.tensor([0, 5, -100, 36, 2, 1])
    torch.testing.assert_close(acc.CompSumLoss(tau=1.5)(x, t), acc.comp_sum_loss(x, t, tau=1.5))
    torch.testing.assert_close(acc.SphericalZLoss(a=2.0)(x, t), acc.spherical_z_loss(x, t, a=2.0))
    torch.testing.assert_close(acc.LDRKLLoss(lam=2.0)(x, t), acc.ldr_kl_loss(x, t, lam=2.0))
