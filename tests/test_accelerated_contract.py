"""The contract every accelerated function keeps, checked for every registered technique on its
first benchmark shape's small (smoke) inputs: inputs and the incoming gradient are never written,
nothing is recorded for autograd under ``no_grad``, ``torch.compile(fullgraph=True)`` traces it as
one graph, and a CPU tensor without the interpreter is a clear error."""

import pytest
import torch

from twinops.conformance import bench, registry

SPECS = [s for s in registry.all_specs() if s.accelerated is not None and s.bench_cases]


def _inputs(spec, grad: bool):
    case = bench.Case(spec, spec.bench_cases[0], "float32", "fwd", "twinops")
    arrays, kwargs = bench._host_inputs(case, smoke=True)
    tensors = {k: torch.as_tensor(v).to(torch.float32 if k in case.bench.float_inputs else None).clone()
               for k, v in arrays.items()}
    if grad:
        for k in spec.grad_inputs:
            tensors[k].requires_grad_(True)
    return tensors, dict(kwargs)


def _differentiated(spec, out):
    return out[spec.grad_output_index or 0] if isinstance(out, tuple) else out


def _all(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_inputs_and_incoming_gradient_are_not_written(spec):
    tensors, kwargs = _inputs(spec, grad=True)
    before = {k: v.detach().clone() for k, v in tensors.items()}
    out = spec.accelerated_fn()(**tensors, **kwargs)
    if spec.grad_inputs:
        y = _differentiated(spec, out)
        g = torch.rand_like(y) + 0.5
        g0 = g.clone()
        torch.autograd.grad(y, [tensors[k] for k in spec.grad_inputs], g, allow_unused=True)
        assert torch.equal(g, g0), "the incoming gradient was written"
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]) or (v.is_floating_point() and torch.equal(
            v.detach().isnan(), before[k].isnan())), f"input {k!r} was written"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.grad_inputs], ids=lambda s: s.name)
def test_no_autograd_graph_under_no_grad(spec):
    tensors, kwargs = _inputs(spec, grad=True)
    with torch.no_grad():
        out = spec.accelerated_fn()(**tensors, **kwargs)
    assert all(o.grad_fn is None for o in _all(out) if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_traces_as_one_graph(spec):
    """``torch.compile(fullgraph=True)`` must not break the graph anywhere in our Python wrappers
    (the aot_eager backend needs no GPU; the GPU lane runs the real compiler)."""
    torch._dynamo.reset()
    fn = spec.accelerated_fn()
    compiled = torch.compile(lambda **kw: fn(**kw), fullgraph=True, backend="aot_eager")
    a, kwargs = _inputs(spec, grad=True)
    b = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in a.items()}
    got, want = compiled(**a, **kwargs), fn(**b, **kwargs)
    for g, w in zip(_all(got), _all(want)):
        torch.testing.assert_close(g, w, equal_nan=True)
    if spec.grad_inputs:
        _differentiated(spec, got).sum().backward()
        _differentiated(spec, want).sum().backward()
        for k in spec.grad_inputs:
            torch.testing.assert_close(a[k].grad, b[k].grad, equal_nan=True)


KERNEL_SPECS = [s for s in SPECS if not getattr(s.accelerated_fn(), "pure_torch", False)]


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=[s.name for s in KERNEL_SPECS])
def test_cpu_tensor_without_interpreter_is_a_clear_error(spec, monkeypatch):
    tensors, kwargs = _inputs(spec, grad=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        spec.accelerated_fn()(**tensors, **kwargs)
