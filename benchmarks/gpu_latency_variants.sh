#!/usr/bin/env bash
# One device call on batch-1 decode: the GPU tests of the kernels a decode step runs (fused decode attention,
# one-row linear kernel, runner graph = eager), with and without programmatic dependent launch; then (SWEEP=1) the
# one-row linear kernel's production configs with PDL off and on, and a one-row tile sweep with PDL; then, alone on
# the GPU and each in a fresh process on the same machine, `treadle bench latency` (Llama-3.1-8B dummy, batch 1,
# 128 in / 128 out, as gpu_e2e's latency item) under each variant of VARIANTS; then a torch.profiler kernel
# breakdown of batch-1 steps under PROFILE_ENV (PROFILE=0: none); then the gpu_e2e.py items E2E_ITEMS, if any.
# TPUT_VARIANTS (same NAME:ENV form) runs gpu_e2e's 1000 x 1024/1024 throughput under each, last.
# AGREEMENT=1 also runs benchmarks/backend_agreement.py (torch, triton graph, the bf16 noise floor) beside the tests.
# A variant is NAME:ENV=VALUE,ENV=VALUE (no env: NAME:), optionally followed by engine options, each after an @
# (fast:TREADLE_PDL=1@--max-num-seqs=512). PDL_TEST_ENV: the environment of the PDL test groups (default
# TREADLE_PDL=1). PROFILE_ARGS: extra profile_steps.py options (e.g. --phases decode_b1).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r bash benchmarks/gpu_latency_variants.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
t0=$(date +%s)
stamp() { echo "$1 exit $2 after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; }
nvidia-smi -L > "$R/meta.log" 2>&1
parse_variant() {  # NAME:ENV=V,ENV=V@--opt@--opt -> name, envs (comma-separated), opts (space-separated)
  name=${1%%:*}; envs=${1#*:}; opts=""
  [[ $envs == *@* ]] && { opts=${envs#*@}; opts=${opts//@/ }; envs=${envs%%@*}; }
}
gpu_tests() {  # name, limit, env assignments (comma-separated or empty), test paths...
  local name=$1 limit=$2 envs=$3; shift 3
  env ${envs//,/ } timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=5 "$@" \
    > "$R/tests_$name.log" 2>&1
  stamp "tests_$name" $?
}
if [ "${SWEEP:-0}" = 1 ] && [ "${SWEEP_PDL:-1}" = 1 ]; then  # fill Triton's cache for the PDL sweep while tests run
  for i in 0 1 2 3 4 5; do
    TREADLE_PDL=1 timeout 200 python3 benchmarks/gemv_sweep.py --rows 1 --compile-only $i/6 > "$R/compile_$i.log" 2>&1 &
  done
fi
if [ "${AGREEMENT:-0}" = 1 ]; then  # triton vs torch top-1 (issue 4), beside the tests
  timeout 300 python3 benchmarks/backend_agreement.py --out "$R/agreement/agreement.json" \
    --runs torch,triton_graph,torch_rtz --parallel 3 > "$R/agreement.log" 2>&1 &
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  gpu_tests decode "${TEST_LIMIT_S:-240}" "" packages/kernels/tests/test_attention_triton_decode.py \
    packages/kernels/tests/test_attention_triton.py packages/kernels/tests/test_ir_providers_linear.py \
    packages/kernels/tests/test_ir_providers_sampling.py &
  gpu_tests decode_pdl "${TEST_LIMIT_S:-240}" "${PDL_TEST_ENV:-TREADLE_PDL=1}" packages/kernels/tests/test_attention_triton_decode.py \
    packages/kernels/tests/test_ir_providers_linear.py &
  # the graph-memory test measures device memory: it runs below, alone
  gpu_tests runner "${TEST_LIMIT_S:-240}" "" packages/model-runner/tests packages/engine-core/tests \
    --deselect packages/model-runner/tests/test_graph_memory.py::test_graph_memory_is_reserved_before_the_kv_cache &
  wait
  gpu_tests runner_pdl "${TEST_LIMIT_S:-240}" "${PDL_TEST_ENV:-TREADLE_PDL=1}" packages/model-runner/tests/test_runner.py \
    packages/model-runner/tests/test_graph_memory.py
  gpu_tests graph_memory 60 "" packages/model-runner/tests/test_graph_memory.py
fi
wait
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 60 python3 benchmarks/gemv_sweep.py --chosen --out "$R/gemv_chosen.json" > "$R/gemv_chosen.log" 2>&1
  stamp gemv_chosen $?
  if [ "${SWEEP_PDL:-1}" = 1 ]; then
    TREADLE_PDL=1 timeout "${SWEEP_LIMIT_S:-120}" python3 benchmarks/gemv_sweep.py --rows 1 --out "$R/gemv_pdl.json" \
      > "$R/gemv_pdl.log" 2>&1
    stamp gemv_pdl_sweep $?
  fi
fi
MODEL=benchmarks/configs/llama-3.1-8b
for variant in ${VARIANTS:-unfused:TREADLE_FUSED_DECODE_ATTENTION=0 fused: fused_pdl:TREADLE_PDL=1}; do
  parse_variant "$variant"
  env ${envs//,/ } timeout "${LATENCY_LIMIT_S:-120}" python3 -m treadle.cli bench latency --model "$MODEL" \
    --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --batch-size 1 --input-len 128 \
    --output-len 128 --num-iters-warmup 1 --num-iters 3 --seed 0 --output-json "$R/latency_$name.json" $opts \
    > "$R/latency_$name.log" 2>&1
  stamp "latency_$name ($envs $opts)" $?
done
[ "${PROFILE:-1}" = 1 ] && env ${PROFILE_ENV:-} timeout "${PROFILE_LIMIT_S:-120}" python3 benchmarks/profile_steps.py --out "$R/profile" ${PROFILE_ARGS:-} \
  > "$R/profile.log" 2>&1
[ "${PROFILE:-1}" = 1 ] && stamp "profile (${PROFILE_ENV:-})" $?
rm -f "$R"/profile/*.trace.json
if [ -n "${E2E_ITEMS:-}" ]; then  # then gpu_e2e.py items, with a fresh Triton cache (the cold start compiles all)
  TRITON_CACHE_DIR=$(mktemp -d) timeout "${E2E_LIMIT_S:-300}" python3 benchmarks/gpu_e2e.py --out "$R/e2e" \
    --commit "${COMMIT:-unknown}" --only "$E2E_ITEMS" --budget-s $(( ${E2E_LIMIT_S:-300} - 10 )) > "$R/e2e.log" 2>&1
  stamp "e2e $E2E_ITEMS" $?
  tail -n 30 "$R/e2e.log"
fi
for f in "$R"/latency_*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['result']['ms_per_output_token'])" "$f"
done
tail -n 3 "$R"/tests_*.log
for variant in ${TPUT_VARIANTS:-}; do  # 1000 x 1024/1024 offline throughput (gpu_e2e's workload), fresh process each
  parse_variant "$variant"
  env ${envs//,/ } timeout "${TPUT_LIMIT_S:-200}" python3 -m treadle.cli bench throughput --model "$MODEL" \
    --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --num-prompts 1000 --input-len 1024 \
    --output-len 1024 --seed 3 --output-json "$R/throughput_$name.json" $opts > "$R/throughput_$name.log" 2>&1
  stamp "throughput_$name ($envs $opts)" $?
  grep -i "throughput" "$R/throughput_$name.log" | tail -n 2
done
