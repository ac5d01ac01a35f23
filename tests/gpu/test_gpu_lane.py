"""GPU lane: what the Triton interpreter cannot show — bf16, compiled kernels under
``torch.compile(fullgraph=True)``, and tensors past 2**31 elements. Skipped without CUDA."""

import os

import numpy as np
import pytest
import torch

from twinops.conformance import check_port, registry

pytestmark = pytest.mark.gpu  # skipped without CUDA or under the interpreter (tests/conftest.py)
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


def _bench_inputs(spec, dtype):
    """The first benchmark shape's small (smoke) inputs on the GPU, as the benchmark builds them."""
    from twinops.conformance import bench

    case = bench.Case(spec, spec.bench_cases[0], str(dtype).replace("torch.", ""), "fwd", "twinops")
    arrays, kwargs = bench._host_inputs(case, smoke=True)
    tensors = {k: torch.as_tensor(v).to("cuda", dtype if k in case.bench.float_inputs else None)
               for k, v in arrays.items()}
    return tensors, kwargs


@pytest.mark.parametrize("name", NAMES)
def test_conformance_compiled_kernels(name):
    """fp32 and bf16 (which the interpreter gets wrong) through the compiled kernels, with the gpu
    profile's sizes (4096-wide blocks ± 1, vocabulary-sized rows, 64/128-wide tiles ± 1)."""
    spec = registry.get(name)
    report = check_port(spec, spec.accelerated_fn(), dtypes=("float32", "bfloat16"),
                        profile=PROFILE, max_examples=EXAMPLES)
    print(report)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph(name, dtype):
    """The custom ops trace as one graph: compiled forward and backward equal eager."""
    spec = registry.get(name)
    fn = spec.accelerated_fn()
    tensors, kwargs = _bench_inputs(spec, dtype)
    compiled = torch.compile(lambda **kw: fn(**kw), fullgraph=True)
    eager_in = {k: v.clone().requires_grad_(k in spec.grad_inputs) for k, v in tensors.items()}
    comp_in = {k: v.clone().requires_grad_(k in spec.grad_inputs) for k, v in tensors.items()}
    index = spec.grad_output_index or 0
    pick = lambda out: out[index] if isinstance(out, tuple) else out
    eager, comp = fn(**eager_in, **kwargs), compiled(**comp_in, **kwargs)
    for e, c in zip(eager if isinstance(eager, tuple) else (eager,), comp if isinstance(comp, tuple) else (comp,)):
        torch.testing.assert_close(c, e, equal_nan=True)
    if spec.grad_inputs:
        pick(eager).sum().backward()
        pick(comp).sum().backward()
        for k in spec.grad_inputs:
            torch.testing.assert_close(comp_in[k].grad, eager_in[k].grad, equal_nan=True)


# The (logits (N, C), target (N,)) losses of the foundation; every other technique has its own
# offsets test in its test module, shaped for its inputs.
ROW_LOSSES = ["comp_sum_loss", "spherical_z_loss", "ldr_kl_loss", "aldr_kl_loss"]


@pytest.mark.parametrize("name", ROW_LOSSES)
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
