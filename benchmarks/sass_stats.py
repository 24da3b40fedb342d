"""Static sm_90 facts of the unified attention kernel's decode launch, on a machine without a GPU.

For each variant (cache dtype x key tile x offset width) the kernel is compiled ahead of time for sm_90 with the
pointers and strides marked divisible by 16 (as Triton specialises them on the device for Llama-3.1-8B's
shapes), then its SASS is read with Triton's bundled cuobjdump: instructions in the key loops (the bodies of
the backward branches after the request search: the loop without masks, then the masked one; each runs once per
key tile by every warp), registers, shared memory, the resident
programs an SM fits by registers (64K a SM) and by shared memory (at the 227 KB carveout; the driver may pick a
smaller one: ncu showed 168 KB, i.e. 4 programs, for the bf16 kernel), and the loop's instruction mix. Use the device's Triton to match it (session 9: Triton 3.6 reproduced the 115 / 218 registers
ncu reported), e.g. ``uv pip install --target /tmp/t36 --no-deps triton==3.6.0`` and ``PYTHONPATH=/tmp/t36``.

    python benchmarks/sass_stats.py [--caches bf16,fp8] [--block-n 64,128] [--narrow 0,1] [--warps 4] [--stages 2]
        [--widen 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages/ir/src"), str(ROOT / "packages/kernels/src")]

import triton  # noqa: E402

from treadle_kernels.attention import triton_kernel as attn  # noqa: E402
from treadle_kernels.ops.support import compile_ahead  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
MIX = ("HMMA", "LDGSTS", "LDG", "LDSM", "LDS", "STS", "F2FP", "IMAD", "BAR")
REGS_PER_SM, SMEM_PER_SM = 65536, 227 * 1024


def compile_variant(cache: str, block_n: int, narrow: bool, warps: int = 4, stages: int = 2, widen: int = 1):
    """The decode launch of one Llama-3.1-8B layer (group 4, 16-row tiles, no splits)."""
    constexprs = {
        "G": 4, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16, "BLOCK_Q": 4, "BLOCK_M": 16,
        "BLOCK_N": block_n, "NUM_SPLITS": 1, "CAUSAL": True, "USE_WINDOW": False, "USE_SOFT_CAP": False,
        "DOT_PRECISION": "tf32", "UPCAST": False, "WIDE_OFFSETS": not narrow,
        "FP8_WIDEN": widen if cache == "fp8" else 0,
    }  # fmt: skip
    cache_ptr = "*fp8e4nv" if cache == "fp8" else "*bf16"
    pointers = {n: "*i32" for n in ("block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
    pointers |= {
        "part_m_ptr": "*fp32",
        "part_l_ptr": "*fp32",
        "k_cache_ptr": cache_ptr,
        "v_cache_ptr": cache_ptr,
    }
    names = attn.paged_attention_kernel.arg_names
    divisible = tuple(
        n for n in names if n.endswith("_ptr") or (n.startswith("stride_") and n != "stride_bt")
    )
    return compile_ahead(attn.paged_attention_kernel, constexprs, pointers, ("scale", "soft_cap"),
                         divisible_by_16=divisible, options={"num_warps": warps, "num_stages": stages})  # fmt: skip


def sass_of(kernel) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        sass = subprocess.run(
            [CUOBJDUMP, "--dump-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    return sass, usage


def key_loops(sass: str) -> list[list[str]]:
    """Opcodes of the bodies of the backward branches after the first (the request search): the key loops, the
    one without masks first (the tiles every row sees), then the masked one."""
    lines = [
        (int(a, 16), op)
        for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)
    ]
    loops = []
    for addr, op in lines:
        target = re.search(rf"/\*{addr:04x}\*/[^;]*BRA\s+0x([0-9a-f]+)", sass)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    return [[op for addr, op in lines if lo <= addr <= hi] for lo, hi in loops[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--caches", default="bf16,fp8")
    parser.add_argument("--block-n", default="64,128")
    parser.add_argument("--narrow", default="0,1")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument(
        "--widen", type=int, default=1, help="FP8_WIDEN of the fp8 launches (default as served)"
    )
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90, decode launch of one Llama-3.1-8B layer")
    print(
        "loop: instructions of an unmasked key-loop iteration (masked: of the masked loop); mix: the unmasked loop"
    )
    print(f"{'cache':6} {'keys':>4} {'offsets':8} {'loop':>6} {'masked':>6} {'/64 keys':>8} {'regs':>4} {'smem KB':>7} "
          f"{'fit r/s':>7}  " + " ".join(f"{m:>6}" for m in MIX))  # fmt: skip
    for cache in args.caches.split(","):
        for block_n in map(int, args.block_n.split(",")):
            for narrow in map(int, args.narrow.split(",")):
                kernel = compile_variant(cache, block_n, bool(narrow), args.warps, args.stages, args.widen)
                sass, usage = sass_of(kernel)
                loops = key_loops(sass)
                loop, masked = loops[0], loops[-1]
                mix = collections.Counter(op.split(".")[0] for op in loop)
                regs = int(re.findall(r"REG:(\d+)", usage)[0])
                smem = kernel.metadata.shared + 1024  # + the driver's reserve per block
                threads = 32 * args.warps
                fit_regs = min(REGS_PER_SM // (-(-regs // 8) * 8 * threads), 64 * 32 // threads)
                print(f"{cache:6} {block_n:>4} {'32-bit' if narrow else '64-bit':8} {len(loop):>6} {len(masked):>6} "
                      f"{len(loop) * 64 / block_n:>8.0f} {regs:>4} {smem / 1024:>7.1f} {fit_regs:>3}/{SMEM_PER_SM // smem:<3}  "
                      + " ".join(f"{mix[m]:>6}" for m in MIX))  # fmt: skip


if __name__ == "__main__":
    main()
