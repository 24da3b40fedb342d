"""gpt-oss's MXFP4 experts kept 4-bit: when, their storage at build, their dummy weights, the load's log line.

A model whose config.json has quantization_config.quant_method "mxfp4" (gpt-oss's released checkpoints, and the
bench configs made from them) keeps its routed experts in MXFP4 (treadle_moe.mxfp4_layer: uint8 e2m1 blocks and e8m0
scales, 4.25 bits a weight) when they are built on CUDA, where the Triton MXFP4 fused-MoE kernel runs them, and either
the user asks for it (TREADLE_MXFP4_DEQUANTIZE=0) or, by default, this rank's experts would take more than half the
GPU's memory in the model dtype (gpt-oss-120b on one GPU). Otherwise, as on the CPU (no such kernel: the torch
reference would dequantize every expert at every call) or with TREADLE_MXFP4_DEQUANTIZE=1, they are dequantized to
the model dtype as they load (mxfp4.py, models/gpt_oss_weights.py): the bf16 fused-MoE kernel is faster than the MXFP4
one as it stands (gpt-oss-20b dummy on an H200: 3.15 against 6.93 ms per token at batch 1, 12,981 against 5,721
output tok/s on 1000 x 1024/1024; benchmarks/results/gpu-session33-h200-8d2ea77/call3).
- `keeps_mxfp4`: that decision, for the device the model is built on;
- `build_mxfp4_experts`: a FusedMoE built on the meta device and given MXFP4 storage on the device (so the model-dtype
  experts never take memory: gpt-oss-120b's would take ~220 GiB), its biases in the model dtype;
- `pair` / `load_pair`: a checkpoint's stacked projection travels from gpt_oss_weights.py to the expert loader as one
  uint8 tensor [E, rows, groups, 17], its blocks' 16 bytes and then the scale byte of each block (one tensor per name,
  as the loader's stream carries), loaded into this rank's experts and columns;
- `fill_dummy_experts`: dummy weights: per expert, random model-dtype matrices (N(0, std^2), a function of (seed,
  layer, expert) only, drawn at the one-rank width and cut to this rank's columns) quantized to MXFP4, one expert at a
  time, so a benchmark runs the 4-bit kernel on realistic bytes;
- `log_experts`: the one INFO line saying which path was taken and what the experts take in memory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from treadle_model_runner import envs
from treadle_model_runner.layers.linear import projections_on_meta
from treadle_model_runner.parallel import get_tp
from treadle_model_runner.quantization.mxfp4 import is_mxfp4_config
from treadle_model_runner.quantization.scheme import quantization_config_of
from treadle_moe import FusedMoE
from treadle_moe.experts.mxfp4 import MXFP4_BLOCK, quantize_mxfp4
from treadle_moe.mxfp4_layer import allocate_mxfp4, expert_bytes, load_mxfp4_projection

logger = logging.getLogger(__name__)

__all__ = [
    "NATIVE_DEVICE_TYPES",
    "build_mxfp4_experts",
    "fill_dummy_experts",
    "keeps_mxfp4",
    "load_pair",
    "log_experts",
    "pair",
]

# where MXFP4 experts stay 4-bit (a kernel runs them); tests add "cpu" to run the torch reference on them
NATIVE_DEVICE_TYPES = frozenset({"cuda"})


def keeps_mxfp4(hf_config: Any, device: torch.device) -> bool:
    """Whether a model of `hf_config` built on `device` keeps MXFP4 experts 4-bit (module docstring)."""
    try:
        raw = quantization_config_of(hf_config)
    except ValueError:
        return False
    if raw is None or not is_mxfp4_config(raw) or device.type not in NATIVE_DEVICE_TYPES:
        return False
    dequantize = envs.TREADLE_MXFP4_DEQUANTIZE()
    if dequantize is not None:
        return not dequantize
    return dequantized_expert_bytes(hf_config) > device_memory(device) // 2


def dequantized_expert_bytes(hf_config: Any) -> int:
    """What this rank's routed experts would take in the model dtype (the default dtype while the model is built):
    every layer's E experts of gate, up and down projections (3 x hidden x intermediate), shared by the ranks
    (tensor parallelism cuts each expert, expert parallelism the experts)."""
    c = hf_config
    per_layer = int(c.num_local_experts) * 3 * int(c.hidden_size) * int(c.intermediate_size)
    weights = int(c.num_hidden_layers) * per_layer
    bytes_per_weight = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    return weights * bytes_per_weight // max(1, get_tp().size)


def device_memory(device: torch.device) -> int:
    """The device's total memory in bytes (a CUDA device's; other devices: unbounded)."""
    if device.type != "cuda":
        return 1 << 62
    return int(torch.cuda.get_device_properties(device).total_memory)


def build_mxfp4_experts(make: Callable[[], FusedMoE], device: torch.device) -> FusedMoE:
    """The FusedMoE `make()` builds, on the meta device, then given MXFP4 storage on `device`."""
    with projections_on_meta(True):
        moe = make()
    allocate_mxfp4(moe, device)
    return moe


def _first_column(moe: FusedMoE) -> int:
    """This rank's first intermediate column (tensor parallelism; 0 for one rank or whole experts)."""
    columns = getattr(moe, "rank_columns", None)
    return int(columns().start) if columns is not None else 0


