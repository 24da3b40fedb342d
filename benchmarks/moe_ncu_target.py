"""A target for Nsight Compute: the MXFP4 fused-MoE layer at gpt-oss-20b's shapes (benchmarks/moe_mxfp4.py) run
`--calls` times at `--tokens` tokens, nothing else, so `ncu --kernel-name regex:fused_moe` sees only its GEMMs.

    ncu --kernel-name regex:fused_moe --launch-skip 4 --launch-count 2 --section WarpStateStats \\
        python benchmarks/moe_ncu_target.py --tokens 1
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
from moe_mxfp4 import TOP_K, E, K, make_experts

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    gen, b13, b2, scales, epilogue = make_experts()
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    x = torch.randn(args.tokens, K, device="cuda", generator=gen).bfloat16()
    top, ids = torch.randn(args.tokens, E, device="cuda", generator=gen).topk(TOP_K, dim=-1)
    for _ in range(args.calls):
        kernel(x, b13, b2, top.softmax(-1), ids.to(torch.int32), "swigluoai", epilogue=epilogue, mxfp4=scales)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
