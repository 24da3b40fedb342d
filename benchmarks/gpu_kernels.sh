#!/usr/bin/env bash
# One device call: GPU tests of the kernel-level packages and their micro-benchmarks.
# Run from the repo root on the GPU machine:  source .whl/activate.sh; bash benchmarks/gpu_kernels.sh
# Results land in $OUT (or ./gpu-out): ceilings.json, ir_ops.json, attention.json, moe.json, *.log
set -u
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
commit=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee "$OUT/meta.log"
nvidia-smi -L | tee -a "$OUT/meta.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/meta.log"
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1 | tee -a "$OUT/meta.log"
timeout 120 python3 benchmarks/device_ceilings.py --out "$OUT/ceilings.json" 2>&1 | tail -8
for pkg in ir kernels moe model-runner; do
  echo "== gpu tests: $pkg"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu "packages/$pkg/tests" 2>&1 | tee "$OUT/gpu_tests_$pkg.log" | tail -15
done
timeout 240 python3 benchmarks/ir_ops.py "$OUT/ir_ops.json" --commit "$commit" 2>&1 | tail -30
timeout 180 python3 benchmarks/attention.py "$OUT/attention.json" 2>&1 | tail -30
timeout 240 python3 benchmarks/moe.py "$OUT/moe.json" 2>&1 | tail -30