def pair(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] and scales [..., G] -> one uint8 tensor [..., G, 17] (module docstring)."""
    return torch.cat([blocks, scales.unsqueeze(-1)], dim=-1)


def load_pair(moe: FusedMoE, proj: str, tensor: torch.Tensor, hf_name: str) -> None:
    """A `pair` of every expert's `proj` ("w13": gate rows then up rows; "w2") into `moe`'s MXFP4 storage."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[-1] != MXFP4_BLOCK // 2 + 1:
        raise ValueError(
            f"checkpoint tensor {hf_name!r} ({tensor.dtype} {tuple(tensor.shape)}) is not MXFP4, but the experts are "
            "kept in MXFP4 (config.json's quantization_config is mxfp4): load the released MXFP4 files, or set "
            "TREADLE_MXFP4_DEQUANTIZE=1 to run the experts in the model dtype"
        )
    blocks, scales = tensor[..., : MXFP4_BLOCK // 2], tensor[..., MXFP4_BLOCK // 2]
    load_mxfp4_projection(moe, proj, blocks, scales, _first_column(moe), hf_name)


@torch.no_grad()
def fill_dummy_experts(moe: FusedMoE, name: str, seed: int, std: float) -> None:
    """Random MXFP4 experts (module docstring), drawn in the biases' (the model's) dtype; the biases are left to the
    caller."""
    dtype = moe.w13_bias.dtype if moe.w13_bias is not None else torch.get_default_dtype()
    n_full = int(getattr(moe, "full_intermediate", moe.intermediate_size))
    k, device = moe.hidden_size, moe.w13_weight.device
    first = _first_column(moe)
    for e in moe.placement.local_experts:  # under expert parallelism, this rank's
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}:{e}".encode())) % (1 << 63))
        for proj, shape in (("w13", (2 * n_full, k)), ("w2", (k, n_full))):
            weight = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)
            blocks, scales = quantize_mxfp4(weight)
            load_mxfp4_projection(moe, proj, blocks, scales, first, f"{name}.{e}.{proj} (dummy)", expert=e)


def log_experts(model: nn.Module, how: str) -> None:
    """The INFO line of the experts' path (`how`: what happened to them) and their memory on this rank."""
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not experts:
        return
    held = sum(expert_bytes(m) for m in experts)
    native = experts[0].mxfp4_layout is not None
    path = ("kept 4-bit (Triton MXFP4 fused MoE on CUDA: dequantized they would take over half the GPU's memory, "
            "or TREADLE_MXFP4_DEQUANTIZE=0; =1 dequantizes them)" if native
            else "dequantized to the model dtype (the bf16 fused-MoE kernel, faster than the MXFP4 one; "
            "TREADLE_MXFP4_DEQUANTIZE=0 keeps them 4-bit on CUDA)")  # fmt: skip
    logger.info("gpt-oss MXFP4 experts (%s): %s; %d expert layers take %.2f GiB on this rank", how, path,
                len(experts), held / 2**30)  # fmt: skip
