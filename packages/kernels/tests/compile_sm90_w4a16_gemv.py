"""Compile the W4A16 GEMV kernel (ops/w4a16_gemv.py) ahead of time for Hopper (sm_90) on a machine without a GPU, at
the production tiles of 1 to 16 rows in each layout (see compile_sm90.py). Run as a script by test_w4a16_gemv.py."""

from __future__ import annotations

import sys

from treadle_kernels.ops import w4a16_gemv
from treadle_kernels.ops.support import compile_ahead


def main() -> int:
    configs = {w4a16_gemv.choose_gemv_config(rows, 4096, 4096, 128, sms=132) for rows in (1, 2, 4, 8, 16)}
    for cfg in sorted(configs):
        for per_row, g_idx, zeros in ((False, False, True), (False, False, False), (True, True, True)):
            constexprs = {
                "HAS_ZEROS": zeros, "PER_ROW": per_row, "G_IDX": g_idx, "HAS_BIAS": True,
                "PARTIALS": cfg.split_k > 1, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            }  # fmt: skip
            pointers = {"weight_ptr": "*i32", "zeros_ptr": "*u8", "g_idx_ptr": "*i32",
                        "out_ptr": "*fp32" if cfg.split_k > 1 else "*bf16"}  # fmt: skip
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            compile_ahead(w4a16_gemv.w4a16_gemv_kernel, constexprs, pointers, options=options)
    print("compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
