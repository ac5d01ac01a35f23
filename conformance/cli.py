"""The ``twinops`` command: ``list``, ``check``, ``report``, ``bench`` and ``vectors``.

Without a usable GPU the accelerated kernels run through the Triton interpreter: the command
sets ``TRITON_INTERPRET=1`` before anything imports triton (unless the variable is already set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _configure_interpreter() -> None:
    if "TRITON_INTERPRET" not in os.environ:
        import torch  # torch does not import triton; decide before anything does

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import warnings

        # The interpreter evaluates both arms of tl.where and masked lanes with NumPy, which warns.
        warnings.filterwarnings("ignore", module="triton.runtime.interpreter")


def _specs(ids):
    from . import registry

    if not ids:
        return registry.all_specs()
    try:
        return [registry.get(i) for i in ids]
    except KeyError as exc:
        raise SystemExit(f"twinops: {exc.args[0]}") from None


def cmd_list(args) -> int:
    from . import registry

    rows = []
    for spec in registry.all_specs():
        rows.append({"technique": spec.name, "paper": spec.paper, "family": spec.family, **registry.status(spec)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ("reference", "accelerated_fwd", "accelerated_bwd", "spec", "baseline", "docs", "benchmark")
    heads = ("reference", "fwd kernel", "bwd kernel", "spec", "baseline", "docs", "benchmark")
    width = max([len("technique")] + [len(r["technique"]) for r in rows])
    print(f"{'technique':{width}s} {'paper':>5s}  {'family':15s} " + " ".join(f"{h:>10s}" for h in heads))
    for r in rows:
        marks = " ".join(f"{('yes' if r[c] else 'no'):>10s}" for c in cols)
        print(f"{r['technique']:{width}s} {'P' + str(r['paper']):>5s}  {r['family']:15s} {marks}")
    return 0


def _run_checks(specs, profile: str):
    from .check import check_port, check_reference

    results = []
    for spec in specs:
        ref = check_reference(spec, profile=profile)
        acc = check_port(spec, spec.accelerated_fn(), profile=profile)
        results.append((spec, ref, acc))
    return results


def _print_check(results) -> bool:
    ok = True
    for spec, ref, acc in results:
        for rep in (ref, acc):
            print(rep)
            ok &= rep.ok
    return ok


def cmd_check(args) -> int:
    _configure_interpreter()
    ok = _print_check(_run_checks(_specs(args.ids), args.profile))
    print("all techniques conform" if ok else "conformance FAILED")
    return 0 if ok else 1


def _run_bench(names, out_dir: Path) -> dict:
    import pytest

    from . import bench

    out_dir.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("TWINOPS_BENCH_ROWS")  # keep the rows there (e.g. to survive a time-out)
    rows_file = Path(given) if given else Path(tempfile.mkstemp(prefix="twinops-bench-", suffix=".jsonl")[1])
    os.environ["TWINOPS_BENCH_ROWS"] = str(rows_file)
    if names:
        os.environ["TWINOPS_BENCH_ONLY"] = ",".join(names)
    code = pytest.main([
        "-q", "-p", "no:cacheprovider", "--pyargs", "twinops.conformance.benchsuite",
        "-o", "python_files=benchsuite.py", "--benchmark-json", str(out_dir / "pytest-benchmark.json"),
        "--benchmark-disable-gc", "--benchmark-columns=median,rounds",
    ])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    if not given:
        rows_file.unlink()
    if code not in (0,):
        raise SystemExit(f"twinops: the benchmark suite failed (pytest exit code {int(code)})")
    doc = bench.environment(smoke=not bench.gpu_available())
    doc["results"] = bench.add_speedups(rows)
    return doc


def cmd_bench(args) -> int:
    _configure_interpreter()
    from . import bench

    doc = _run_bench([s.name for s in _specs(args.ids)] if args.ids else None, Path(args.out))
    jpath, mpath = bench.write(doc, Path(args.out))
    print(bench.markdown(doc))
    print(f"wrote {jpath} and {mpath}")
    return 0


def cmd_report(args) -> int:
    _configure_interpreter()
    from . import bench
    from .report import build_report, write_report

    specs = _specs(args.ids)
    results = _run_checks(specs, args.profile)
    bench_doc = _run_bench([s.name for s in specs], Path(args.out)) if bench.gpu_available() else None
    report = build_report(results, bench_doc)
    jpath, mpath = write_report(report, Path(args.out))
    print(report["markdown"])
    print(f"wrote {jpath} and {mpath}")
    return 0 if report["ok"] else 1


def cmd_vectors(args) -> int:
    from . import vectors

    if args.action == "export":
        path = vectors.export(Path(args.dir), args.ids or None, count=args.count)
        print(f"wrote golden vectors; index at {path}")
        return 0
    stale = vectors.verify(Path(args.dir))
    for line in stale:
        print(f"out of date: {line}")
    print("golden vectors match the reference" if not stale else f"{len(stale)} case(s) out of date")
    return 0 if not stale else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="twinops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="techniques and which of their parts exist")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    for name, func, help_ in (
        ("check", cmd_check, "run conformance (reference self-check + accelerated vs reference)"),
        ("report", cmd_report, "check + benchmarks where a GPU is present; one table, JSON + Markdown"),
        ("bench", cmd_bench, "benchmarks only"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("ids", nargs="*", metavar="ID", help="technique names (default: all)")
        if name != "bench":
            p.add_argument("--profile", choices=("ci", "dev", "gpu"), default="ci")
        if name != "check":
            p.add_argument("--out", default="reports", help="folder for the JSON and Markdown files")
        p.set_defaults(func=func)
    p = sub.add_parser("vectors", help="export or verify golden vectors for ports that cannot run Python")
    p.add_argument("action", choices=("export", "verify"))
    p.add_argument("dir", help="folder for the vectors (index.json, <technique>/<case>.npz + .json)")
    p.add_argument("ids", nargs="*", metavar="ID", help="technique names (export; default: all)")
    p.add_argument("--count", type=int, default=10, help="random cases per technique and dtype (export)")
    p.set_defaults(func=cmd_vectors)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
