"""Compile the W4A16 Triton kernels ahead of time for Hopper (sm_90) on a machine without a GPU (see compile_sm90.py:
the same check, kept in its own script so the kernel families can change apart). Run as a script by
test_w4a16_compile.py."""

from __future__ import annotations

import sys

from treadle_kernels.ops import w4a16_linear, w4a16_linear_kernels
from treadle_kernels.ops.support import compile_ahead


def main() -> int:
    ints = {"weight_ptr": "*i32", "zeros_ptr": "*u8", "g_idx_ptr": "*i32"}
    configs = {w4a16_linear.choose_config(rows, 4096, 4096, 128, sms=132) for rows in (1, 64, 256, 1024)}
    for i, cfg in enumerate(sorted(configs)):
        for expand in (0, 1):
            for per_row, g_idx, zeros in ((False, False, True), (True, True, True), (True, False, False)):
                for dtype in ("*bf16", "*fp16") if i == 0 and expand else ("*bf16",):
                    constexprs = {
                        "HAS_ZEROS": zeros, "PER_ROW": per_row, "G_IDX": g_idx, "HAS_BIAS": True,
                        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                        "PARTIALS": cfg.split_k > 1, "GROUP_M": cfg.group_m, "EXPAND": expand, "UPCAST": False,
                    }  # fmt: skip
                    out = "*fp32" if cfg.split_k > 1 else dtype
                    pointers = {
                        **ints,
                        "x_ptr": dtype,
                        "scales_ptr": dtype,
                        "bias_ptr": dtype,
                        "out_ptr": out,
                    }
                    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    compile_ahead(
                        w4a16_linear_kernels.w4a16_gemm_kernel, constexprs, pointers, options=options
                    )
    constexprs = {"HAS_BIAS": True, "BLOCK_N": 256}
    compile_ahead(w4a16_linear_kernels.w4a16_reduce_kernel, constexprs, {"part_ptr": "*fp32"})
    print("compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
