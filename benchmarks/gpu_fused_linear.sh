#!/usr/bin/env bash
# One device call: the fused linear kernel's GPU tests and the runner / engine-core GPU suite while the sweep's
# configs compile; then alone on the GPU the tile sweep (benchmarks/gemv_sweep.py) and the end-to-end items
# E2E_ITEMS of benchmarks/gpu_e2e.py (default: ceilings, cold start, batch-1 latency, 1000-prompt throughput).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r COMMIT=sha bash benchmarks/gpu_fused_linear.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
commit=${COMMIT:-unknown}
t0=$(date +%s)
stamp() { echo "$1 exit $2 after $(( $(date +%s) - t0 )) s"; }
nvidia-smi -L > "$R/meta.log" 2>&1
gpu_tests() {  # name, limit, test paths...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=10 "$@" > "$R/tests_$name.log" 2>&1
  stamp "$name" $? >> "$R/tests_$name.log"
}
gpu_tests linear 150 packages/kernels/tests/test_ir_providers_linear.py &
for i in 0 1 2 3 4 5; do timeout 200 python3 benchmarks/gemv_sweep.py --compile-only $i/6 > "$R/compile_$i.log" 2>&1 & done
gpu_tests runner "${RUNNER_LIMIT_S:-200}" packages/model-runner/tests packages/engine-core/tests
wait
timeout "${SWEEP_LIMIT_S:-120}" python3 benchmarks/gemv_sweep.py --out "$R/gemv.json" --commit "$commit" > "$R/sweep.log" 2>&1
stamp sweep $? >> "$R/sweep.log"
# a fresh Triton cache, so the cold start compiles every kernel it uses (as on a new machine)
TRITON_CACHE_DIR=$(mktemp -d) timeout "${E2E_LIMIT_S:-300}" python3 benchmarks/gpu_e2e.py --out "$R/e2e" --commit "$commit" \
  --only "${E2E_ITEMS:-ceilings,cold_start,latency,throughput}" --budget-s $(( ${E2E_LIMIT_S:-300} - 10 )) > "$R/e2e.log" 2>&1
stamp e2e $? >> "$R/e2e.log"
