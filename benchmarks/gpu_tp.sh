#!/usr/bin/env bash
# One device call on a two-GPU machine (nvidia-h200-x2): tensor and data parallelism, as session 21's four calls.
#   1. tests/test_tensor_parallel_gpu.py (two GPUs against one, graphs against eager, prompt shutdowns, the one-shot
#      all-reduce against NCCL), under faulthandler so a hang leaves every thread's stack in the log;
#   2. benchmarks/tp_all_reduce.py (NCCL against the one-shot kernel, 8 KiB to 2 MiB);
#   3. batch 1, 128/128: -tp 2 alternating with NCCL only (TREADLE_TP_ONE_SHOT_MAX_BYTES=0), then -tp 1;
#   4. 1000 x 1024/1024: -tp 2 and -tp 1;
#   5. `treadle serve -dp 2` and `-dp 1`, 1024 prompts random 1024/128 at max concurrency $DP_CONCURRENCY (512:
#      256 per engine), then SIGINT and a check that no GPU process is left.
# Each step has its own time limit; its line goes to stamps.log as it ends. All five take about 9 minutes (session
# 21's timings), close to a call's 600 s: STEPS picks some (default test,allreduce,latency,throughput,serve).
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r COMMIT=sha bash benchmarks/gpu_tp.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
export PYTHONFAULTHANDLER=1
{ echo "commit ${COMMIT:-unknown}"; nvidia-smi --query-gpu=name,uuid,clocks.sm,power.draw --format=csv; nvidia-smi topo -m; } > "$R/meta.log" 2>&1
stamp() { echo "$(date +%T) $*" >> "$R/stamps.log"; }
want() { [[ ",${STEPS:-test,allreduce,latency,throughput,serve}," == *",$1,"* ]]; }
if want test; then
ts=$(date +%s)
timeout -s ABRT -k 10 170 python3 -m pytest -x -q -s -o faulthandler_timeout=150 tests/test_tensor_parallel_gpu.py > "$R/test_tp_gpu.log" 2>&1
stamp "test rc=$? $(( $(date +%s) - ts ))s $(tail -1 "$R/test_tp_gpu.log")"
fi
if want allreduce; then
ts=$(date +%s); timeout -s ABRT -k 10 60 env TREADLE_TP_ONE_SHOT_MAX_BYTES=2097152 python3 benchmarks/tp_all_reduce.py "$R/all_reduce.json" > "$R/all_reduce.log" 2>&1
stamp "all-reduce rc=$? $(( $(date +%s) - ts ))s"
fi
M="--model benchmarks/configs/llama-3.1-8b --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --seed 0"
L="python3 -m treadle.cli bench latency $M --batch-size 1 --input-len 128 --output-len 128 --num-iters-warmup 1 --num-iters 3"
want latency && for v in one_shot nccl one_shot nccl tp1; do
  case $v in one_shot) E="TREADLE_TP_ONE_SHOT_MAX_BYTES=2097152"; A="-tp 2";; nccl) E="TREADLE_TP_ONE_SHOT_MAX_BYTES=0"; A="-tp 2";; tp1) E="TREADLE_TP_ONE_SHOT_MAX_BYTES=0"; A="-tp 1";; esac
  ts=$(date +%s); f="$R/latency_${v}_$ts"
  timeout -s ABRT -k 10 100 env $E $L $A --output-json "$f.json" > "$f.log" 2>&1
  stamp "latency $v rc=$? $(( $(date +%s) - ts ))s $(grep -h 'Avg latency' "$f.log"); teardown give-ups: $(grep -c 'left behind' "$f.log")"
done
T="python3 -m treadle.cli bench throughput $M --num-prompts 1000 --input-len 1024 --output-len 1024"
want throughput && for tp in 2 1; do
  ts=$(date +%s); f="$R/throughput_tp${tp}_$ts"
  timeout -s ABRT -k 10 150 $T -tp $tp --output-json "$f.json" > "$f.log" 2>&1
  stamp "throughput tp$tp rc=$? $(( $(date +%s) - ts ))s $(grep -h 'Throughput' "$f.log")"
done
want serve && for dp in 2 1; do
  port=$((18000 + dp)); ts=$(date +%s)
  setsid python3 -m treadle.cli serve benchmarks/configs/llama-3.1-8b --load-format dummy --max-model-len 4096 -dp $dp \
    --host 127.0.0.1 --port $port > "$R/serve_dp$dp.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  stamp "serve dp$dp ready after $(( $(date +%s) - ts ))s"
  timeout 120 python3 -m treadle.cli bench serve --port $port --num-prompts 1024 --random-input-len 1024 \
    --random-output-len 128 --max-concurrency "${DP_CONCURRENCY:-512}" --ignore-eos --seed 0 --random-vocab-size 32000 \
    --save-result --result-filename "$R/bench_serve_dp$dp.json" > "$R/bench_serve_dp$dp.log" 2>&1
  stamp "bench serve dp$dp rc=$? $(grep -h 'Output token throughput' "$R/bench_serve_dp$dp.log")"
  ts=$(date +%s); kill -INT -- -$server
  for _ in $(seq 1 30); do kill -0 $server 2> /dev/null || break; sleep 1; done
  stamp "serve dp$dp gone $(( $(date +%s) - ts ))s after SIGINT; GPU processes left: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"
  kill -9 -- -$server 2> /dev/null
done
cat "$R/stamps.log" 2> /dev/null
