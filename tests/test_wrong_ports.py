"""The suite can fail: deliberately wrong ports of every technique must be caught by check_port,
each with a readable message. The wrong ports wrap our (conforming) kernels and break one thing."""

import pytest
import torch

from twinops.conformance import check_port, registry

NAMES = registry.names()


def _map_loss(out, f):
    """Apply ``f`` to the loss, the first output when a technique returns several."""
    return (f(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else f(out)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def off_by_constant(fn):
    return lambda **kw: _map_loss(fn(**kw), lambda t: t + 1e-3)


def ignores_mask(fn):
    def port(*, target, ignore_index=-100, **kw):
        return fn(target=torch.where(target == ignore_index, 0, target), ignore_index=ignore_index, **kw)

    return port


def wrong_reduction(fn):
    def port(*, reduction="mean", **kw):
        out = fn(reduction="none", **kw)
        if reduction == "none":
            return out
        # mean over all rows, ignored ones included, instead of over non-ignored rows
        return _map_loss(out, lambda t: t.sum() if reduction == "sum" else t.mean())

    return port


def wrong_gradient(fn):
    return lambda **kw: _map_loss(fn(**kw), lambda t: _ScaleGrad.apply(t, 1.01))


WRONG_PORTS = {
    "off by 1e-3": off_by_constant,
    "ignores ignore_index": ignores_mask,
    "mean over all rows": wrong_reduction,
    "gradient 1% too large": wrong_gradient,
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bug", list(WRONG_PORTS))
def test_wrong_port_is_caught(name, bug):
    spec = registry.get(name)
    port = WRONG_PORTS[bug](spec.accelerated_fn())
    report = check_port(name, port, dtypes=("float32",), bad_inputs=False)
    assert not report.ok, f"{bug} port of {name} passed:\n{report}"
    text = str(report)
    assert name in text and "FAIL" in text and "input:" in text and "reference" in text


def test_missing_technique_is_reported_not_crashed():
    report = check_port("no_such_technique", lambda **kw: None)
    assert report.verdict == "not implemented" and "comp_sum_loss" in str(report)


def test_not_implemented_port_is_reported():
    def port(**kw):
        raise NotImplementedError("ours has no fp16 yet")

    report = check_port("comp_sum_loss", port, dtypes=("float32",))
    assert report.verdict == "not implemented"


def test_non_torch_port_with_converters():
    """A port in another framework (here plain NumPy standing in for JAX) plugs in with converters."""
    import numpy as np

    from twinops.reference.classification import comp_sum_loss

    def numpy_port(**kw):
        return comp_sum_loss(**kw)

    report = check_port("comp_sum_loss", numpy_port, to_native=lambda a, dtype, layout: np.asarray(a),
                        to_numpy=np.asarray, dtypes=("float32",))
    assert report.ok, str(report)
    assert any("no vjp" in s for s in report.skipped)
