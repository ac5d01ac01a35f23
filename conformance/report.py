"""``twinops report``: conformance verdicts and, on a GPU, benchmark figures in one table."""

from __future__ import annotations

import json
from pathlib import Path

NO_GPU = "no GPU"


def _agreement(rep, direction: str) -> str:
    """``dtype: max|err| (err/tol)`` for each dtype checked in this direction."""
    parts = [f"{d}: {w.max_abs:.1e} ({w.ratio:.2f})" for (d, k), w in sorted(rep.worst.items()) if k == direction]
    return "; ".join(parts) or "–"


def _roofline(r: dict) -> str:
    """% of the measured matmul rate for FLOP-modelled (compute-bound) techniques, else % of copy."""
    if r.get("pct_of_matmul") is not None:
        return f"{r['pct_of_matmul']:.0f}% mm"
    return "–" if r.get("pct_of_copy") is None else f"{r['pct_of_copy']:.0f}%"


def _speed(bench_doc, technique: str) -> dict:
    """Figures of the first benchmark shape (fwd+bwd, or fwd for techniques without a gradient),
    per dtype (``a / b`` for fp32 / bf16)."""
    if bench_doc is None:
        return {"vs_eager": NO_GPU, "vs_compile": NO_GPU, "roofline": NO_GPU}
    rows = [r for r in bench_doc["results"] if r["technique"] == technique and r["provider"] == "twinops"]
    rows = [r for r in rows if r["direction"] == "fwd+bwd"] or rows
    if not rows:
        return {"vs_eager": "–", "vs_compile": "–", "roofline": "–"}
    first = rows[0]["case"], rows[0]["direction"]
    rows = [r for r in rows if (r["case"], r["direction"]) == first]
    fmt = lambda key, spec: " / ".join("–" if r.get(key) is None else format(r[key], spec) for r in rows)
    return {"vs_eager": fmt("speedup_vs_eager", ".2f") + "×", "vs_compile": fmt("speedup_vs_compile", ".2f") + "×",
            "roofline": " / ".join(_roofline(r) for r in rows)}


def build_report(results, bench_doc) -> dict:
    rows = []
    for spec, ref, acc in results:
        verdict = "pass" if ref.ok and acc.ok else (acc.verdict if not acc.ok else ref.verdict)
        rows.append({
            "technique": spec.name, "paper": f"P{spec.paper}", "verdict": verdict,
            "reference_fd_grad": _agreement(ref, "fd-grad"),
            "forward": _agreement(acc, "forward"), "backward": _agreement(acc, "backward"),
            **_speed(bench_doc, spec.name),
            "failures": ref.failures + acc.failures,
        })
    head = ("| technique | paper | verdict | forward max\\|err\\| (err/tol) | backward max\\|err\\| (err/tol) | "
            "vs eager | vs torch.compile | % of roofline |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['technique']} | {r['paper']} | {r['verdict']} | {r['forward']} | {r['backward']} | "
                     f"{r['vs_eager']} | {r['vs_compile']} | {r['roofline']} |")
    if bench_doc is None:
        lines += ["", "Speed columns: no GPU on this machine, so nothing was timed (conformance ran through "
                      "the Triton interpreter)."]
    else:
        lines += ["", f"Speed: forward+backward (forward alone where nothing is differentiated) at the first "
                      f"benchmark shape, float32 / bfloat16, on {bench_doc['device']}. % of roofline is % of the "
                      "measured copy bandwidth for memory-bound techniques and of the measured matmul rate "
                      "(\"mm\") for compute-bound ones."]
    ok = all(r["verdict"] == "pass" for r in rows)
    return {"ok": ok, "rows": rows, "bench": bench_doc, "markdown": "\n".join(lines) + "\n"}


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "report.json", out_dir / "report.md"
    jpath.write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1))
    mpath.write_text(report["markdown"])
    return jpath, mpath
