"""GPU lane: what the Triton interpreter cannot show — bf16, compiled kernels under
``torch.compile(fullgraph=True)``, and tensors past 2**31 elements. Skipped without CUDA."""

import os

import numpy as np
import pytest
import torch

from twinops.conformance import check_port, registry

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA device with compiled Triton kernels"),
]
NAMES = registry.names()
PROFILE = os.environ.get("TWINOPS_GPU_PROFILE", "gpu")
EXAMPLES = int(os.environ.get("TWINOPS_GPU_EXAMPLES", "8"))


def _inputs(name, n, c, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, device="cuda", generator=g).mul_(3).to(dtype)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    t[::7] = -100
    extra = {"lam_prev": torch.full((n,), 0.8, device="cuda")} if name == "aldr_kl_loss" else {}
    return x, t, extra


def _loss(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", NAMES)
def test_conformance_compiled_kernels(name):
    """fp32 and bf16 (which the interpreter gets wrong) through the compiled kernels, with the gpu
    profile's sizes (4096-wide blocks ± 1, vocabulary-sized rows)."""
    spec = registry.get(name)
    report = check_port(spec, spec.accelerated_fn(), dtypes=("float32", "bfloat16"),
                        profile=PROFILE, max_examples=EXAMPLES)
    print(report)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph(name, dtype):
    fn = registry.get(name).accelerated_fn()
    x, t, extra = _inputs(name, 64, 1000, dtype)
    compiled = torch.compile(lambda x, t, **kw: fn(x, t, **kw), fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager, comp = _loss(fn(xe, t, **extra)), _loss(compiled(xc, t, **extra))
    torch.testing.assert_close(comp, eager)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("name", NAMES)
def test_offsets_past_2_pow_31(name):
    """A (N, C) bf16 tensor with N*C > 2**31: the last rows must match a float64 evaluation of
    those rows alone (so a wrapped 32-bit offset would read the wrong row)."""
    spec = registry.get(name)
    fn, ref = spec.accelerated_fn(), spec.reference_fn()
    n, c = 16_400, 131_072  # 2.15e9 elements
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    x = torch.empty(n, c, device="cuda", dtype=torch.bfloat16).normal_()
    t = torch.randint(0, c, (n,), device="cuda")
    extra = {"lam_prev": torch.full((n,), 0.8, device="cuda")} if name == "aldr_kl_loss" else {}
    x.requires_grad_(True)
    out = _loss(fn(x, t, reduction="none", **extra))
    tail = slice(n - 3, n)
    (g,) = torch.autograd.grad(out[tail].sum(), x)
    out = out.detach()
    rows = x.detach()[tail].double().cpu().numpy()
    kw = {"lam_prev": extra["lam_prev"][tail].double().cpu().numpy()} if extra else {}
    want = _loss(ref(rows, t[tail].cpu().numpy(), reduction="none", **kw))
    np.testing.assert_allclose(out[tail].double().cpu().numpy(), want, rtol=2e-2, atol=1e-2)
    want_g = spec.reference_grad_fn()(np.ones(3), rows, t[tail].cpu().numpy(), reduction="none", **kw)
    np.testing.assert_allclose(g[tail].double().cpu().numpy(), want_g, rtol=2e-2, atol=1e-4)
    assert not g[: n - 3].any()
