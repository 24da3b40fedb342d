"""Triton kernel that asks the GPU's L2 cache to fetch a tensor's bytes (imported lazily: this module imports
triton).

Each program covers LINES_PER_PROGRAM 128-byte lines from ``base_ptr`` and issues one ``prefetch.global.L2`` per
line: a hint with no result, so a program retires as soon as its requests are issued and the bytes arrive while
the kernels after it run. Lines past ``num_lines`` are clamped to the last one (a repeated prefetch is free), so
no instruction needs a mask. Values are never read or written.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def l2_prefetch_kernel(
    base_ptr,
    num_lines,
    LINE_ELEMS: tl.constexpr,  # elements of base_ptr's dtype in 128 bytes
    LINES_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,  # lines a program requests at once (a few per thread)
):
    first = tl.program_id(0).to(tl.int64) * LINES_PER_PROGRAM
    for i in tl.static_range(0, LINES_PER_PROGRAM, BLOCK):
        line = tl.minimum(first + i + tl.arange(0, BLOCK), num_lines - 1)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
            "=r,l",
            [base_ptr + line * LINE_ELEMS],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
