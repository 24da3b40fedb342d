"""Compile treadle-moe's Triton kernels ahead of time for Hopper (sm_90) on a machine without a GPU.

Run as a script (a subprocess of test_compile_sm90.py, outside the interpreter mode the test session sets): the
Triton front end and ptxas run as on an H100, so a kernel the interpreter accepts but the compiler rejects fails
in CI, not on the device. Signatures come from parameter names (`treadle_kernels.ops.support.compile_ahead`):
`*_ptr` are pointers (int32 unless listed), constexprs are given, everything else is i32.
"""

from __future__ import annotations

import sys
from functools import partial

from treadle_kernels.ops.support import compile_ahead
from treadle_moe.experts import align_triton
from treadle_moe.experts import triton_kernels as tk
from treadle_moe.experts import triton_mxfp4_kernels as mx

compile_one = partial(compile_ahead, default_pointer="*i32")


def main() -> int:
    # the grouped GEMM as the Qwen3-30B-A3B layer runs it: w13 (gated, SiLU fused) then w2 (routed weights)
    ptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "topk_weights_ptr": "*fp32"}
    for gated, mul, block_m in ((True, False, 16), (False, True, 64)):
        constexprs = {
            "A_ROWS_PER_TOKEN": 8 if gated else 1, "GATED": gated, "ACTIVATION": tk.ACTIVATION_CODES["silu"],
            "MUL_ROUTED_WEIGHT": mul, "IEEE": False, "EVEN_K": True, "BLOCK_M": block_m, "BLOCK_N": 64,
            "BLOCK_K": 128, "GROUP_M": 8,
        }  # fmt: skip
        compile_one(tk.fused_moe_gemm_kernel, constexprs, ptrs)
    # the MXFP4 grouped GEMM as gpt-oss-20b runs it: w13 (biases, swigluoai) then w2 (bias, routed weights); the
    # pointers and row strides are multiples of 16 as gpt-oss's are, so the byte loads take their wide form
    mx_ptrs = {"a_ptr": "*bf16", "b_ptr": "*u8", "s_ptr": "*u8", "c_ptr": "*bf16", "topk_weights_ptr": "*fp32",
               "bias_ptr": "*bf16"}  # fmt: skip
    aligned = (*mx_ptrs, "K", "stride_am", "stride_be", "stride_bn", "stride_cm")
    # (the fp32 decode, then the bf16 decode's inline PTX at the policy's tiles: 1 row, 2-8 rows, prefill swapped)
    for gated, mul, block_m, swap, bf16, block_n, block_k in (
        (True, False, 16, False, False, 64, 128), (False, True, 64, False, False, 64, 128),
        (True, False, 16, True, False, 64, 128), (False, True, 16, True, False, 64, 128),
        (True, False, 16, False, True, 32, 256), (False, True, 16, False, True, 64, 128),
        (True, False, 128, True, True, 64, 64),
    ):  # fmt: skip
        constexprs = {
            "A_ROWS_PER_TOKEN": 4 if gated else 1, "GATED": gated,
            "ACTIVATION": tk.ACTIVATION_CODES["swigluoai" if gated else "silu"], "MUL_ROUTED_WEIGHT": mul,
            "HAS_BIAS": True, "UPCAST": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "GROUP_M": 8, "SWAP_AB": swap, "BF16_ASM": bf16,
        }  # fmt: skip
        compile_one(mx.fused_moe_mxfp4_gemm_kernel, constexprs, mx_ptrs, floats=("alpha", "limit"),
                    divisible_by_16=aligned, options={"num_warps": 4, "num_stages": 3})  # fmt: skip
    compile_one(align_triton._count_kernel, {"CHUNK": align_triton.CHUNK, "E_P2": 128, "FILL_BLOCK": 256}, {})
    compile_one(align_triton._offsets_kernel, {"BLOCK_M": 16, "E_P2": 128, "ROWS": 64, "BLOCKS": 64}, {})
    compile_one(align_triton._scatter_kernel, {"CHUNK": align_triton.CHUNK, "E_P2": 128}, {})
    single = {"CHUNK": align_triton.CHUNK, "E_P2": 256, "BLOCK_M": 16, "FILL_BLOCK": 256, "BLOCKS": 32}
    compile_one(align_triton._single_kernel, single, {})
    print("compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
