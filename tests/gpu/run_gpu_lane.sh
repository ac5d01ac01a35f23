#!/usr/bin/env bash
# The GPU lane in one go, for a machine with a CUDA GPU and torch/triton/pytest already installed:
# install twinops, run tests/gpu (bf16 conformance, torch.compile fullgraph, >2**31 offsets), then the
# benchmarks. Results go to $OUT (default: reports/gpu) as they are produced, so a time-out keeps them.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
  git rev-parse HEAD 2>/dev/null || echo "git sha: unknown"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
timeout "${GPU_LANE_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider -rA tests/gpu 2>&1 | tail -n 60 > "$OUT/gpu_lane.log"
tail -n 25 "$OUT/gpu_lane.log"
TWINOPS_BENCH_ROWS="$OUT/bench_rows.jsonl" twinops bench --out "$OUT" > "$OUT/bench.log" 2>&1
tail -n 5 "$OUT/bench.log"
ls "$OUT"
