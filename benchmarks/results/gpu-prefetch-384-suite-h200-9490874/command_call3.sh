# Session 13, device call 3 (tree 9490874 = 2c1a7f7's code; warm machine of call 2): the kernels' GPU tests by
# file group (Triton attention and decode, IR providers, sampling, XQA; MoE; FlashInfer last, whose JIT builds
# each variant on first use), each group its own pytest process and time limit.
set -u
source .whl/activate.sh
python3 -m compileall -q -j 16 /tmp/site packages/*/src src > /dev/null 2>&1
T0=$(date +%s); R=$OUT/r; mkdir -p "$R"; cp exp/call3.sh "$R/"; cat exp/commit > "$R/meta.log"; nvidia-smi -L >> "$R/meta.log"
st() { echo "$1 exit $2 at $(( $(date +%s) - T0 )) s: $(tail -n 1 "$R/tests_$1.log")" >> "$R/stamps.log"; tar -czf "$OUT/r.tgz" -C "$OUT" r; }
group() {  # name, limit, paths
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=5 "$@" > "$R/tests_$name.log" 2>&1
  st "$name" $?
}
K=packages/kernels/tests
group triton 200 $K/test_attention_triton.py $K/test_attention_triton_decode.py $K/test_attention_triton_split.py \
  $K/test_attention_xqa.py $K/test_ir_providers.py $K/test_ir_providers_linear.py $K/test_ir_providers_sampling.py \
  $K/test_gumbel_sample.py $K/test_linear_stream.py
group moe 120 packages/moe/tests/test_moe_gpu.py
group flashinfer $(( 540 - ($(date +%s) - T0) )) $K/test_attention_flashinfer_graphs.py $K/test_attention_flashinfer.py
cat "$R/stamps.log"
