#!/usr/bin/env bash
# One device call: the 1000 x 1024/1024 offline run (Llama-3.1-8B dummy) under each variant of VARIANTS, each a
# fresh process on the same machine, in order (put the baseline first and last to see the drift). A variant is
# NAME:CACHE:ENV=V,ENV=V[:ARG,ARG] (CACHE: auto, fp8 or fp8_e5m2; no env: NAME:CACHE:; ARGs go to that run only,
# commas for spaces, e.g. bf16_384:auto::--max-num-seqs,384). Defaults: the bf16 defaults with the fused Gumbel
# sampler (the default since session 11) and with the torch passes (TREADLE_FUSED_GUMBEL=0).
# THROUGHPUT_ARGS (default none; e.g. --max-num-seqs 512 for an fp8 cache) go to every run. Stops starting runs
# after BUDGET_S (default 450). The SM clock, power and clock-event reasons are sampled every 0.5 s during each run
# (smi_NAME.csv; the stamp line gives the median clock and power): an H200 running this workload sits at its
# 700 W power cap, and machines differ in the clock they hold there (session 11).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r bash benchmarks/gpu_throughput_ab.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
t0=$(date +%s)
nvidia-smi -L >> "$R/meta.log" 2>&1
VARIANTS=${VARIANTS:-"base:auto: torch_sampler:auto:TREADLE_FUSED_GUMBEL=0 base_again:auto:"}
median() {  # column of a CSV -> median
  cut -d, -f"$1" "$2" | tr -d ' ' | grep -E '^[0-9.]+$' | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}'
}
for variant in $VARIANTS; do
  name=${variant%%:*}; rest=${variant#*:}; cache=${rest%%:*}; envs=${rest#*:}
  args=""; if [[ $envs == *:* ]]; then args=${envs#*:}; args=${args//,/ }; envs=${envs%%:*}; fi
  if (( $(date +%s) - t0 >= ${BUDGET_S:-450} )); then
    echo "throughput_$name skipped (budget) after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; continue
  fi
  nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader,nounits -lms 500 \
    > "$R/smi_$name.csv" 2>&1 &
  smi=$!
  env ${envs//,/ } timeout "${THROUGHPUT_LIMIT_S:-170}" python3 -m treadle.cli bench throughput \
    --model benchmarks/configs/llama-3.1-8b --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 \
    --num-prompts 1000 --input-len 1024 --output-len 1024 --seed 3 --kv-cache-dtype "$cache" \
    ${THROUGHPUT_ARGS:-} $args --output-json "$R/throughput_$name.json" > "$R/throughput_$name.log" 2>&1
  status=$?
  kill $smi 2> /dev/null
  echo "throughput_$name ($cache $envs ${THROUGHPUT_ARGS:-} $args) exit $status after $(( $(date +%s) - t0 )) s;" \
    "median SM clock $(median 1 "$R/smi_$name.csv") MHz, power $(median 2 "$R/smi_$name.csv") W" >> "$R/stamps.log"
  echo "$name: $(grep -h "Throughput:" "$R/throughput_$name.log")"
done
cat "$R/stamps.log"
