#!/usr/bin/env bash
# One device call for the fused small-batch linear kernel: its GPU tests, the runner / engine-core / moe GPU suites
# (graph-memory probe, MoE router and alignment) while the sweep's configs compile, then alone on the GPU the tile
# sweep (benchmarks/gemv_sweep.py) and batch-1 latency with the kernel off (the same-run baseline) and on.
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
gpu_tests moe 200 packages/moe/tests &
for i in 0 1 2 3 4 5; do timeout 200 python3 benchmarks/gemv_sweep.py --compile-only $i/6 > "$R/compile_$i.log" 2>&1 & done
gpu_tests runner "${RUNNER_LIMIT_S:-200}" packages/model-runner/tests packages/engine-core/tests
wait
timeout "${SWEEP_LIMIT_S:-120}" python3 benchmarks/gemv_sweep.py --out "$R/gemv.json" --commit "$commit" > "$R/sweep.log" 2>&1
stamp sweep $? >> "$R/sweep.log"
for rows in 0 16; do
  TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS=$rows timeout "${LATENCY_LIMIT_S:-120}" python3 benchmarks/gpu_e2e.py \
    --out "$R/latency_rows$rows" --commit "$commit" --only ceilings,latency --budget-s 110 > "$R/latency_rows$rows.log" 2>&1
  stamp "latency max_rows=$rows" $? >> "$R/latency_rows$rows.log"
done
