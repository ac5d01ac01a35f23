"""The conformance engine: run any implementation of a technique against its reference.

``check_port`` is the one entry point, for our own kernels and for anyone's port (JAX, CUDA,
Rust behind Python bindings, ...). It draws inputs from the spec's Hypothesis strategy, rounds
them to the dtype under test, calls the reference in float64 on those *rounded* values, calls the
implementation, and compares forward outputs and (where the port can differentiate) gradients
under the spec's tolerance. Bad inputs must raise the spec's error. A missing technique or an
implementation that raises ``NotImplementedError`` is reported as "not implemented", not a crash.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings, target

from . import registry
from .numerics import Comparison, compare, round_to_dtype
from .spec import Sample, Spec

PROFILES = {
    "ci": dict(max_examples=10, derandomize=True),
    "dev": dict(max_examples=60, derandomize=False),
    "gpu": dict(max_examples=150, derandomize=False),
}
DEFAULT_DTYPES = {"ci": ("float32", "float16"), "dev": ("float32", "float16"), "gpu": ("float32", "float16", "bfloat16")}


def hypothesis_settings(profile: str, max_examples: int | None = None, shrink: bool = True) -> settings:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {profile!r}")
    options = dict(PROFILES[profile])
    if max_examples is not None:
        options["max_examples"] = max_examples
    phases = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target) + ((Phase.shrink,) if shrink else ())
    return settings(
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=phases,
        **options,
    )


@dataclass
class Worst:
    """Worst agreement seen for one (dtype, direction)."""

    max_abs: float = 0.0
    ratio: float = 0.0  # error / allowed; <= 1 passes
    examples: int = 0

    def update(self, c: Comparison) -> None:
        self.examples += 1
        if np.isfinite(c.max_abs):
            self.max_abs = max(self.max_abs, c.max_abs)
        self.ratio = max(self.ratio, c.worst_ratio)


@dataclass
class Report:
    """The outcome of checking one implementation of one technique."""

    technique: str
    implementation: str
    verdict: str = "pass"  # pass | fail | not implemented
    worst: dict = field(default_factory=dict)  # (dtype, "forward"|"backward") -> Worst
    failures: list = field(default_factory=list)  # readable messages
    skipped: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"

    def fail(self, message: str) -> None:
        self.verdict = "fail" if self.verdict != "not implemented" else self.verdict
        self.failures.append(message)

    def worst_for(self, dtype: str, direction: str) -> Worst:
        return self.worst.setdefault((dtype, direction), Worst())

    def to_dict(self) -> dict:
        return {
            "technique": self.technique,
            "implementation": self.implementation,
            "verdict": self.verdict,
            "worst": [
                {"dtype": d, "direction": k, "max_abs": w.max_abs, "ratio": w.ratio, "examples": w.examples}
                for (d, k), w in sorted(self.worst.items())
            ],
            "failures": list(self.failures),
            "skipped": list(self.skipped),
        }

    def __str__(self) -> str:
        lines = [f"{self.technique} [{self.implementation}]: {self.verdict.upper()}"]
        for (dtype, direction), w in sorted(self.worst.items()):
            lines.append(
                f"  {dtype:9s} {direction:8s} max|err|={w.max_abs:.3g}  err/tol={w.ratio:.3g}  ({w.examples} examples)"
            )
        lines += [f"  skipped: {s}" for s in self.skipped]
        lines += ["  FAIL " + m.replace("\n", "\n       ") for m in self.failures]
        return "\n".join(lines)


class Mismatch(AssertionError):
    pass


# ----------------------------------------------------------------------------------------------
# Converters. The default is PyTorch on a given device; ports pass their own to_native/to_numpy.


class TorchConverter:
    """Turns float64 NumPy values into torch tensors of the dtype under test, honouring layouts."""

    def __init__(self, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or default_device()

    def to_native(self, array: np.ndarray, dtype: str | None, layout: str | None = None, requires_grad=False):
        torch = self.torch
        arr = np.asarray(array)
        tdtype = getattr(torch, dtype) if dtype else torch.from_numpy(np.zeros(0, arr.dtype)).dtype
        base = torch.tensor(arr, dtype=torch.float64 if dtype else tdtype)
        layout = layout or "contiguous"
        if layout == "transposed" and base.ndim == 2:
            t = base.t().contiguous().to(self.device, tdtype).t()
        elif layout == "strided":
            buf = torch.zeros(base.shape[:-1] + (2 * base.shape[-1],), dtype=tdtype, device=self.device)
            buf[..., ::2] = base.to(self.device, tdtype)
            t = buf[..., ::2]
        elif layout == "row_strided" and base.ndim >= 1:
            buf = torch.zeros((2 * base.shape[0],) + tuple(base.shape[1:]), dtype=tdtype, device=self.device)
            buf[::2] = base.to(self.device, tdtype)
            t = buf[::2]
        else:
            t = base.to(self.device, tdtype)
        if requires_grad:
            t = t.detach().requires_grad_(True)
        return t

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().to("cpu", self.torch.float64 if x.is_floating_point() else x.dtype).numpy()
        return np.asarray(x)


def default_device() -> str:
    import os

    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "cuda"
    return "cpu"


# ----------------------------------------------------------------------------------------------


def _outputs(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _prepare(sample: Sample, dtype: str) -> dict:
    """The values each input actually holds at ``dtype`` (float inputs rounded, others as is)."""
    return {
        k: round_to_dtype(v, dtype) if k in sample.float_inputs else np.asarray(v)
        for k, v in sample.arrays.items()
    }


def _implementation_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


def check_port(
    technique: str | Spec,
    fn: Callable | None,
    *,
    to_native: Callable | None = None,
    to_numpy: Callable | None = None,
    vjp: Callable | None = None,
    dtypes: Sequence[str] | None = None,
    profile: str = "ci",
    device: str | None = None,
    check_grad: bool = True,
    bad_inputs: bool = True,
    max_examples: int | None = None,
    shrink: bool = True,
) -> Report:
    """Check an implementation ``fn`` of ``technique`` against the reference.

    ``fn`` is called like the reference: ``fn(**inputs, **hyper_parameters)``.

    - Default (PyTorch ports): inputs become torch tensors on ``device`` (CUDA when available and
      the Triton interpreter is off, else CPU), gradients come from ``torch.autograd``, and output
      dtypes must match the input dtype.
    - Other frameworks: ``to_native(array, dtype, layout)`` builds a native input from float64 (or
      integer) NumPy values (``dtype`` is ``None`` for integer inputs, ``layout`` may be ignored),
      ``to_numpy(x)`` converts outputs back. Gradients are checked when ``vjp(grad_out, inputs,
      kwargs)`` is given, returning ``{input_name: gradient}`` for the spec's ``grad_inputs``.

    ``profile`` picks the Hypothesis settings and input sizes (``ci``: derandomized and small;
    ``dev``: more examples; ``gpu``: vocabulary-sized rows); ``max_examples`` overrides its count.
    ``shrink=False`` reports the first failing input as drawn instead of searching for a minimal one
    (faster when only the verdict matters).
    """
    spec = technique if isinstance(technique, Spec) else _lookup(technique)
    report = Report(spec.name if spec else str(technique), _implementation_name(fn) if fn else "none")
    if spec is None:
        report.verdict = "not implemented"
        report.failures.append(f"no technique named {technique!r} (known: {', '.join(registry.names())})")
        return report
    if fn is None:
        report.verdict = "not implemented"
        return report
    torch_mode = to_native is None
    conv = TorchConverter(device) if torch_mode else None
    native = conv.to_native if torch_mode else to_native
    numpy_of = conv.to_numpy if torch_mode else (to_numpy or np.asarray)
    dtypes = tuple(dtypes or DEFAULT_DTYPES[profile])
    grads_wanted = check_grad and bool(spec.grad_inputs) and spec.reference_grad is not None
    if grads_wanted and not torch_mode and vjp is None:
        report.skipped.append("gradients: no vjp given for a non-PyTorch port")
        grads_wanted = False

    reference = spec.reference_fn()
    reference_grad = spec.reference_grad_fn()
    baseline = spec.baseline_fn() if torch_mode else None

    def run_one(sample: Sample, dtype: str) -> float:
        """Check one sample at one dtype; returns its worst error / tolerance ratio."""
        worst = 0.0
        values = _prepare(sample, dtype)
        expected = _outputs(reference(**values, **sample.kwargs))
        want_grad = grads_wanted and sample.grad_out is not None
        inputs = {
            k: native(v, dtype if k in sample.float_inputs else None, sample.layouts.get(k))
            for k, v in values.items()
        }
        if torch_mode and want_grad:
            for k in spec.grad_inputs:
                inputs[k] = inputs[k].detach().requires_grad_(True)
        try:
            got_native = fn(**inputs, **sample.kwargs)
        except NotImplementedError:
            raise
        except Exception as exc:  # a crash is a failure with the input attached
            raise Mismatch(f"{dtype}: raised {type(exc).__name__}: {exc}\n  input: {sample.describe()}") from exc
        got = _outputs(got_native)
        if len(got) != len(expected):
            raise Mismatch(f"{dtype}: returned {len(got)} outputs, reference returns {len(expected)}")
        base_out = None
        if baseline is not None and dtype in ("float16", "bfloat16"):
            base_inputs = {k: (v.detach() if hasattr(v, "detach") else v) for k, v in inputs.items()}
            base_out = _outputs(baseline(**base_inputs, **sample.kwargs))
        n = spec.reduction_length(sample)
        for i, (g, e) in enumerate(zip(got, expected)):
            if torch_mode:
                declared = spec.output_dtypes[i] if i < len(spec.output_dtypes) else "input"
                _check_dtype(g, dtype if declared == "input" else declared, i, sample)
            b = numpy_of(base_out[i]) if base_out is not None else None
            c = compare(numpy_of(g), e, dtype=dtype, tolerance=spec.tolerance, reduction_length=n, baseline=b)
            report.worst_for(dtype, "forward").update(c)
            worst = max(worst, c.worst_ratio)
            if not c.ok:
                raise Mismatch(f"{dtype} forward output {i}: {c.message}\n  input: {sample.describe()}")
        if not want_grad:
            return worst
        out_index = spec.grad_output_index or 0
        grad_out = round_to_dtype(sample.grad_out, dtype)
        ref_grads = reference_grad(grad_out, **values, **sample.kwargs)
        if not isinstance(ref_grads, dict):
            ref_grads = {spec.grad_inputs[0]: ref_grads}
        if torch_mode:
            import torch

            out_t = got[out_index]
            g_t = native(grad_out, dtype)
            tensors = [inputs[k] for k in spec.grad_inputs]
            got_grads = dict(zip(spec.grad_inputs, torch.autograd.grad(out_t, tensors, g_t, allow_unused=True)))
        else:
            got_grads = vjp(native(grad_out, dtype), inputs, dict(sample.kwargs))
        base_grads = {}
        if baseline is not None and dtype in ("float16", "bfloat16"):
            import torch

            b_inputs = {k: v.detach() for k, v in inputs.items()}
            for k in spec.grad_inputs:
                b_inputs[k].requires_grad_(True)
            b_out = _outputs(baseline(**b_inputs, **sample.kwargs))[out_index]
            bg = torch.autograd.grad(b_out, [b_inputs[k] for k in spec.grad_inputs], native(grad_out, dtype))
            base_grads = dict(zip(spec.grad_inputs, bg))
        for k in spec.grad_inputs:
            gg = got_grads.get(k)
            if gg is None:
                raise Mismatch(f"{dtype} backward: no gradient for {k!r}\n  input: {sample.describe()}")
            if torch_mode:
                _check_dtype(gg, dtype, f"grad[{k}]", sample)
            b = numpy_of(base_grads[k]) if k in base_grads else None
            c = compare(numpy_of(gg), ref_grads[k], dtype=dtype, tolerance=spec.tolerance,
                        reduction_length=n, baseline=b)
            report.worst_for(dtype, "backward").update(c)
            worst = max(worst, c.worst_ratio)
            if not c.ok:
                raise Mismatch(
                    f"{dtype} backward d/d{k} (upstream grad {np.round(sample.grad_out, 4).tolist()}): "
                    f"{c.message}\n  input: {sample.describe()}"
                )
        return worst

    try:
        for dtype in dtypes:
            for sample in spec.examples():
                try:
                    run_one(sample, dtype)
                except Mismatch as exc:
                    report.fail(f"edge case: {exc}")
            _run_hypothesis(spec, profile, dtype, run_one, report, max_examples, shrink)
        if bad_inputs:
            _check_bad_inputs(spec, fn, native, numpy_of, report)
    except NotImplementedError as exc:
        report.verdict = "not implemented"
        report.failures.append(f"raised NotImplementedError: {exc}")
    return report


def _check_dtype(value, dtype: str, which, sample: Sample) -> None:
    got = str(getattr(value, "dtype", "")).replace("torch.", "")
    if got and got != dtype:
        raise Mismatch(f"output {which}: dtype {got}, expected {dtype}\n  input: {sample.describe()}")


def _run_hypothesis(spec: Spec, profile: str, dtype: str, run_one, report: Report, max_examples=None,
                    shrink: bool = True) -> None:
    @hypothesis_settings(profile, max_examples, shrink)
    @given(spec.samples(profile, dtype))
    def prop(sample):
        ratio = run_one(sample, dtype)
        if profile != "ci" and ratio is not None and np.isfinite(ratio):
            target(float(ratio), label=f"{dtype} error / tolerance")  # steer towards the worst cases

    try:
        prop()
    except Mismatch as exc:
        report.fail(str(exc))
    except NotImplementedError:
        raise
    except Exception as exc:  # hypothesis' own errors (e.g. flaky) are failures, not crashes
        report.fail(f"{dtype}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def _check_bad_inputs(spec: Spec, fn, native, numpy_of, report: Report, allow_nan: bool = True) -> None:
    for bad in spec.bad_inputs:
        arrays, kwargs = bad.make()
        inputs = {
            k: native(np.asarray(v), "float32" if np.asarray(v).dtype.kind == "f" else None, None)
            for k, v in arrays.items()
        }
        try:
            out = fn(**inputs, **kwargs)
        except bad.error as exc:
            if bad.match.lower() not in str(exc).lower():
                report.fail(f"bad input '{bad.description}': raised {type(exc).__name__}({exc}) "
                            f"but the message should mention {bad.match!r}")
            continue
        except NotImplementedError:
            raise
        except Exception as exc:
            report.fail(f"bad input '{bad.description}': raised {type(exc).__name__}({exc}), "
                        f"expected {bad.error.__name__} mentioning {bad.match!r}")
            continue
        if allow_nan and bad.data_dependent and any(np.isnan(numpy_of(o)).any() for o in _outputs(out)):
            continue  # device code may poison the result instead of raising
        report.fail(f"bad input '{bad.description}': no {bad.error.__name__} was raised"
                    + (" and no NaN was returned" if allow_nan and bad.data_dependent else ""))


def _lookup(name: str) -> Spec | None:
    try:
        return registry.get(name)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# The reference's own gradient against float64 central differences.


def check_reference(technique: str | Spec, *, profile: str = "ci", step: float = 1e-6) -> Report:
    """Check the reference's analytic gradient against float64 central finite differences, and
    that the reference rejects every bad input with the spec's error."""
    spec = technique if isinstance(technique, Spec) else registry.get(technique)
    report = Report(spec.name, "reference (float64 finite differences)")
    reference, reference_grad = spec.reference_fn(), spec.reference_grad_fn()

    def run_one(sample: Sample, dtype: str) -> None:
        if reference_grad is None or sample.grad_out is None or not spec.grad_inputs:
            return
        reason = spec.fd_skip(sample)
        if reason:
            if reason not in report.skipped:
                report.skipped.append(reason)
            return
        values = {k: np.asarray(v, dtype=np.float64) if k in sample.float_inputs else np.asarray(v)
                  for k, v in sample.arrays.items()}
        target_fn = spec.fd_function(values, sample.kwargs) if spec.fd_function else None
        out_index = spec.grad_output_index or 0

        def f(vals):
            if target_fn is not None:
                return np.asarray(target_fn(**vals), dtype=np.float64)
            return np.asarray(_outputs(reference(**vals, **sample.kwargs))[out_index], dtype=np.float64)

        base = f(values)
        if not np.all(np.isfinite(base)):
            return  # finite differences are meaningless at NaN/inf outputs
        grads = reference_grad(sample.grad_out, **values, **sample.kwargs)
        if not isinstance(grads, dict):
            grads = {spec.grad_inputs[0]: grads}
        for name in spec.grad_inputs:
            x = values[name]
            fd = np.zeros_like(x)
            for idx in np.ndindex(x.shape):
                if not np.isfinite(x[idx]):
                    fd[idx] = np.nan  # nothing to difference at an infinite input: that entry is not checked
                    continue
                h = step * max(1.0, abs(x[idx]))
                plus, minus = dict(values), dict(values)
                plus[name] = x.copy()
                plus[name][idx] += h
                minus[name] = x.copy()
                minus[name][idx] -= h
                fd[idx] = np.sum(sample.grad_out * (f(plus) - f(minus))) / (2 * h)
            checked = np.isfinite(fd)
            scale = max(1.0, float(np.max(np.abs(fd[checked]), initial=0.0)))
            # A NaN error (the analytic gradient is NaN where finite differences are not) must fail, not
            # vanish from the max.
            err = np.where(checked, np.abs(grads[name] - fd), 0.0)
            err = np.where(np.isnan(err), np.inf, err)
            worst = float(np.max(err)) if err.size else 0.0
            w = report.worst_for("float64", "fd-grad")
            w.examples += 1
            w.max_abs = max(w.max_abs, worst)
            w.ratio = max(w.ratio, worst / (1e-5 * scale))
            if worst > 1e-5 * scale:
                i = np.unravel_index(int(np.argmax(err)), err.shape)
                raise Mismatch(f"analytic d/d{name} differs from finite differences by {worst:.3g} at "
                               f"{tuple(int(j) for j in i)}\n  input: {sample.describe()}")

    for sample in spec.examples():
        try:
            run_one(sample, "float64")
        except Mismatch as exc:
            report.fail(str(exc))
    _run_hypothesis(spec, profile, "float64", run_one, report)
    _check_bad_inputs(spec, reference, lambda v, d, l: np.asarray(v), np.asarray, report, allow_nan=False)
    return report
