#!/usr/bin/env bash
# One device call on batch-1 decode: the GPU tests of the kernels a decode step runs (fused decode attention,
# one-row linear kernel, runner graph = eager), with and without programmatic dependent launch; then, alone on the
# GPU and each in a fresh process on the same machine, `treadle bench latency` (Llama-3.1-8B dummy, batch 1,
# 128 in / 128 out, as gpu_e2e's latency item) under each variant of VARIANTS; then a torch.profiler kernel
# breakdown of batch-1 steps under PROFILE_ENV.
# A variant is NAME:ENV=VALUE,ENV=VALUE (no env: NAME:).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r bash benchmarks/gpu_latency_variants.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
t0=$(date +%s)
stamp() { echo "$1 exit $2 after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; }
nvidia-smi -L > "$R/meta.log" 2>&1
gpu_tests() {  # name, limit, env assignments (comma-separated or empty), test paths...
  local name=$1 limit=$2 envs=$3; shift 3
  env ${envs//,/ } timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=5 "$@" \
    > "$R/tests_$name.log" 2>&1
  stamp "tests_$name" $?
}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  gpu_tests decode "${TEST_LIMIT_S:-240}" "" packages/kernels/tests/test_attention_triton_decode.py \
    packages/kernels/tests/test_attention_triton.py packages/kernels/tests/test_ir_providers_linear.py \
    packages/kernels/tests/test_ir_providers_sampling.py &
  gpu_tests decode_pdl "${TEST_LIMIT_S:-240}" "TREADLE_PDL=1" packages/kernels/tests/test_attention_triton_decode.py \
    packages/kernels/tests/test_ir_providers_linear.py &
  gpu_tests runner "${TEST_LIMIT_S:-240}" "" packages/model-runner/tests packages/engine-core/tests &
  gpu_tests runner_pdl "${TEST_LIMIT_S:-240}" "TREADLE_PDL=1" packages/model-runner/tests &
  wait
fi
MODEL=benchmarks/configs/llama-3.1-8b
for variant in ${VARIANTS:-unfused:TREADLE_FUSED_DECODE_ATTENTION=0 fused: fused_pdl:TREADLE_PDL=1}; do
  name=${variant%%:*}; envs=${variant#*:}
  env ${envs//,/ } timeout "${LATENCY_LIMIT_S:-120}" python3 -m treadle.cli bench latency --model "$MODEL" \
    --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --batch-size 1 --input-len 128 \
    --output-len 128 --num-iters-warmup 1 --num-iters 3 --seed 0 --output-json "$R/latency_$name.json" \
    > "$R/latency_$name.log" 2>&1
  stamp "latency_$name ($envs)" $?
done
env ${PROFILE_ENV:-} timeout "${PROFILE_LIMIT_S:-120}" python3 benchmarks/profile_steps.py --out "$R/profile" \
  > "$R/profile.log" 2>&1
stamp "profile (${PROFILE_ENV:-})" $?
rm -f "$R"/profile/*.trace.json
for f in "$R"/latency_*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['result']['ms_per_output_token'])" "$f"
done
tail -n 3 "$R"/tests_*.log
