"""Benchmarks: twinops kernels against the eager baseline and ``torch.compile`` of it.

On a GPU each case is timed by ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
repetition, no synchronisation between repetitions), and the median is reported with the byte
model's GB/s and its percentage of a device-to-device copy measured in the same run, the FLOP
model's TFLOP/s and its percentage of a dense matmul measured in the same run (for compute-bound
techniques such as the contrastive losses), plus the op's extra peak memory (allocation delta,
inputs excluded). pytest-benchmark drives the rounds (see `twinops.conformance.benchsuite`) so runs
compare with ``--benchmark-compare``; the rows below are the one JSON schema (``twinops-bench/1``)
the report and the docs read.

Without a GPU the suite runs a *smoke* mode: tiny shapes, the accelerated path through the Triton
interpreter, one round, and no speed figures (they would mean nothing).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import registry
from .spec import BenchCase, Spec

SCHEMA = "twinops-bench/1"
PROVIDERS = ("twinops", "eager", "compile")
DIRECTIONS = ("fwd", "fwd+bwd")
GPU_DTYPES = ("float32", "bfloat16")
SMOKE_SHAPE = (4, 40)


def gpu_available() -> bool:
    import os

    import torch

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


@dataclass(frozen=True)
class Case:
    spec: Spec
    bench: BenchCase
    dtype: str
    direction: str
    provider: str

    @property
    def id(self) -> str:
        return f"{self.spec.name}-{self.bench.label}-{self.dtype}-{self.direction}-{self.provider}"


def cases(names=None, smoke: bool = False) -> list[Case]:
    specs = [registry.get(n) for n in names] if names else registry.all_specs()
    dtypes = ("float32",) if smoke else GPU_DTYPES
    out = []
    for spec in specs:
        if spec.accelerated is None:
            continue
        benches = spec.bench_cases[:1] if smoke else spec.bench_cases
        for b in benches:
            for dtype in (dtypes if smoke or b.dtypes is None else tuple(b.dtypes)):
                for direction in DIRECTIONS:
                    if direction == "fwd+bwd" and not spec.grad_inputs:
                        continue
                    for provider in PROVIDERS:
                        out.append(Case(spec, b, dtype, direction, provider))
    return out


def _shrink(arrays: dict) -> dict:
    """Smoke mode: cut every input to at most SMOKE_SHAPE (rows x classes), keeping labels valid."""
    n, c = SMOKE_SHAPE
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.ndim == 2:
            out[k] = v[:n, :c]
        elif v.dtype.kind in "iu":
            out[k] = v[:n] % c
        else:
            out[k] = v[:n]
    return out


_INPUTS: dict = {}


def _host_inputs(case: Case, smoke: bool):
    """The case's NumPy inputs, made once per (technique, shape): a 4096 x 128256 draw takes seconds."""
    key = (case.spec.name, case.bench.label, smoke)
    if key not in _INPUTS:
        _INPUTS.clear()
        rng = np.random.default_rng(0)
        if smoke and case.bench.smoke is not None:
            _INPUTS[key] = case.bench.smoke(rng)
        else:
            arrays, kwargs = case.bench.make(rng)
            _INPUTS[key] = (_shrink(arrays) if smoke else arrays), kwargs
    return _INPUTS[key]


def prepare(case: Case, smoke: bool):
    """Inputs on the device and a zero-argument callable running the case once."""
    import torch

    arrays, kwargs = _host_inputs(case, smoke)
    device = "cuda" if gpu_available() else "cpu"
    dtype = getattr(torch, case.dtype)
    tensors = {
        k: torch.as_tensor(v).to(device, dtype if k in case.bench.float_inputs else None)
        for k, v in arrays.items()
    }
    grad_names = tuple(case.spec.grad_inputs) if case.direction == "fwd+bwd" else ()
    for k in grad_names:
        tensors[k].requires_grad_(True)
    fn = {
        "twinops": case.spec.accelerated_fn(),
        "eager": case.spec.baseline_fn(),
        "compile": case.spec.baseline_fn(),
    }[case.provider]
    if case.provider == "compile":
        fn = torch.compile(fn, dynamic=False)
    out_index = case.spec.grad_output_index or 0

    def forward():
        return fn(**tensors, **kwargs)

    def run():
        out = forward()
        if grad_names:
            out = out[out_index] if isinstance(out, tuple) else out
            torch.autograd.grad(out, [tensors[k] for k in grad_names], torch.ones_like(out))
        return out

    run.forward = forward  # for retained_mib
    return arrays, run


class DoBench:
    """One call = one ``triton.testing.do_bench`` median (ms), appended to ``samples``.

    do_bench records CUDA events around each repetition, flushes L2 before each, and synchronises
    only at the end, so the GPU stays fed as in a training loop and host-side launch latency is not
    counted as kernel time. pytest-benchmark's rounds repeat it; the row reports their median.
    """

    def __init__(self, fn):
        self.fn = fn
        self.samples: list[float] = []

    def __call__(self):
        import triton.testing

        self.samples.append(triton.testing.do_bench(self.fn, return_mode="median"))


