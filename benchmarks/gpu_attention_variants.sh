#!/usr/bin/env bash
# One device call on attention kernel variants: benchmarks/attention.py (one Llama-3.1-8B layer, Triton) under each
# variant of VARIANTS, each a fresh process on the same machine; then the variant fastest on the ROW workload and
# the BASELINE variant (default: the first) each run the 1000 x 1024/1024 offline throughput (Llama-3.1-8B dummy, THROUGHPUT_ARGS), the
# baseline last. A variant is NAME:CACHE:ENV=V,ENV=V (CACHE: auto, fp8 or fp8_e5m2; no env: NAME:CACHE:), e.g.
#   VARIANTS="fp8:fp8: fp8_wide:fp8:TREADLE_ATTN_NARROW_OFFSETS=0 fp8_n128_w0:fp8:TREADLE_ATTN_FP8_BLOCK_N=128,TREADLE_ATTN_FP8_WIDEN=0"
# The throughput runs take the variant's cache dtype. THROUGHPUT=0 skips them. Stops starting work after BUDGET_S.
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r bash benchmarks/gpu_attention_variants.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
t0=$(date +%s)
stamp() { echo "$1 exit $2 after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; }
nvidia-smi -L > "$R/meta.log" 2>&1
VARIANTS=${VARIANTS:-"fp8:fp8: fp8_maskall:fp8:TREADLE_ATTN_MASK_ALL_TILES=1 fp8_n128:fp8:TREADLE_ATTN_FP8_BLOCK_N=128 bf16:auto: bf16_narrow:auto:TREADLE_ATTN_NARROW_OFFSETS=1"}
ROW=${ROW:-decode b256 ctx1536}
WORKLOADS=${WORKLOADS:-decode b256 ctx1536,decode b64 ctx4096,decode b256 ctx4096,decode b32,prefill,mixed}
declare -A CACHE ENVS
for variant in $VARIANTS; do
  name=${variant%%:*}; rest=${variant#*:}; CACHE[$name]=${rest%%:*}; ENVS[$name]=${rest#*:}
  env ${ENVS[$name]//,/ } timeout 60 python3 benchmarks/attention.py "$R/attention_$name.json" --backends triton \
    --kv-cache-dtype "${CACHE[$name]}" --workloads "$WORKLOADS" --iters 30 > "$R/attention_$name.log" 2>&1
  stamp "attention_$name (${CACHE[$name]} ${ENVS[$name]})" $?
done
for f in "$R"/attention_*.log; do echo "== $f"; grep "$ROW" "$f"; done
[ "${THROUGHPUT:-1}" = 1 ] || exit 0
BEST=$(python3 - "$R" "$ROW" <<'PY'
import glob, json, os, sys
times = {}
for f in glob.glob(sys.argv[1] + "/attention_*.json"):
    rows = [r["ms"] for r in json.load(open(f))["rows"] if r["workload"] == sys.argv[2]]
    if rows:
        times[os.path.basename(f)[len("attention_"):-len(".json")]] = rows[0]
print(min(times, key=times.get) if times else "")
PY
)
BASELINE=${BASELINE:-${VARIANTS%% *}}; BASELINE=${BASELINE%%:*}
echo "fastest on '$ROW': $BEST; baseline: $BASELINE" >> "$R/stamps.log"
MODEL=benchmarks/configs/llama-3.1-8b
for name in $BEST $BASELINE; do
  [ -n "$name" ] || continue
  [ "$name" = "$BEST" ] && [ "$name" = "$BASELINE" ] && [ "${done_once:-0}" = 1 ] && continue
  done_once=1
  (( $(date +%s) - t0 < ${BUDGET_S:-400} )) || { stamp "throughput_$name skipped (budget)" 0; continue; }
  env ${ENVS[$name]//,/ } timeout "${THROUGHPUT_LIMIT_S:-170}" python3 -m treadle.cli bench throughput --model "$MODEL" \
    --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --num-prompts 1000 --input-len 1024 \
    --output-len 1024 --seed 3 --kv-cache-dtype "${CACHE[$name]}" ${THROUGHPUT_ARGS:---max-num-seqs 512} \
    --output-json "$R/throughput_$name.json" > "$R/throughput_$name.log" 2>&1
  stamp "throughput_$name" $?
  grep -h "Throughput:" "$R/throughput_$name.log"
done
cat "$R/stamps.log"
