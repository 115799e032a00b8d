#!/usr/bin/env bash
# One script for a lent GPU host: build with the CUDA kernels, run the `gpu` tests, run every
# benchmark suite on GPU sizes, print a short summary table last. Uses the host's python3 (with its
# CUDA torch and triton); writes logs and results under benchmarks/results (and $OUT when set).
# Every stage has its own time limit, so that a hang in one (nothing here has run on a GPU before)
# still leaves the others' results; the limits add up to 9.5 minutes (a run is limited to 10).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
status=0

stage() {  # stage SECONDS LOG COMMAND...: run with a time limit, tee to LOG, remember a failure
  local limit=$1 log=$2
  shift 2
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "!! stopped after ${limit}s: $*" | tee -a "$log"; fi
  [ "$rc" -eq 0 ] || status=1
}

echo "== build"
PREFKERN_CUDA=ON timeout 150 python3 -m pip install --no-build-isolation --no-deps -q . || { echo "build failed"; exit 1; }
python3 -m prefkern info
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== gpu tests"
: > "$RESULTS/gpu_tests.log"
# ~300 tests, most of them a first Triton compile: spread over 4 processes where pytest-xdist is there
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4" || true)
stage 150 "$RESULTS/gpu_tests.log" python3 -m pytest tests -m gpu -q -p no:cacheprovider $parallel

echo "== benchmarks"
: > "$RESULTS/gpu_bench.log"
for suite_limit in ensemble:60 sampling:60 logprobs:60 preference:90; do
  stage "${suite_limit#*:}" "$RESULTS/gpu_bench.log" python3 -m benchmarks "${suite_limit%%:*}" --device cuda --reps 10
done

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/*_cuda.json "$RESULTS"/*_cuda.md "$RESULTS"/*_cuda.png "$RESULTS"/gpu_*.log "$OUT"/ 2>/dev/null || true
fi
echo "== summary"
python3 -m benchmarks --summary --device cuda
exit $status
