#!/usr/bin/env bash
# One device call: the 1000 x 1024/1024 offline run (Llama-3.1-8B dummy) under each variant of VARIANTS, each a
# fresh process on the same machine, in order (put the baseline first and last to see the drift). A variant is
# NAME:CACHE:ENV=V,ENV=V (CACHE: auto, fp8 or fp8_e5m2; no env: NAME:CACHE:), e.g. the fused Gumbel sampler:
#   VARIANTS="base:fp8: fused:fp8:TREADLE_FUSED_GUMBEL=1 base2:fp8:"
# THROUGHPUT_ARGS (default --max-num-seqs 512) go to every run. Stops starting runs after BUDGET_S (default 450).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r bash benchmarks/gpu_throughput_ab.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
t0=$(date +%s)
nvidia-smi -L > "$R/meta.log" 2>&1
VARIANTS=${VARIANTS:-"base:fp8: fused_gumbel:fp8:TREADLE_FUSED_GUMBEL=1 base_again:fp8:"}
for variant in $VARIANTS; do
  name=${variant%%:*}; rest=${variant#*:}; cache=${rest%%:*}; envs=${rest#*:}
  if (( $(date +%s) - t0 >= ${BUDGET_S:-450} )); then
    echo "throughput_$name skipped (budget) after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; continue
  fi
  env ${envs//,/ } timeout "${THROUGHPUT_LIMIT_S:-170}" python3 -m treadle.cli bench throughput \
    --model benchmarks/configs/llama-3.1-8b --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 \
    --num-prompts 1000 --input-len 1024 --output-len 1024 --seed 3 --kv-cache-dtype "$cache" \
    ${THROUGHPUT_ARGS:---max-num-seqs 512} --output-json "$R/throughput_$name.json" > "$R/throughput_$name.log" 2>&1
  echo "throughput_$name ($cache $envs) exit $? after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"
  echo "$name: $(grep -h "Throughput:" "$R/throughput_$name.log")"
done
cat "$R/stamps.log"
