#!/usr/bin/env bash
# The GPU lane in one go, for a machine with a CUDA GPU and torch/triton/pytest already installed:
# install twinops, run every test marked `gpu` (tests/gpu: fp32 + bf16 conformance of the compiled
# kernels, torch.compile fullgraph, >2**31-element offsets; the techniques' own GPU tests: bf16/TF32
# tolerances, extra memory, large offsets), then the benchmarks. Results go to $OUT (default reports/gpu)
# as they are produced, so a time-out keeps what was measured (bench_rows.jsonl, one row per case).
# A short device budget picks a subset: GPU_LANE_K (a pytest -k expression for the lane) and
# TWINOPS_BENCH_ONLY (comma-separated technique names for the benchmarks).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Without .git here (a copied tree), pass the commit: TWINOPS_GIT_SHA=$(git rev-parse HEAD).
export TWINOPS_GIT_SHA=${TWINOPS_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || true)}
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || python -m pip install -q --no-deps --no-build-isolation . >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
  python -c "from twinops.conformance import bench; print('copy_gbps', bench.copy_bandwidth_gbps())"
  echo "git sha: ${TWINOPS_GIT_SHA:-unknown}"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
timeout "${GPU_LANE_TIMEOUT:-200}" python -m pytest -q -p no:cacheprovider -rA --durations=10 -m gpu ${GPU_LANE_K:+-k "$GPU_LANE_K"} tests > "$OUT/gpu_lane.log" 2>&1
echo "gpu lane exit: $?"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_lane.log" | tail -n 30
TWINOPS_BENCH_ROWS="$OUT/bench_rows.jsonl" timeout "${BENCH_TIMEOUT:-330}" python -m twinops.conformance bench --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit: $?"
wc -l "$OUT/bench_rows.jsonl"
ls "$OUT"
