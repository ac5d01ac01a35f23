"""dds_loss (P3): the reference against the DDS notebook's eager form and closed forms (the gradient
is the direction, reductions, masks and weights), and the accelerated path's behaviour beyond
numerical agreement."""

import importlib

import numpy as np
import pytest
import torch

acc_module = importlib.import_module("twinops.accelerated.classification.dds_loss")
from twinops.accelerated.classification.dds_loss import DDSLoss
from twinops.accelerated.classification.dds_loss import dds_loss as acc_dds
from twinops.reference.classification.dds_loss import dds_loss, dds_loss_grad

NAMES = ("eps_src_uncond", "eps_src_cond", "eps_tgt_uncond", "eps_tgt_cond")


def _arrays(shape=(2, 4, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape), {k: rng.normal(size=shape) for k in NAMES}


def test_hand_computed_example():
    """One sample, one channel, a 1 x 2 plane: g = (tgt_hat - src_hat), L = z . g / 2."""
    z = np.array([[[[1.0, -2.0]]]])
    noise = {"eps_src_uncond": np.array([[[[0.0, 1.0]]]]), "eps_src_cond": np.array([[[[1.0, 1.0]]]]),
             "eps_tgt_uncond": np.array([[[[0.5, 0.0]]]]), "eps_tgt_cond": np.array([[[[0.5, 2.0]]]])}
    # w = 2: src_hat = (0 + 2 * 1, 1 + 0) = (2, 1); tgt_hat = (0.5, 0 + 2 * 2) = (0.5, 4); g = (-1.5, 3)
    assert dds_loss(z, **noise, guidance_scale=2.0) == pytest.approx((1.0 * -1.5 - 2.0 * 3.0) / 2)
    np.testing.assert_allclose(dds_loss_grad(1.0, z, **noise, guidance_scale=2.0), [[[[-0.75, 1.5]]]])


def test_reference_matches_the_notebooks_eager_form():
    """The DDS notebook: the direction under no_grad, then (z * grad).sum() / (h * w), in torch float64."""
    z, noise = _arrays()
    zt = torch.tensor(z, requires_grad=True)
    with torch.no_grad():
        n = {k: torch.tensor(v) for k, v in noise.items()}
        grad = ((n["eps_tgt_uncond"] + 7.5 * (n["eps_tgt_cond"] - n["eps_tgt_uncond"]))
                - (n["eps_src_uncond"] + 7.5 * (n["eps_src_cond"] - n["eps_src_uncond"])))
    loss = (zt * grad).sum() / (5 * 3)
    loss.backward()
    assert dds_loss(z, **noise) == pytest.approx(loss.item(), rel=1e-13)
    np.testing.assert_allclose(dds_loss_grad(1.0, z, **noise), zt.grad.numpy(), rtol=1e-13)


def test_gradient_is_the_direction_whatever_z_holds():
    z, noise = _arrays()
    g1 = dds_loss_grad(1.0, z, **noise)
    g2 = dds_loss_grad(1.0, 100 * z + 3, **noise)
    np.testing.assert_array_equal(g1, g2)
    nan_z = z.copy()
    nan_z[0, 0, 0, 0] = np.nan
    assert np.isnan(dds_loss(nan_z, **noise))
    np.testing.assert_array_equal(dds_loss_grad(1.0, nan_z, **noise), g1)


def test_reductions_masks_and_weights():
    z, noise = _arrays()
    rows = dds_loss(z, **noise, reduction="none")
    assert dds_loss(z, **noise) == pytest.approx(rows.sum(), rel=1e-13)
    assert dds_loss(z, **noise, reduction="mean") == pytest.approx(rows.mean(), rel=1e-13)
    mask_hw = np.random.default_rng(1).uniform(size=(5, 3))
    np.testing.assert_allclose(dds_loss(z, **noise, mask=mask_hw, reduction="none"),
                               dds_loss(z, **noise, mask=np.broadcast_to(mask_hw, z.shape), reduction="none"),
                               rtol=1e-13)
    bool_mask = mask_hw > 0.5
    np.testing.assert_allclose(dds_loss(z, **noise, mask=bool_mask), dds_loss(z, **noise, mask=bool_mask * 1.0))
    weighted = dds_loss(z, **noise, weight=np.array([2.0, 0.5]), reduction="none")
    np.testing.assert_allclose(weighted, rows * [2.0, 0.5], rtol=1e-13)
    same = {"eps_src_uncond": noise["eps_tgt_uncond"], "eps_src_cond": noise["eps_tgt_cond"],
            "eps_tgt_uncond": noise["eps_tgt_uncond"], "eps_tgt_cond": noise["eps_tgt_cond"]}
    assert dds_loss(z, **same) == 0.0


def test_reference_errors_name_the_argument():
    z, noise = _arrays()
    bad = dict(noise, eps_tgt_cond=noise["eps_tgt_cond"].copy())
    bad["eps_tgt_cond"][0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="eps_tgt_cond"):
        dds_loss(z, **bad)
    with pytest.raises(ValueError, match="mask"):
        dds_loss(z, **noise, mask=np.ones((3, 3)))
    with pytest.raises(ValueError, match="weight"):
        dds_loss(z, **noise, weight=np.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        dds_loss(z, **noise, reduction="avg")
    with pytest.raises(ValueError, match="grad"):
        dds_loss_grad(np.ones(3), z, **noise, reduction="none")


# --- accelerated --------------------------------------------------------------------------------


def _tensors(shape=(2, 4, 9, 7), seed=0):
    z, noise = _arrays(shape, seed)
    return torch.tensor(z, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32) for k, v in noise.items()}


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_accelerated_matches_the_eager_baseline(reduction):
    from twinops.conformance.baselines.classification.dds_loss import dds_loss as eager

    z, noise = _tensors()
    mask = (torch.arange(7) % 2 == 0).float()
    weight = torch.tensor([1.5, 0.25])
    za, zd = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    got = acc_dds(za, **noise, mask=mask, weight=weight, guidance_scale=5.0, reduction=reduction)
    want = eager(zd, **{k: v.double() for k, v in noise.items()}, mask=mask.double(), weight=weight.double(),
                 guidance_scale=5.0, reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    w = torch.rand_like(want) + 0.5
    (ga,) = torch.autograd.grad(got, za, w.float())
    (ge,) = torch.autograd.grad(want, zd, w)
    torch.testing.assert_close(ga.double(), ge, rtol=1e-5, atol=1e-6)


def test_module_matches_function():
    z, noise = _tensors()
    torch.testing.assert_close(DDSLoss(guidance_scale=3.0)(z, *noise.values()), acc_dds(z, **noise, guidance_scale=3.0))


def test_half_noise_predictions_with_an_fp32_latent():
    """The UNet's fp16 predictions are read as they are and combined in fp32: same result as
    upcasting them first; the result has z_tgt's dtype."""
    z, noise = _tensors()
    half = {k: v.half() for k, v in noise.items()}
    got = acc_dds(z, **half)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, acc_dds(z, **{k: v.float() for k, v in half.items()}))


def test_bool_and_integer_masks_equal_float_masks_and_views_are_read_in_place():
    z, noise = _tensors()
    mask = torch.rand(1, 4, 9, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    torch.testing.assert_close(acc_dds(z, **noise, mask=mask), acc_dds(z, **noise, mask=mask.float()))
    torch.testing.assert_close(acc_dds(z, **noise, mask=mask.to(torch.uint8)), acc_dds(z, **noise, mask=mask.float()))
    channels_last = z.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(acc_dds(channels_last, **noise, reduction="none"), acc_dds(z, **noise, reduction="none"))


def test_non_finite_prediction_poisons_loss_and_its_gradient_entry():
    z, noise = _tensors()
    noise["eps_src_cond"][1, 2, 3, 4] = float("nan")
    za = z.clone().requires_grad_(True)
    loss = acc_dds(za, **noise, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    (gz,) = torch.autograd.grad(loss, za, torch.ones(2))
    assert torch.isnan(gz[1, 2, 3, 4]) and torch.isnan(gz).sum() == 1


def test_noise_predictions_receive_no_gradient():
    """The stop-gradient: predictions that require grad (a UNet run with autograd) get none."""
    z, noise = _tensors()
    za = z.clone().requires_grad_(True)
    tracked = {k: v.clone().requires_grad_(True) for k, v in noise.items()}
    grads = torch.autograd.grad(acc_dds(za, **tracked), [za, *tracked.values()], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the backward kernel was launched")


def test_no_backward_kernel_without_grad(monkeypatch):
    monkeypatch.setattr(acc_module, "_dds_backward_kernel", _NoLaunch())
    z, noise = _tensors()
    assert acc_dds(z, **noise).grad_fn is None
    with torch.no_grad():
        assert acc_dds(z.requires_grad_(True), **noise).grad_fn is None


def test_traces_as_one_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, n, m: acc_dds(z, **n, mask=m, reduction="mean"), fullgraph=True,
                       backend="aot_eager")
    z, noise = _tensors()
    mask = torch.rand(9, 7)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = fn(z1, noise, mask)
    out.backward()
    want = acc_dds(z2, **noise, mask=mask, reduction="mean")
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(z_tgt=torch.zeros(2, 4, 9, 7, dtype=torch.float64)), "float32"),
    (dict(z_tgt=torch.zeros(4, 9, 7)), "z_tgt"),
    (dict(eps_tgt_uncond=torch.zeros(2, 4, 9, 6)), "eps_tgt_uncond"),
    (dict(mask=torch.ones(2, 9, 7)), "mask"),
    (dict(mask=torch.ones(9, 7, dtype=torch.float64)), "mask"),
    (dict(weight=torch.ones(3)), "weight"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_are_named(bad, match):
    z, noise = _tensors()
    args = dict(z_tgt=z, **noise) | bad
    with pytest.raises((TypeError, ValueError), match=match):
        acc_dds(**args)


# ------------------------------------------------------------------------------------ GPU lane only

on_gpu = pytest.mark.gpu


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_benchmark_shape_matches_the_reference(dtype):
    """B = 4 x 4 x 64 x 64 (the benchmark shape), with a (B, 1, h, w) mask and weights."""
    z, noise = _tensors((4, 4, 64, 64), seed=5)
    mask = (torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    weight = torch.tensor([1.0, 0.5, 2.0, 0.0])
    z, mask, weight = z.to("cuda", dtype), mask.cuda(), weight.cuda()
    noise = {k: v.to("cuda", dtype) for k, v in noise.items()}
    za = z.clone().requires_grad_(True)
    out = acc_dds(za, **noise, mask=mask, weight=weight, reduction="none")
    (gz,) = torch.autograd.grad(out, za, torch.ones_like(out))
    host = lambda t: t.double().cpu().numpy()
    kw = dict(mask=host(mask), weight=host(weight), reduction="none")
    want = dds_loss(host(z), **{k: host(v) for k, v in noise.items()}, **kw)
    want_g = dds_loss_grad(np.ones(4), host(z), **{k: host(v) for k, v in noise.items()}, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(host(out), want, rtol=tol, atol=tol * np.abs(want).max())
    np.testing.assert_allclose(host(gz), want_g, rtol=tol, atol=tol * np.abs(want_g).max())


@on_gpu
def test_gpu_offsets_beyond_2_to_the_31():
    """A (4, 4, 64, 64) latent and one noise prediction as views whose samples are 2**29 + 2**15
    elements apart, placed so that the last sample of each starts past element 2**31: the views must
    give what their contiguous copies give."""
    b, c, h, w, step = 4, 4, 64, 64, 2**29 + 2**15
    plane = c * h * w
    try:
        buf = torch.zeros(b * step, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4.3 GB buffer")
    strides = (step, h * w, w, 1)
    z = torch.as_strided(buf, (b, c, h, w), strides, storage_offset=step - 2 * plane)
    eps = torch.as_strided(buf, (b, c, h, w), strides, storage_offset=step - plane)
    assert z.storage_offset() + (b - 1) * step > 2**31 and eps.storage_offset() + (b - 1) * step > 2**31
    z.copy_(torch.randn(b, c, h, w, device="cuda"))
    eps.copy_(torch.randn(b, c, h, w, device="cuda"))
    rest = [torch.randn(b, c, h, w, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    results = []
    for zt, e in ((z, eps), (z.contiguous(), eps.contiguous())):
        zt = zt.detach().requires_grad_(True)
        loss = acc_dds(zt, rest[0], rest[1], rest[2], e, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), zt)
        results.append((loss, g))
    del buf, z, eps
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
