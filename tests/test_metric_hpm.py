"""HPM (P30): the relative loss against a brute-force loop, the easy-to-hard mask against a hand-worked
example and a distribution check, and the accelerated functions' behaviour."""

import math

import numpy as np
import pytest
import torch

import twinops.accelerated.metric.hpm as acc
from twinops.conformance.baselines.metric import hpm as base
from twinops.reference.metric.hpm import easy_to_hard_mask, hpm_relative_loss, hpm_relative_loss_grad


def _brute_relative(p, t, eps):
    total, count = 0.0, 0
    for b in range(p.shape[0]):
        for i in range(p.shape[1]):
            for j in range(p.shape[1]):
                sig = 1.0 / (1.0 + math.exp(-(p[b, j] - p[b, i])))
                if t[b, j] > t[b, i]:
                    total += -math.log(sig + eps)
                elif t[b, j] < t[b, i]:
                    total += -math.log(1.0 - sig + eps)
                else:
                    continue
                count += 1
    return total, count


def test_relative_loss_matches_the_pair_loop():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(2, 6)), rng.integers(0, 3, size=(2, 6)).astype(float)
    total, count = _brute_relative(p, t, 1e-6)
    assert hpm_relative_loss(p, t) == pytest.approx(total / count, rel=1e-12)
    assert hpm_relative_loss(p, t, reduction="sum") == pytest.approx(total, rel=1e-12)
    assert hpm_relative_loss(p, t, reduction="none").sum() == pytest.approx(total, rel=1e-12)


def test_relative_loss_limits():
    p = np.array([[0.0, 1e4, -1e4]])
    t = np.array([[0.0, -1.0, 1.0]])  # every pair ranked the wrong way by a mile
    per_pair = hpm_relative_loss(p, t)
    assert per_pair == pytest.approx(-math.log(1e-6), rel=1e-9)  # the eps bound
    assert math.isinf(hpm_relative_loss(p, t, eps=0.0)) is False and hpm_relative_loss(p, t, eps=0.0) > 1e3
    assert hpm_relative_loss(p, np.ones_like(t)) == 0.0  # nothing to rank
    assert np.all(hpm_relative_loss_grad(np.array(1.0), p, np.ones_like(t)) == 0.0)


def test_mask_hand_example():
    pred = np.array([[0.1, 0.9, 0.3, 0.9, 0.2, 0.0, 0.5, 0.4]])
    noise = np.array([[0.5, 0.0, 0.2, 0.1, 0.9, 0.3, 0.2, 0.8]])
    # L = 8, ratio 0.5: n_keep = 4, n_mask = 4; last epoch: alpha = 0.5, n_hard = 2. The hard patches are
    # 1 and 3 (tied at 0.9, both taken); of the rest, keep the 4 smallest noise: 2 (0.2), 6 (0.2, higher
    # index after 2), 5 (0.3), 0 (0.5); mask 4 and 7.
    want = np.array([[False, True, False, True, True, False, False, True]])
    got = easy_to_hard_mask(pred, noise, epoch=9, total_epochs=10, mask_ratio=0.5)
    np.testing.assert_array_equal(got, want)
    # Hard-tie order: with one hard patch, the lower index (1) of the tied 0.9 is the harder.
    one = easy_to_hard_mask(pred, noise, epoch=4, total_epochs=10, mask_ratio=0.5)  # alpha 0.25: n_hard = 1
    assert one[0, 1] and not one[0, 3]
    t = acc.easy_to_hard_mask(torch.tensor(pred, dtype=torch.float32), torch.tensor(noise, dtype=torch.float32),
                              epoch=9, total_epochs=10, mask_ratio=0.5)
    assert t.dtype == torch.bool
    np.testing.assert_array_equal(t.numpy(), want)


