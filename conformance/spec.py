"""The declarative description of a technique (think PyTorch's OpInfo).

A `Spec` names the reference, the accelerated function and the eager baseline, how to
draw valid inputs, which inputs carry gradients, the tolerance table, the bad inputs with the
error each must raise, and the benchmark shapes with their byte / FLOP model. The engine in
`twinops.conformance.check` runs any implementation (ours or a port) against it.

Implementations are referred to by dotted path (``"module:function"``) so that reading a spec
imports neither torch nor triton.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def resolve(path: str | Callable | None) -> Callable | None:
    """Import ``"package.module:attr"`` lazily; callables pass through."""
    if path is None or callable(path):
        return path
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Sample:
    """One drawn input.

    ``arrays`` hold float64 (or integer) NumPy values. ``float_inputs`` are cast to the dtype under
    test (and the reference sees the *rounded* values). ``layouts`` asks the converter to present an
    input as a non-contiguous view (``"transposed"``, ``"strided"``) with the same values.
    ``grad_out`` is the upstream gradient for the differentiable output (non-uniform, never all ones).
    """

    arrays: Mapping[str, np.ndarray]
    kwargs: Mapping[str, Any]
    float_inputs: Sequence[str]
    layouts: Mapping[str, str] = field(default_factory=dict)
    grad_out: np.ndarray | None = None
    note: str = ""

    def describe(self) -> str:
        shapes = {k: tuple(np.shape(v)) for k, v in self.arrays.items()}
        extra = f" layouts={dict(self.layouts)}" if self.layouts else ""
        note = f" [{self.note}]" if self.note else ""
        return f"shapes={shapes} kwargs={dict(self.kwargs)}{extra}{note}"


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype tolerance: ``|acc - ref| <= atol * sqrt(n) + rtol * |ref|`` elementwise.

    ``n`` is the reduction length the spec reports for the output (1 for elementwise results).
    With ``atol_scales_with_row`` the absolute part is relative to the largest reference entry of
    each row (for gradients whose entries are sums of terms far larger than some results).
    For 16-bit dtypes an element also passes when the error is no worse than ``baseline_factor``
    times the eager baseline's error on the same inputs plus ``atol`` (the "no worse than naive"
    rule). ``reasons`` explains every value that departs from the library default.
    """

    rtol: Mapping[str, float]
    atol: Mapping[str, float]
    baseline_factor: float = 2.0
    atol_scales_with_row: bool = False  # atol times max(1, max |ref| over the last axis)
    reasons: Sequence[str] = ()


DEFAULT_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
)


@dataclass(frozen=True)
class BadInput:
    """An invalid call and the error it must raise.

    ``make()`` returns ``(arrays, kwargs)`` as in a `Sample` (float arrays are cast to
    float32). ``data_dependent`` marks errors that only show in tensor *values* (a label out of
    range): device code cannot raise those without a synchronisation, so an implementation passes
    by raising the error *or* by returning NaN at ``nan_positions`` (a boolean mask over the
    ``reduction="none"`` output, or all outputs when None).
    """

    description: str
    make: Callable[[], tuple[dict, dict]]
    error: type[Exception]
    match: str
    data_dependent: bool = False


@dataclass(frozen=True)
class BenchCase:
    """A benchmark shape. ``make(rng)`` builds float/int NumPy inputs and keyword arguments.

    ``smoke`` builds a tiny version of the same call for CPU smoke runs (default: every 2-D input cut
    to a few rows and columns, labels wrapped into range). ``dtypes`` restricts the float dtypes the
    case is timed in (default: the benchmark's GPU dtypes)."""

    label: str
    make: Callable[[np.random.Generator], tuple[dict, dict]]
    float_inputs: Sequence[str]
    smoke: Callable[[np.random.Generator], tuple[dict, dict]] | None = None
    dtypes: Sequence[str] | None = None


@dataclass(frozen=True)
class Spec:
    """Everything the conformance engine and the benchmarks need to know about one technique."""

    name: str
    paper: int
    family: str
    summary: str
    reference: str | Callable
    reference_grad: str | Callable | None
    accelerated: str | Callable | None
    baseline: str | Callable | None
    samples: Callable[..., Any]  # (profile: str) -> hypothesis strategy of Sample
    grad_inputs: Sequence[str] = ()
    tolerance: Tolerance = DEFAULT_TOLERANCE
    reduction_length: Callable[[Sample], int] = lambda sample: 1
    bad_inputs: Sequence[BadInput] = ()
    examples: Callable[[], Sequence[Sample]] = lambda: ()
    bench_cases: Sequence[BenchCase] = ()
    bytes_moved: Callable[[dict, int, str], float] | None = None  # (arrays, itemsize, direction)
    flops: Callable[[dict, str], float] | None = None
    fd_skip: Callable[[Sample], str | None] = lambda sample: None  # reason when FD cannot check a sample
    fd_function: Callable[[dict, dict], Callable] | None = None  # what finite differences differentiate, if not the output
    output_dtypes: Sequence[str] = ("input",)  # per output: "input" (the float input dtype) or a dtype name
    grad_output_index: int | None = None  # which output of a tuple is differentiated (None: single output)
    properties: Sequence[str] = ()  # exact properties beyond shape/dtype/NaN positions, for the docs
    # Deliberately wrong ports the suite must catch, beyond the generic ones every technique gets
    # (output off by 1e-3, gradient 1% too large): name -> (conforming fn -> wrong fn). They prove the
    # strategies reach this technique's characteristic bugs (an ignored mask, a wrong reduction).
    wrong_ports: Mapping[str, Callable[[Callable], Callable]] = field(default_factory=dict)

    def reference_fn(self) -> Callable:
        return resolve(self.reference)

    def reference_grad_fn(self) -> Callable | None:
        return resolve(self.reference_grad)

    def accelerated_fn(self) -> Callable | None:
        return resolve(self.accelerated)

    def baseline_fn(self) -> Callable | None:
        return resolve(self.baseline)
