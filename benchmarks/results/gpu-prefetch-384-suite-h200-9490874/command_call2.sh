# Session 13, device call 2 (tree 9490874 = 2c1a7f7's code): the 1000 x 1024/1024 run with the bf16 defaults
# (256 sequences) against --max-num-seqs 384 (384 x 2,048 tokens fit the ~880k-token cache without preemption),
# alternating on one machine, each a fresh process, with the SM clock and power sampled.
set -u
source .whl/activate.sh
python3 -m compileall -q -j 16 /tmp/site packages/*/src src > /dev/null 2>&1
T0=$(date +%s); R=$OUT/r; mkdir -p "$R"; cp exp/call2.sh "$R/"; cat exp/commit > "$R/meta.log"
OUT_DIR=$R THROUGHPUT_LIMIT_S=150 BUDGET_S=370 \
  VARIANTS="bf16:auto: bf16_384:auto::--max-num-seqs,384 bf16_again:auto: bf16_384_again:auto::--max-num-seqs,384" \
  bash benchmarks/gpu_throughput_ab.sh
echo "done at $(( $(date +%s) - T0 )) s" >> "$R/stamps.log"
cat "$R/stamps.log"; tar -czf "$OUT/r.tgz" -C "$OUT" r