def extra_peak_mib(fn) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def retained_mib(forward) -> float:
    """Memory held between a forward and its backward: what is allocated once the forward has
    returned (outputs and the tensors autograd saved for the backward alive), inputs excluded. This is
    the activation memory a training step keeps per layer, the figure memory-saving ops cut."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    del out
    return held / 2**20


_COPY_GBPS: float | None = None


def copy_bandwidth_gbps() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time), measured once per process."""
    global _COPY_GBPS
    if _COPY_GBPS is None and gpu_available():
        import torch
        import triton.testing

        src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        _COPY_GBPS = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    return _COPY_GBPS


_MATMUL_TFLOPS: dict = {}


def matmul_tflops(dtype: str) -> float | None:
    """Dense 8192³ matmul rate (TFLOP/s) in ``dtype`` at torch's current fp32 matmul precision,
    measured once per process and dtype."""
    if dtype not in _MATMUL_TFLOPS and gpu_available():
        import torch
        import triton.testing

        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
        ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
        _MATMUL_TFLOPS[dtype] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _MATMUL_TFLOPS.get(dtype)


def out_of_memory_errors() -> tuple:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row(case: Case, arrays: dict, ms: float | None, peak_mib: float | None, note: str | None = None,
        retained: float | None = None) -> dict:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[case.dtype]
    gbps = pct = tflops = pct_mm = None
    if ms and case.spec.bytes_moved is not None:
        gbps = case.spec.bytes_moved(arrays, itemsize, case.direction) / (ms * 1e-3) / 1e9
        copy = copy_bandwidth_gbps()
        pct = 100 * gbps / copy if copy else None
    if ms and case.spec.flops is not None:
        tflops = case.spec.flops(arrays, case.direction) / (ms * 1e-3) / 1e12
        peak = matmul_tflops(case.dtype)
        pct_mm = 100 * tflops / peak if peak else None
    return {
        "technique": case.spec.name, "case": case.bench.label, "dtype": case.dtype,
        "direction": case.direction, "provider": case.provider, "ms": ms, "gbps": gbps,
        "pct_of_copy": pct, "tflops": tflops, "pct_of_matmul": pct_mm,
        "speedup_vs_eager": None, "speedup_vs_compile": None, "extra_peak_mib": peak_mib,
        "retained_mib": retained, "note": note,
    }


def add_speedups(rows: list[dict]) -> list[dict]:
    """Fill speed-ups of the twinops rows over the eager and compiled baselines of the same case."""
    key = lambda r: (r["technique"], r["case"], r["dtype"], r["direction"])
    by = {(key(r), r["provider"]): r for r in rows}
    for r in rows:
        if r["provider"] != "twinops" or not r["ms"]:
            continue
        for other, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            o = by.get((key(r), other))
            if o and o["ms"]:
                r[field] = o["ms"] / r["ms"]
    return rows


def environment(smoke: bool) -> dict:
    import torch
    import triton

    sha = os.environ.get("TWINOPS_GIT_SHA")  # a copy of the tree without .git (a remote GPU) passes it
    try:
        sha = sha or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    gpu = torch.cuda.get_device_name() if gpu_available() else None
    return {
        "schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha, "device": gpu or "cpu (Triton interpreter)", "gpu": gpu,
        "torch": torch.__version__, "triton": triton.__version__, "smoke": smoke,
        "copy_gbps": copy_bandwidth_gbps(),
        "timing": None if smoke else "triton.testing.do_bench median (CUDA events, L2 flushed), median of rounds",
    }


def markdown(doc: dict) -> str:
    f = lambda v, spec: "–" if v is None else format(v, spec)
    ms = lambda r: "OOM" if str(r.get("note") or "").startswith("out of memory") else f(r["ms"], ".3f")
    head = (f"Device: {doc['device']} · torch {doc['torch']} · triton {doc['triton']} · "
            f"git {str(doc['git_sha'])[:10]}" + (" · smoke mode (no timings)" if doc["smoke"] else "")
            + (f" · copy bandwidth {doc['copy_gbps']:.0f} GB/s" if doc.get("copy_gbps") else ""))
    lines = [head, "", "| technique | case | dtype | direction | provider | ms | GB/s | % of copy | "
             "TFLOP/s | % of matmul | vs eager | vs compile | extra MiB | held MiB |", "|" + "---|" * 14]
    for r in doc["results"]:
        lines.append(
            f"| {r['technique']} | {r['case']} | {r['dtype']} | {r['direction']} | {r['provider']} | "
            f"{ms(r)} | {f(r['gbps'], '.0f')} | {f(r['pct_of_copy'], '.0f')} | "
            f"{f(r.get('tflops'), '.1f')} | {f(r.get('pct_of_matmul'), '.0f')} | "
            f"{f(r['speedup_vs_eager'], '.2f')} | {f(r['speedup_vs_compile'], '.2f')} | "
            f"{f(r['extra_peak_mib'], '.1f')} | {f(r.get('retained_mib'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def write(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "bench.json", out_dir / "bench.md"
    jpath.write_text(json.dumps(doc, indent=1))
    mpath.write_text(markdown(doc))
    return jpath, mpath


def median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None
