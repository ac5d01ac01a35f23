"""The twinops command, run the way a user runs it (a fresh process, no GPU)."""

import json
import os
import subprocess
import sys

import pytest

FOUR = {"comp_sum_loss", "spherical_z_loss", "ldr_kl_loss", "aldr_kl_loss"}


def twinops(*args, cwd=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI must switch the interpreter on by itself
    return subprocess.run([sys.executable, "-m", "twinops.conformance", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=1800)


def test_list_json_shows_the_foundation_complete():
    out = twinops("list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["technique"]: r for r in json.loads(out.stdout)}
    assert FOUR <= set(rows)
    for name in FOUR:
        assert all(v for k, v in rows[name].items() if k not in ("technique", "paper", "family")), rows[name]
    assert rows["comp_sum_loss"]["paper"] == 13 and rows["comp_sum_loss"]["family"] == "classification"


def test_list_table():
    out = twinops("list")
    assert out.returncode == 0 and "comp_sum_loss" in out.stdout and "P42" in out.stdout


def test_check_one_technique_passes():
    out = twinops("check", "spherical_z_loss")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "spherical_z_loss" in out.stdout and "float16" in out.stdout and "backward" in out.stdout


def test_check_unknown_technique_fails_clearly():
    out = twinops("check", "nope")
    assert out.returncode != 0 and "unknown technique 'nope'" in out.stderr


@pytest.mark.bench
def test_report_without_gpu_marks_speed_not_measured(tmp_path):
    out = twinops("report", "comp_sum_loss", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no GPU" in out.stdout and str(tmp_path / "report.json") in out.stdout
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["ok"] and doc["rows"][0]["vs_compile"] == "no GPU"
    assert (tmp_path / "report.md").read_text().startswith("| technique |")


@pytest.mark.bench
def test_bench_smoke_mode(tmp_path):
    out = twinops("bench", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["schema"] == "twinops-bench/1" and doc["smoke"] is True and doc["gpu"] is None
    seen = {(r["technique"], r["direction"], r["provider"]) for r in doc["results"]}
    for name in FOUR:
        for provider in ("twinops", "eager", "compile"):
            assert (name, "fwd+bwd", provider) in seen
    assert (tmp_path / "pytest-benchmark.json").exists()


def test_reference_package_does_not_import_torch():
    code = ("import sys, twinops.reference, twinops.reference.classification as c; "
            "c.comp_sum_loss([[0.0, 1.0]], [1]); assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_golden_vectors_export_and_verify(tmp_path):
    out = twinops("vectors", "export", str(tmp_path), "comp_sum_loss", "aldr_kl_loss", "--count", "2")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["schema"] == "twinops-vectors/1" and len(index["cases"]) > 10
    meta = json.loads((tmp_path / f"{index['cases'][0]}.json").read_text())
    assert {"dtype", "kwargs", "tolerance", "reduction_length"} <= set(meta)
    assert twinops("vectors", "verify", str(tmp_path)).returncode == 0

    import numpy as np

    case = tmp_path / f"{index['cases'][-1]}.npz"
    arrays = dict(np.load(case))
    arrays["output.0"] = arrays["output.0"] + 1e-6  # a stale expected value must be reported
    np.savez(case, **arrays)
    out = twinops("vectors", "verify", str(tmp_path))
    assert out.returncode == 1 and "out of date" in out.stdout
