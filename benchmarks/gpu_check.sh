#!/usr/bin/env bash
# One script for a lent GPU host: build with the CUDA kernels, run the `gpu` tests, run every
# benchmark suite on GPU sizes, print a short summary table last. Uses the host's python3 (with its
# CUDA torch and triton); writes logs and results under benchmarks/results (and $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
status=0

echo "== build"
PREFKERN_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . || { echo "build failed"; exit 1; }
python3 -m prefkern info
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== gpu tests"
python3 -m pytest tests -m gpu -q 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1

echo "== benchmarks"
python3 -m benchmarks --device cuda --reps 10 2>&1 | tee "$RESULTS/gpu_bench.log" || status=1

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/*_cuda.json "$RESULTS"/*_cuda.md "$RESULTS"/gpu_*.log "$OUT"/ 2>/dev/null || true
fi
echo "== summary"
python3 -m benchmarks --summary --device cuda
exit $status
