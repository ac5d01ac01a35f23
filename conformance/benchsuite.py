"""The benchmark suite, run by pytest-benchmark (``twinops bench`` / ``make bench``).

One test per (technique, shape, dtype, direction, provider). pytest-benchmark drives the rounds;
on a GPU each round is a ``triton.testing.do_bench`` median (CUDA events, L2 flushed) and the median
of the rounds goes into the ``twinops-bench/1`` rows (``benchmark.extra_info`` holds the same row).
"""

from __future__ import annotations

import json
import os

import pytest

from . import bench

SMOKE = not bench.gpu_available()
_NAMES = [n for n in os.environ.get("TWINOPS_BENCH_ONLY", "").split(",") if n] or None
CASES = bench.cases(_NAMES, smoke=SMOKE)
ROUNDS = int(os.environ.get("TWINOPS_BENCH_ROUNDS", "3"))  # each round is a whole do_bench
_ROWS_FILE = os.environ.get("TWINOPS_BENCH_ROWS")  # JSON lines, one row per case, for the caller


def _record(r: dict) -> None:
    if _ROWS_FILE:
        with open(_ROWS_FILE, "a") as fh:
            fh.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_speed(benchmark, case):
    if SMOKE and case.provider == "compile":
        _record(bench.row(case, {}, None, None))
        pytest.skip("torch.compile is not timed in smoke mode")
    try:
        arrays, run = bench.prepare(case, SMOKE)
        if SMOKE:
            benchmark.pedantic(run, rounds=1, iterations=1)
            r = bench.row(case, arrays, None, None)
        else:
            for _ in range(3):  # warm-up: compile, autotune, caches
                run()
            timer = bench.DoBench(run)
            benchmark.pedantic(timer, rounds=ROUNDS, iterations=1)
            retained = bench.retained_mib(run.forward) if case.direction == "fwd+bwd" else None
            r = bench.row(case, arrays, bench.median(timer.samples), bench.extra_peak_mib(run), retained=retained)
    except bench.out_of_memory_errors() as exc:  # a baseline that cannot hold its B x B matrix
        r = bench.row(case, {}, None, None, note=f"out of memory: {str(exc).splitlines()[0][:120]}")
        bench.release_memory()
    benchmark.extra_info.update(r)
    _record(r)
