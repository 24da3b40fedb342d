"""A target for Nsight Compute: the MXFP4 fused-MoE layer at gpt-oss-20b's shapes (benchmarks/moe_mxfp4.py) run
`--calls` times at `--tokens` tokens, nothing else, so `ncu --kernel-name regex:fused_moe` sees only its GEMMs.

    ncu --kernel-name regex:fused_moe --launch-skip 4 --launch-count 2 --section WarpStateStats \\
        python benchmarks/moe_ncu_target.py --tokens 1
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
from moe_mxfp4 import TOP_K, E, K, N

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import quantize_experts_mxfp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * N, K, device="cuda", generator=gen) * K**-0.5
    w2 = torch.randn(E, K, N, device="cuda", generator=gen) * N**-0.5
    b13, b2, scales = quantize_experts_mxfp4(w13, w2)
    del w13, w2
    epilogue = ExpertEpilogue(
        torch.randn(E, 2 * N, device="cuda").bfloat16(), torch.randn(E, K, device="cuda").bfloat16()
    )
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    x = torch.randn(args.tokens, K, device="cuda", generator=gen).bfloat16()
    top, ids = torch.randn(args.tokens, E, device="cuda", generator=gen).topk(TOP_K, dim=-1)
    for _ in range(args.calls):
        kernel(x, b13, b2, top.softmax(-1), ids.to(torch.int32), "swigluoai", epilogue=epilogue, mxfp4=scales)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
