"""Block configurations of the Triton fused MoE GEMM: tuned per device in JSON, with a heuristic fallback.

Files are named after the device (`torch.cuda.get_device_name()` with spaces as underscores, e.g.
`NVIDIA_H100_80GB_HBM3.json`) and hold, per problem shape `E=<experts>,N=<intermediate>,K=<hidden>,dtype=<dtype>`,
a table from a token count M to a config. A lookup takes the entry whose M is nearest to the batch's M (in log
space: 96 tokens picks 128 over 64). Missing device, missing shape, or an interpreter run fall back to
`fallback_config`, a Hopper heuristic distilled from the H200 sweep: BLOCK_M grows with the expected tokens per
expert (16 for decode, 128 for big prefills), BLOCK_N 64-128, BLOCK_K 64-128, 4-8 warps, 3 stages. `benchmarks/moe.py --tune` writes new files.
fp8 weights (dtype float8_e4m3fn in the shape key; `benchmarks/moe_fp8.py --tune`) fall back to `fallback_config_fp8`:
BLOCK_K 128 (one activation group of a 128-wide block layout per step, and half the bytes of a bf16 tile), BLOCK_M
at most 64 with 8 warps for big batches, as the fp8 GEMM keeps a partial sum beside each accumulator (first
choices; the H200 sweep of session 29 kept BLOCK_K 128 and BLOCK_M <= 64 at every size, and was within 4 % of them).
4-bit W4A16 experts (key suffix `,weights=int4`; `benchmarks/moe_w4a16.py --tune`) take that table where the device
has one, else their activation dtype's table or fallback; either way BLOCK_K is then capped at the group size
(experts/triton_int4.py `int4_config`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class BlockConfig:
    block_m: int  # slots per program (rows of one expert's block)
    block_n: int  # output columns per program
    block_k: int  # reduction step
    group_m: int = 1  # row blocks swept together (L2 reuse of A)
    num_warps: int = 4
    num_stages: int = 3
    # MXFP4 grouped GEMM only (experts/triton_mxfp4.py): compute C^T = W A^T
    swap_ab: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} ({value}) must be a power of two >= 16 (tl.dot minimum)")

    def to_json(self) -> dict[str, int]:
        data = asdict(self)
        if not self.swap_ab:  # the tables' configs, as they were written before the field
            del data["swap_ab"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, int]) -> BlockConfig:
        swap_ab = bool(data.get("swap_ab", False))
        return cls(**{key: int(value) for key, value in data.items() if key != "swap_ab"}, swap_ab=swap_ab)


INTERPRETER_CONFIG = BlockConfig(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=1)


def shape_key(
    num_experts: int, intermediate: int, hidden: int, dtype: torch.dtype, int4: bool = False
) -> str:
    """The table's key; 4-bit experts (`int4`: W4A16 with `dtype` activations) have tables of their own."""
    key = f"E={num_experts},N={intermediate},K={hidden},dtype={str(dtype).removeprefix('torch.')}"
    return f"{key},weights=int4" if int4 else key


def device_file(device_name: str) -> Path:
    return CONFIG_DIR / f"{device_name.replace(' ', '_').replace('/', '_')}.json"


def fallback_config(num_tokens: int, top_k: int, num_experts: int) -> BlockConfig:
    """Heuristic by expected tokens per expert (num_tokens * top_k / num_experts)."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if per_expert <= 2:
        return BlockConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 8:
        return BlockConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 24:
        return BlockConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 96:
        return BlockConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=3)
    return BlockConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)


def fallback_config_fp8(num_tokens: int, top_k: int, num_experts: int) -> BlockConfig:
    """The fp8 GEMM's heuristic by expected tokens per expert (module docstring)."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if per_expert <= 2:
        return BlockConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 8:
        return BlockConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 24:
        return BlockConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=3)
    if per_expert <= 96:
        return BlockConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=3)
    return BlockConfig(64, 128, 128, group_m=8, num_warps=8, num_stages=3)


@functools.cache
def load_device_configs(device_name: str) -> dict[str, dict[int, BlockConfig]]:
    """shape key -> {M: config} from the device's JSON file (empty when there is none)."""
    path = device_file(device_name)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    tables: dict[str, dict[int, BlockConfig]] = {}
    for key, table in data.get("shapes", {}).items():
        tables[key] = {int(m): BlockConfig.from_json(cfg) for m, cfg in table.items()}
    return tables


def get_block_config(
    num_tokens: int,
    num_experts: int,
    intermediate: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    device_name: str | None,
    int4: bool = False,
) -> tuple[BlockConfig, str]:
    """The config for this batch and where it came from ("tuned <file>" or "fallback ..."). 4-bit experts (`int4`)
    take their own table where the device has one, else the table (or fallback) of their activation dtype."""
    if device_name is not None:
        tables = load_device_configs(device_name)
        for w4 in (True, False) if int4 else (False,):
            table = tables.get(shape_key(num_experts, intermediate, hidden, dtype, int4=w4))
            if table:
                m = min(table, key=lambda entry: abs(math.log2(entry) - math.log2(max(num_tokens, 1))))
                return table[m], f"tuned {device_file(device_name).name} ({'4-bit, ' if w4 else ''}M={m})"
    if dtype == torch.float8_e4m3fn:
        return fallback_config_fp8(num_tokens, top_k, num_experts), "fp8 fallback heuristic"
    return fallback_config(num_tokens, top_k, num_experts), "fallback heuristic"


def has_tuned_config(
    num_experts: int, intermediate: int, hidden: int, dtype: torch.dtype, device_name: str
) -> bool:
    return shape_key(num_experts, intermediate, hidden, dtype) in load_device_configs(device_name)
