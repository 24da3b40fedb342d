# Session 13, device call 1: the L2 prefetch of o_proj during batch-1 attention (TREADLE_L2_PREFETCH, opt-in at
# this commit). Its GPU tests (kernel: values unchanged eager and in graphs, same stream and side stream; runner:
# tokens and hidden states unchanged, graphs captured with it), then batch-1 latency (Llama-3.1-8B dummy, 128 in /
# 128 out, as gpu_e2e's latency item) off / same stream / side stream, twice, alternating; then a torch.profiler
# breakdown of batch-1 decode steps off and on.
set -u
source .whl/activate.sh
python3 -m compileall -q -j 16 /tmp/site packages/*/src src > /dev/null 2>&1
R=$OUT/r; mkdir -p "$R"; cp exp/call1.sh "$R/"; nvidia-smi -L > "$R/meta.log" 2>&1; cat exp/commit >> "$R/meta.log"
t0=$(date +%s); stamp() { echo "$1 exit $2 after $(( $(date +%s) - t0 )) s" >> "$R/stamps.log"; tar -czf "$OUT/r.tgz" -C "$OUT" r; }
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu --durations=5 packages/kernels/tests/test_prefetch.py \
  packages/model-runner/tests/test_runner_prefetch.py > "$R/tests.log" 2>&1
stamp tests $?; tail -n 3 "$R/tests.log"
lat() {
  local name=$1; shift
  env "$@" timeout 90 python3 -m treadle.cli bench latency --model benchmarks/configs/llama-3.1-8b \
    --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 --batch-size 1 --input-len 128 \
    --output-len 128 --num-iters-warmup 1 --num-iters 3 --seed 0 --output-json "$R/latency_$name.json" > "$R/latency_$name.log" 2>&1
  stamp "latency_$name ($*)" $?; grep -h "Avg latency" "$R/latency_$name.log" | sed "s/^/$name /"
}
lat off TREADLE_L2_PREFETCH=0
lat same TREADLE_L2_PREFETCH=1
lat side TREADLE_L2_PREFETCH=1 TREADLE_L2_PREFETCH_STREAM=1
lat off_again TREADLE_L2_PREFETCH=0
lat same_again TREADLE_L2_PREFETCH=1
lat side_again TREADLE_L2_PREFETCH=1 TREADLE_L2_PREFETCH_STREAM=1
for v in off:0 same:1; do
  env TREADLE_L2_PREFETCH=${v#*:} timeout 150 python3 benchmarks/profile_steps.py --out "$R/profile_${v%%:*}" \
    --phases decode_b1 > "$R/profile_${v%%:*}.log" 2>&1
  stamp "profile_${v%%:*}" $?; rm -f "$R"/profile_*/*.trace.json
done
python3 - "$R" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/profile_*/summary.json")):
    s = json.load(open(f))["decode_b1"]
    print(f, "wall ms/step", s.get("wall_ms_per_step"))
    for k in s["top"][:8]:
        print("   ", k["kernel"][:60], k["calls"], k["mean_us"])
PY
cat "$R/stamps.log"; tar -czf "$OUT/r.tgz" -C "$OUT" r
