"""Deliberately wrong ports: each wraps a conforming implementation and breaks one thing.

The suite is only worth something if it fails on wrong code. Every technique is checked against
the generic wrong ports below (the output off by 1e-3, the gradient 1% too large); a spec adds the
bugs characteristic of its technique in ``Spec.wrong_ports`` (an ignored mask, a wrong reduction,
a missing negative), built from the helpers here or its own. ``tests/test_wrong_ports.py`` asserts
that ``check_port`` fails every one of them with a readable message.
"""

from __future__ import annotations

from typing import Callable


def map_first(out, f):
    """Apply ``f`` to the first output when a technique returns several."""
    return (f(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else f(out)


def off_by(delta: float) -> Callable[[Callable], Callable]:
    """The first output shifted by ``delta``."""
    return lambda fn: (lambda **kw: map_first(fn(**kw), lambda t: t + delta))


def gradient_scaled(factor: float) -> Callable[[Callable], Callable]:
    """The right forward value with every gradient multiplied by ``factor``."""
    import torch

    class _ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * factor

    return lambda fn: (lambda **kw: map_first(fn(**kw), _ScaleGrad.apply))


def replaces_argument(name: str, change: Callable) -> Callable[[Callable], Callable]:
    """Call the implementation with ``kw[name]`` replaced by ``change(kw[name], kw)`` (e.g. a mask
    cleared, labels collapsed), a port that ignores part of its input."""

    def wrap(fn):
        def port(**kw):
            if name in kw:
                kw = dict(kw, **{name: change(kw[name], kw)})
            return fn(**kw)

        return port

    return wrap


def mean_over_all_rows(fn: Callable) -> Callable:
    """``reduction="mean"`` as a plain mean over every row, masked ones included."""

    def port(*, reduction="mean", **kw):
        out = fn(reduction="none", **kw)
        if reduction == "none":
            return out
        return map_first(out, lambda t: t.sum() if reduction == "sum" else t.mean())

    return port


def generic(spec) -> dict[str, Callable[[Callable], Callable]]:
    """The wrong ports every technique must catch: the first output off by 1e-3 (when it is a float
    output; a mask or index output gets its own wrong ports in the spec) and, when the technique is
    trained through, the gradient 1% too large."""
    first = spec.output_dtypes[0] if spec.output_dtypes else "input"
    out = {}
    if first == "input" or first.startswith(("float", "bfloat")):
        out["off by 1e-3"] = off_by(1e-3)
    if spec.grad_inputs:
        out["gradient 1% too large"] = gradient_scaled(1.01)
    return out
