"""Compile the 4-bit MoE GEMV kernel (experts/triton_int4_gemv.py) ahead of time for Hopper (sm_90), without a GPU.

Run as a script (a subprocess of test_moe_int4_gemv.py, outside the interpreter mode its session sets): the Triton
front end and ptxas run as on an H100, so a kernel the interpreter accepts but the compiler rejects fails in CI, not
on the device. Every layout (symmetric, zero points, act order, groups smaller than a step) in both GEMMs, at
`gemv_config`'s tiles for Qwen3-30B-A3B (hidden 2048, moe intermediate 768, 128 experts) at one, two and four slots
an expert; pointers, sizes and strides are multiples of 16 as that model's are. Prints each kernel's registers a
thread and stack bytes (cuobjdump, shipped with Triton); a kernel that spills registers to the stack fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton

from treadle_kernels.ops.support import compile_ahead
from treadle_moe.experts import triton_int4_gemv as gv
from treadle_moe.experts.int4 import Int4Layout
from treadle_moe.experts.triton_kernels import ACTIVATION_CODES

K, N, E = 2048, 768, 128
POINTERS = {"a_ptr": "*bf16", "b_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "g_ptr": "*i32", "c_ptr": "*bf16",
            "topk_weights_ptr": "*fp32"}  # fmt: skip
ALIGNED = (*POINTERS, "sorted_token_ids_ptr", "expert_ids_ptr", "N", "K", "stride_am", "stride_be", "stride_se",
           "stride_ge", "stride_cm", "group_size")  # fmt: skip
LAYOUTS = {"sym": Int4Layout(128, False, False), "asym": Int4Layout(128, True, False),
           "act-order": Int4Layout(128, True, True), "g32": Int4Layout(32, True, False)}  # fmt: skip


def resource_usage(kernel: object) -> dict[str, int]:
    """{"REG": registers a thread, "STACK": stack bytes, ...} of a compiled kernel's cubin (cuobjdump -res-usage)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])  # type: ignore[attr-defined]
        cubin.flush()
        out = subprocess.run(
            [tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def main() -> int:
    spilled = []
    for slots in (8, 2 * E, 4 * E):
        for name, layout in LAYOUTS.items():
            for gated, k in ((True, K), (False, N)):
                config = gv.gemv_config(slots, E, k)
                per_row, groups, words = gv._group_tiling(layout, layout.group_size_of(k), k, config.block_k)
                constexprs = {
                    "A_ROWS_PER_TOKEN": 8 if gated else 1, "GATED": gated, "ACTIVATION": ACTIVATION_CODES["silu"],
                    "MUL_ROUTED_WEIGHT": not gated, "HAS_ZEROS": layout.has_zeros, "PER_ROW": per_row,
                    "G_IDX": layout.act_order, "ALIGN_M": 16, "ALIGN_P2": 16, "GROUPS": groups, "WORDS": words,
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                }  # fmt: skip
                kernel = compile_ahead(gv.fused_moe_w4a16_gemv_kernel, constexprs, POINTERS, default_pointer="*i32",
                                       divisible_by_16=ALIGNED,
                                       options={"num_warps": config.num_warps})  # fmt: skip
                usage = resource_usage(kernel)
                tag = f"{name} {'w13' if gated else 'w2'} block_m {config.block_m} block_k {config.block_k}"
                print(f"{tag}: {usage['REG']} registers, {usage['STACK']} stack bytes")
                if usage["STACK"] or usage["LOCAL"]:
                    spilled.append(tag)
    if spilled:
        print("register spills:", ", ".join(spilled))
        return 1
    print("compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
