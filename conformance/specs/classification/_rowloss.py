"""What the row-wise classification losses over (N, C) logits share: tolerance, byte model, bench
shapes, bad inputs and wrong ports. ``row_loss_spec`` builds a spec from them."""

from __future__ import annotations

import numpy as np

from ... import wrong_ports
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import row_loss_edge_cases, row_loss_samples

REF = "twinops.reference.classification"
ACC = "twinops.accelerated.classification"
BASE = "twinops.conformance.baselines.classification"

ROW_LOSS_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with sqrt(C): every output is a reduction over a row of C logits (log-sum-exp, "
        "mean/variance), whose fp32 rounding error grows like sqrt(C).",
        "16-bit outputs also pass when no worse than 2x the eager PyTorch baseline + atol: the "
        "output itself is rounded to the input dtype.",
    ),
)


def row_length(sample: Sample) -> int:
    return int(np.shape(sample.arrays["logits"])[1])


def logits_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the logits once; backward reads them once and writes the gradient once."""
    n, c = np.shape(arrays["logits"])
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    return float(passes * n * c * itemsize + 8 * n)


def row_bench_cases(extra=None):
    def inputs(n, c):
        def make(rng):
            arrays = {"logits": rng.standard_normal((n, c), dtype=np.float32), "target": rng.integers(0, c, n)}
            if extra is not None:
                arrays.update(extra(rng, n))
            return arrays, {}

        return make

    def case(n, c):
        return BenchCase(f"{n}x{c}", inputs(n, c), ("logits",), smoke=inputs(4, 40))

    return (case(8192, 32000), case(4096, 128256))


def row_bad_inputs(base_kwargs: dict, extra=None) -> tuple[BadInput, ...]:
    """Bad inputs every row-wise loss must reject. ``extra`` adds inputs the loss needs."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3))

    def call(target=np.array([0, 2]), lg=logits, **kw):
        arrays = {"logits": lg, "target": target}
        if extra is not None:
            arrays.update(extra(len(target)))
        return lambda: (arrays, {**base_kwargs, **kw})

    return (
        BadInput("label >= C", call(np.array([0, 3])), ValueError, "target", data_dependent=True),
        BadInput("negative label other than ignore_index", call(np.array([-5, 0])), ValueError, "target",
                 data_dependent=True),
        BadInput("1-D logits", call(lg=logits[0]), ValueError, "logits"),
        BadInput("float target", call(np.array([0.0, 1.0])), TypeError, "target"),
        BadInput("target length differs from N", call(np.array([0, 1, 2])), ValueError, "target"),
        BadInput("unknown reduction", call(reduction="avg"), ValueError, "reduction"),
    )


def _ignores_labels(target, kw):
    """Treat ignored rows as class 0 (a port that forgets ``ignore_index``)."""
    import torch

    return torch.where(target == kw.get("ignore_index", -100), 0, target)


ROW_LOSS_WRONG_PORTS = {
    "ignores ignore_index": wrong_ports.replaces_argument("target", _ignores_labels),
    "mean over all rows": wrong_ports.mean_over_all_rows,
}


def row_loss_spec(name: str, paper: int, summary: str, *, module: str, hyper=None, edge_hypers=(),
                  **fields) -> Spec:
    """A row-wise loss over (N, C) logits: the four implementations are ``<family module>.<module>:<name>``,
    inputs come from ``row_loss_samples`` with the technique's ``hyper`` strategy and the shared edge
    cases at each of ``edge_hypers``; ``fields`` set or override anything else."""
    defaults = dict(
        family="classification",
        reference=f"{REF}.{module}:{name}",
        reference_grad=f"{REF}.{module}:{name}_grad",
        accelerated=f"{ACC}.{module}:{name}",
        baseline=f"{BASE}.{module}:{name}",
        samples=lambda profile, dtype: row_loss_samples(profile, dtype, hyper),
        examples=lambda: [s for h in edge_hypers for s in row_loss_edge_cases(h)],
        grad_inputs=("logits",),
        tolerance=ROW_LOSS_TOLERANCE,
        reduction_length=row_length,
        bench_cases=row_bench_cases(),
        bytes_moved=logits_bytes,
        wrong_ports=ROW_LOSS_WRONG_PORTS,
    )
    return Spec(name=name, paper=paper, summary=summary, **{**defaults, **fields})


def bad_hyper(name: str, value: float, rule: str, extra=None) -> BadInput:
    def make():
        arrays = {"logits": np.zeros((2, 3)), "target": np.array([0, 1])}
        if extra is not None:
            arrays.update(extra(2))
        return arrays, {name: value}

    return BadInput(f"{name} = {value:g} (must be {rule})", make, ValueError, name)