def test_mask_random_part_is_uniform_over_the_non_hard_patches():
    """Statistical check: with uniform keys, every non-hard patch is masked equally often."""
    rng = np.random.default_rng(1)
    b, length = 4000, 12
    pred = np.tile(np.arange(length, dtype=float), (b, 1))
    noise = rng.random((b, length))
    # L = 12, ratio 0.5: n_keep = 6, n_mask = 6; last epoch: n_hard = 3, always patches 9, 10, 11.
    mask = base.easy_to_hard_mask(torch.tensor(pred), torch.tensor(noise), epoch=9, total_epochs=10,
                                  mask_ratio=0.5).numpy()
    assert mask[:, 9:].all() and (mask.sum(axis=1) == 6).all()
    rate = mask[:, :9].mean(axis=0)  # 3 of the other 9 are masked: 1/3 each
    assert np.all(np.abs(rate - 1 / 3) < 0.03), rate
    np.testing.assert_array_equal(
        mask[:50], easy_to_hard_mask(pred[:50], noise[:50], epoch=9, total_epochs=10, mask_ratio=0.5))


def test_accelerated_relative_loss_module_and_no_backward_without_grad(monkeypatch):
    calls = []
    real = acc._relative_backward_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(acc, "_relative_backward_kernel", Spy())
    p = torch.randn(2, 5)
    t = torch.rand(2, 5)
    loss = acc.HPMRelativeLoss()(p, t)
    assert loss.grad_fn is None and not calls
    pg = p.clone().requires_grad_(True)
    acc.HPMRelativeLoss(reduction="sum")(pg, t).backward()
    assert len(calls) == 1
    want = hpm_relative_loss_grad(np.array(1.0), p.double().numpy(), t.double().numpy(), reduction="sum")
    np.testing.assert_allclose(pg.grad.numpy(), want, rtol=1e-5, atol=1e-6)


def test_accelerated_errors_name_the_argument():
    p = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="epoch"):
        acc.easy_to_hard_mask(p, p, epoch=10, total_epochs=10)
    with pytest.raises(ValueError, match="noise"):
        acc.easy_to_hard_mask(p, torch.zeros(2, 9), epoch=0, total_epochs=10)
    with pytest.raises(ValueError, match="eps"):
        acc.hpm_relative_loss(p, p, eps=-1.0)
    with pytest.raises(TypeError, match="pred"):
        acc.hpm_relative_loss(p.long(), p)


gpu = pytest.mark.gpu  # needs CUDA with compiled kernels (skipped otherwise, see conftest.py)


@gpu
def test_gpu_relative_loss_at_the_benchmark_shape_allocates_no_pair_tensor():
    """B = 2048 images of M = 147 masked patches: the eager form holds several (B, M, M) tensors
    (177 MB each in fp32); the kernels hold two numbers per image and the gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(2048, 147, device="cuda", generator=g, requires_grad=True)
    t = torch.rand(2048, 147, device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = acc.hpm_relative_loss(p, t)
    (grad,) = torch.autograd.grad(loss, p)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 4 * p.numel() * 4, extra  # the gradient and small per-image buffers, no B x M x M
    sub = slice(0, 16)
    want = hpm_relative_loss_grad(np.array(1.0), p[sub].detach().double().cpu().numpy(), t[sub].double().cpu().numpy(),
                                  reduction="sum")
    got = torch.autograd.grad(acc.hpm_relative_loss(p[sub], t[sub], reduction="sum"), p)[0][sub]
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4, atol=1e-5)


@gpu
def test_gpu_mask_at_the_benchmark_shape_matches_the_reference():
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(4096, 196, device="cuda", generator=g)
    u = torch.rand(4096, 196, device="cuda", generator=g)
    got = acc.easy_to_hard_mask(q, u, epoch=399, total_epochs=800).cpu().numpy()
    want = easy_to_hard_mask(q[:64].double().cpu().numpy(), u[:64].double().cpu().numpy(), epoch=399,
                             total_epochs=800)
    np.testing.assert_array_equal(got[:64], want)
    assert (got.sum(axis=1) == 196 - 49).all()
