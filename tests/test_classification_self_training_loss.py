"""Self-training objective (P28): the reference against torch and hand-computed ties, the kernels'
behaviour (lowest-index pseudo-labels across chunk boundaries, empty batches, errors)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinops.accelerated.classification.self_training_loss import SelfTrainingLoss, self_training_loss
from twinops.reference.classification.self_training_loss import self_training_loss as ref
from twinops.reference.classification.self_training_loss import self_training_loss_grad as ref_grad


def test_reference_against_torch_float64():
    rng = np.random.default_rng(0)
    z, y, u = rng.normal(size=(5, 7)) * 2, np.array([0, 6, -100, 3, 2]), rng.normal(size=(4, 7)) * 2
    zt, ut = torch.tensor(z, requires_grad=True), torch.tensor(u, requires_grad=True)
    a = ut.detach().argmax(-1)
    want = F.cross_entropy(zt, torch.tensor(y)) + 0.7 * F.cross_entropy(ut, a)
    gz, gu = torch.autograd.grad(want, (zt, ut), torch.tensor(1.3, dtype=torch.float64))
    assert ref(z, y, u, lam=0.7) == pytest.approx(want.item(), rel=1e-12)
    got = ref_grad(np.float64(1.3), z, y, u, lam=0.7)
    np.testing.assert_allclose(got["logits"], gz.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got["logits_unlabeled"], gu.numpy(), rtol=1e-10, atol=1e-15)


def test_reference_pseudo_term_is_minus_log_max_prob_and_ties_go_low():
    u = np.array([[1.0, 3.0, 3.0, 0.0]])
    p = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
    rows = ref(np.zeros((0, 4)), np.zeros(0, np.int64), u, lam=2.0, reduction="none")
    np.testing.assert_allclose(rows, [-2.0 * np.log(p.max())])
    g = ref_grad(np.array([1.0]), np.zeros((0, 4)), np.zeros(0, np.int64), u, lam=2.0, reduction="none")
    np.testing.assert_allclose(g["logits_unlabeled"], 2.0 * (p - np.array([[0, 1, 0, 0]])))


def test_empty_batches_contribute_zero():
    u = np.random.default_rng(1).normal(size=(3, 4))
    only_u = ref(np.zeros((0, 4)), np.zeros(0, np.int64), u)
    assert only_u == pytest.approx(ref(np.zeros((1, 4)), np.array([-100]), u))
    got = self_training_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor(u, dtype=torch.float32))
    assert got.item() == pytest.approx(only_u, rel=1e-6)
    got = self_training_loss(torch.tensor(u, dtype=torch.float32), torch.tensor([0, 1, 2]), torch.zeros(0, 4))
    assert got.item() == pytest.approx(ref(u, np.array([0, 1, 2]), np.zeros((0, 4))), rel=1e-6)


def test_kernel_ties_resolve_to_lowest_index_across_chunks():
    u = torch.randn(3, 70)
    u[0, [5, 40]] = 9.0   # tie across two 32-wide chunks
    u[1, [35, 36]] = 9.0  # tie inside a chunk
    u[2] = 1.0            # every class ties
    x = u.clone().requires_grad_(True)
    out = self_training_loss(torch.zeros(0, 70), torch.zeros(0, dtype=torch.int64), x, reduction="sum")
    (g,) = torch.autograd.grad(out, x)
    p = torch.softmax(u.double(), -1)
    for row, a in ((0, 5), (1, 35), (2, 0)):
        want = p[row].clone()
        want[a] -= 1
        np.testing.assert_allclose(g[row].double().numpy(), want.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kernel_matches_reference(reduction):
    gen = torch.Generator().manual_seed(0)
    z, u = torch.randn(4, 40, generator=gen) * 3, torch.randn(3, 40, generator=gen) * 3
    t = torch.tensor([0, 39, -100, 17])
    zg, ug = z.clone().requires_grad_(True), u.clone().requires_grad_(True)
    out = self_training_loss(zg, t, ug, lam=0.4, reduction=reduction)
    up = torch.rand_like(out) + 0.5
    gz, gu = torch.autograd.grad(out, (zg, ug), up)
    args = (z.double().numpy(), t.numpy(), u.double().numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref(*args, lam=0.4, reduction=reduction), rtol=1e-5, atol=1e-6)
    want = ref_grad(up.double().numpy(), *args, lam=0.4, reduction=reduction)
    np.testing.assert_allclose(gz.numpy(), want["logits"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gu.numpy(), want["logits_unlabeled"], rtol=1e-5, atol=1e-7)


def test_module_views_inputs_untouched_and_grad_only_where_asked():
    z, u = torch.randn(3, 33), torch.randn(5, 33)
    t = torch.tensor([0, 32, 7])
    before = (z.clone(), u.clone())
    ug = u.t().contiguous().t().requires_grad_(True)
    out = SelfTrainingLoss(lam=2.0)(z, t, ug)
    torch.testing.assert_close(out, self_training_loss(z, t, u, lam=2.0))
    (gu,) = torch.autograd.grad(out, ug)  # logits need no gradient: only the unlabelled backward runs
    assert gu.shape == u.shape
    assert torch.equal(z, before[0]) and torch.equal(u, before[1])
    assert self_training_loss(z, t, u).grad_fn is None


def test_compile_forward_and_backward():
    z, u = torch.randn(3, 20, requires_grad=True), torch.randn(2, 20, requires_grad=True)
    t = torch.tensor([1, 2, 19])
    fn = torch.compile(lambda z, t, u: self_training_loss(z, t, u, lam=0.5), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(fn(z, t, u), (z, u))
    z2, u2 = z.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(self_training_loss(z2, t, u2, lam=0.5), (z2, u2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_clear_errors():
    z, t = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="logits_unlabeled"):
        self_training_loss(z, t, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="logits_unlabeled"):
        self_training_loss(z, t, torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="lam"):
        self_training_loss(z, t, torch.zeros(2, 3), lam=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        self_training_loss(z, t, torch.zeros(2, 3), reduction="normalized")


@pytest.mark.gpu
def test_gpu_bf16_vocabulary_rows_offsets_past_2_31_and_inductor_compile():
    """Unlabelled rows of a 128256-class bf16 buffer whose last row starts past 2**31 elements, with a
    tie across chunks, against the same rows made contiguous and against float64 torch."""
    n, c = 4, 128256
    k = 2**31 // (n * c) + 1
    buf = torch.zeros((k * n, c), device="cuda", dtype=torch.bfloat16)
    u = buf[::k]
    u.copy_(torch.randn(n, c, device="cuda") * 3)
    u[3, [100, 100000]] = 50.0
    assert u.stride(0) * (n - 1) > 2**31
    z = torch.randn(3, c, device="cuda").bfloat16()
    t = torch.tensor([0, c - 1, 7], device="cuda")
    ug = u.detach().requires_grad_(True)
    out = self_training_loss(z, t, ug, lam=0.5, reduction="none")
    torch.testing.assert_close(out, self_training_loss(z, t, u.contiguous(), lam=0.5, reduction="none"))
    want = torch.cat([F.cross_entropy(z.double(), t, reduction="none"),
                      0.5 * F.cross_entropy(u.double(), u.double().argmax(-1), reduction="none")])
    torch.testing.assert_close(out.double(), want, rtol=1.6e-2, atol=1e-3)
    (g,) = torch.autograd.grad(out[-1], ug)
    assert g[3, 100].float() < 0 and g[3, 100000].float() >= 0  # the lowest tied index is the pseudo-label
    uc = u.contiguous().requires_grad_(True)
    compiled = torch.compile(lambda z, t, u: self_training_loss(z, t, u), fullgraph=True)
    (gc,) = torch.autograd.grad(compiled(z, t, uc), uc)
    (ge,) = torch.autograd.grad(self_training_loss(z, t, uc), uc)
    torch.testing.assert_close(gc, ge)
