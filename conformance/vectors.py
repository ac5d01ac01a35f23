"""Golden vectors: the conformance suite for ports that cannot run Python.

``twinops vectors export DIR`` draws each technique's derandomized ``ci`` samples plus its edge
cases, rounds the float inputs to each dtype, evaluates the reference (outputs and gradient) in
float64 on those rounded values, and writes, per case, ``<technique>/<case>.npz`` (NumPy's zip of
``.npy`` arrays, readable from C++, Rust, Julia, ...) and ``<technique>/<case>.json``:

- npz arrays: ``input.<name>`` (float64 values the dtype holds, or int64 labels),
  ``output.<i>`` (expected outputs), ``grad_out`` (the upstream gradient) and ``grad.<name>``
  (expected vector-Jacobian products);
- json: ``technique``, ``dtype`` (cast the float inputs to it before calling your port),
  ``kwargs`` (hyper-parameters), ``float_inputs``, ``reduction_length`` and ``tolerance``
  (``rtol``, ``atol``: pass when ``|got - expected| <= atol * sqrt(reduction_length) + rtol * |expected|``;
  NaN and ±inf positions must match exactly).

``DIR/index.json`` lists every case. ``twinops vectors verify DIR`` re-evaluates the reference on the
stored inputs and reports any case whose expected values no longer match (vectors out of date).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import Phase, given, settings

from . import registry
from .numerics import round_to_dtype
from .spec import Sample, Spec

SCHEMA = "twinops-vectors/1"


def _outputs(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _samples(spec: Spec, dtype: str, count: int) -> list[Sample]:
    drawn: list[Sample] = list(spec.examples())

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate))
    @given(spec.samples("ci", dtype))
    def collect(sample):
        drawn.append(sample)

    collect()
    return drawn


def _expected(spec: Spec, sample: Sample, dtype: str) -> dict:
    values = {k: round_to_dtype(v, dtype) if k in sample.float_inputs else np.asarray(v)
              for k, v in sample.arrays.items()}
    arrays = {f"input.{k}": v for k, v in values.items()}
    with np.errstate(all="ignore"):
        for i, out in enumerate(_outputs(spec.reference_fn()(**values, **sample.kwargs))):
            arrays[f"output.{i}"] = np.asarray(out, dtype=np.float64)
        if spec.reference_grad is not None and sample.grad_out is not None:
            grad_out = round_to_dtype(sample.grad_out, dtype)
            grads = spec.reference_grad_fn()(grad_out, **values, **sample.kwargs)
            if not isinstance(grads, dict):
                grads = {spec.grad_inputs[0]: grads}
            arrays["grad_out"] = grad_out
            arrays.update({f"grad.{k}": np.asarray(v, dtype=np.float64) for k, v in grads.items()})
    return arrays


def export(out_dir: Path, names=None, *, dtypes=("float32", "float16"), count: int = 10) -> Path:
    """Write golden vectors for ``names`` (default: every technique); returns the index path."""
    out_dir = Path(out_dir)
    index = {"schema": SCHEMA, "cases": []}
    for spec in [registry.get(n) for n in names] if names else registry.all_specs():
        (out_dir / spec.name).mkdir(parents=True, exist_ok=True)
        for dtype in dtypes:
            for i, sample in enumerate(_samples(spec, dtype, count)):
                case = f"{i:03d}_{dtype}"
                np.savez(out_dir / spec.name / f"{case}.npz", **_expected(spec, sample, dtype))
                meta = {
                    "technique": spec.name, "dtype": dtype, "kwargs": dict(sample.kwargs),
                    "float_inputs": list(sample.float_inputs), "note": sample.note,
                    "reduction_length": spec.reduction_length(sample),
                    "tolerance": {"rtol": spec.tolerance.rtol[dtype], "atol": spec.tolerance.atol[dtype],
                                  "atol_scales_with_row": spec.tolerance.atol_scales_with_row},
                }
                (out_dir / spec.name / f"{case}.json").write_text(json.dumps(meta, indent=1))
                index["cases"].append(f"{spec.name}/{case}")
    path = out_dir / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


def verify(out_dir: Path) -> list[str]:
    """Re-evaluate the reference on every stored case; returns the cases that no longer match."""
    out_dir = Path(out_dir)
    index = json.loads((out_dir / "index.json").read_text())
    if index.get("schema") != SCHEMA:
        raise ValueError(f"{out_dir / 'index.json'}: expected schema {SCHEMA!r}, got {index.get('schema')!r}")
    stale = []
    for case in index["cases"]:
        meta = json.loads((out_dir / f"{case}.json").read_text())
        stored = dict(np.load(out_dir / f"{case}.npz"))
        spec = registry.get(meta["technique"])
        inputs = {k[len("input."):]: v for k, v in stored.items() if k.startswith("input.")}
        grad_out = stored.get("grad_out")
        sample = Sample(inputs, meta["kwargs"], tuple(meta["float_inputs"]), grad_out=grad_out)
        fresh = _expected(spec, sample, "float64")  # inputs are already the rounded values
        for key, want in stored.items():
            got = fresh.get(key)
            if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=1e-12, atol=0,
                                                                          equal_nan=True):
                stale.append(f"{case}: {key}")
                break
    return stale
