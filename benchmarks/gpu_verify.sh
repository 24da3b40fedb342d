#!/usr/bin/env bash
# One device call of correctness on GPU: every package's gpu-marked tests (pytest processes side by side: Triton
# and FlashInfer compile on first use) beside backend_agreement.py, then the attention micro-benchmark.
# Run from the repo root:  source .whl/activate.sh; OUT_DIR=/tmp/r COMMIT=sha bash benchmarks/gpu_verify.sh
set -u
R="${OUT_DIR:-gpu-out}"; mkdir -p "$R"
commit=${COMMIT:-unknown}
limit=${LIMIT_S:-300}  # each of: the kernel/moe suites, the agreement runs; then 200 s for the runner suite
{ echo "commit $commit"; nvidia-smi -L; python3 -c "import torch, triton, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__)"; } > "$R/meta.log" 2>&1
t0=$(date +%s)
gpu_tests() {  # name, test dirs...
  local name=$1; shift
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=15 "$@" > "$R/tests_$name.log" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s" >> "$R/tests_$name.log"
}
gpu_tests kernels packages/ir/tests packages/kernels/tests -k "not flashinfer" &
gpu_tests moe packages/moe/tests &
# FlashInfer JIT-compiles one module per variant (~1 min each): four processes compile them side by side
F=packages/kernels/tests
gpu_tests fi_decode $F/test_attention_flashinfer.py -k decode &
gpu_tests fi_prefill $F/test_attention_flashinfer.py -k prefill &
gpu_tests fi_mixed $F/test_attention_flashinfer.py -k "mixed or missing" &
gpu_tests fi_graphs $F/test_attention_flashinfer_graphs.py &
# 8B processes at once: four bf16 (~17 GB each) fit an H100 beside the small test models; fp32 ones are ~34 GB
parallel=$(python3 -c "import torch; print(4 if torch.cuda.mem_get_info()[1] > 100e9 else 2)")
timeout "$limit" python3 benchmarks/backend_agreement.py --out "$R/agreement/agreement.json" --commit "$commit" \
  --runs "${AGREEMENT_RUNS:-torch,triton_eager,triton_graph,torch_rtz,flashinfer,flashinfer_graph,torch_fp32,triton_fp32}" \
  --parallel "$parallel" > "$R/agreement.log" 2>&1
echo "agreement exit $? after $(( $(date +%s) - t0 )) s" >> "$R/agreement.log"
# the runner tests size the KV cache from free memory: run them once the 8B processes are gone
limit=${RUNNER_LIMIT_S:-200} gpu_tests runner packages/model-runner/tests packages/engine-core/tests
wait
timeout ${ATTENTION_LIMIT_S:-90} python3 benchmarks/attention.py "$R/attention.json" > "$R/attention.log" 2>&1
echo "attention exit $? after $(( $(date +%s) - t0 )) s" >> "$R/attention.log"
pkill -f backend_agreement.py; pkill -f "pytest -q" ; true
