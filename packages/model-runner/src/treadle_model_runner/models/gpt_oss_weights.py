"""gpt-oss checkpoints' expert tensors, put in treadle_moe's FusedMoE layout before the MoE loader sees them.

Per layer the files hold `model.layers.{i}.mlp.experts.` plus, in transformers' layout (what
`GptOssForCausalLM.save_pretrained` writes; E experts, H hidden, I = intermediate_size):
- `gate_up_proj` [E, H, 2I], used as x @ gate_up_proj[e]: its columns interleave gate and up, gate at the even
  columns 2j and up at the odd ones 2j + 1;  `gate_up_proj_bias` [E, 2I], interleaved the same way;
- `down_proj` [E, I, H] (x @ down_proj[e]);  `down_proj_bias` [E, H].
The released checkpoints (quant_method "mxfp4") hold the two matrices as `gate_up_proj_blocks` [E, 2I, H / 32, 16]
with `gate_up_proj_scales` [E, 2I, H / 32], and `down_proj_blocks` [E, H, I / 32, 16] with `down_proj_scales`: one
row per output feature (the transpose of the above; the gate_up rows interleaved the same way): kept 4-bit when the
experts are (quantization/mxfp4_experts.py: on CUDA), passed on as one `pair` tensor that the expert loader copies
into the MXFP4 storage, else dequantized by quantization/mxfp4.py in the model dtype on the experts' device. The
biases, router, attention and embeddings are plain bf16 tensors in both.
FusedMoE wants w13 [E, 2N, K] with the N gate rows first, then the N up rows, and w2 [E, K, N]; so gate_up is split
into its even and odd columns (rows, for the blocks), stacked gate then up and transposed, the w13 bias split the
same way, and down_proj transposed. The results go on as `experts.gate_up_proj` / `experts.down_proj` (the fused
layout models/expert_loader.py copies whole, this rank's part of it) and the biases under their own names
(GptOssForCausalLM.checkpoint_renames takes them to `w13_bias` / `w2_bias`).
Invariants: a blocks tensor loads only with its scales (whichever comes first waits for the other; a checkpoint that
lacks one is a ValueError naming it); every tensor's shape is checked against config.json, in the files' layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from treadle_model_runner.quantization.mxfp4 import MXFP4_BLOCK, dequantize_mxfp4
from treadle_model_runner.quantization.mxfp4_experts import log_experts, pair
from treadle_moe import FusedMoE
from treadle_moe.mxfp4_layer import expert_bytes

if TYPE_CHECKING:
    from treadle_model_runner.models.gpt_oss import GptOssForCausalLM

__all__ = ["GptOssCheckpoint", "deinterleave"]

logger = logging.getLogger(__name__)

_EXPERTS = re.compile(
    r"^(?P<moe>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<part>_bias|_blocks|_scales)?$"
)


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gate_up's interleaved gate / up entries along `dim` (gate at even indices) -> the gates, then the ups."""
    return torch.cat([t[_every(t, dim, 0)], t[_every(t, dim, 1)]], dim=dim)


def _every(t: torch.Tensor, dim: int, start: int) -> tuple[slice, ...]:
    """An index taking every second entry of `dim` from `start`."""
    return tuple(slice(start, None, 2) if d == dim % t.dim() else slice(None) for d in range(t.dim()))


class GptOssCheckpoint:
    """Rewrites a gpt-oss checkpoint's expert tensors for `model` (`convert`), counting what it dequantized."""

    def __init__(self, model: GptOssForCausalLM) -> None:
        config = model.config
        self.num_experts, self.hidden = int(config.num_local_experts), int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        self.model, self.modules = model, dict(model.named_modules())
        # "<moe>.<proj>" -> "_blocks" / "_scales" -> (name, tensor): the half of a pair that came first
        self.pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        # the MXFP4 matrices read (kept 4-bit or dequantized), and their bytes in the files
        self.num_mxfp4, self.mxfp4_bytes = 0, 0

    def convert(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor, the experts' in FusedMoE's layout (module docstring)."""
        for name, tensor in weights:
            match = _EXPERTS.match(name)
            moe = self.modules.get(match["moe"]) if match else None
            if match is None or not isinstance(moe, FusedMoE):
                yield name, tensor
                continue
            proj, part = match["proj"], match["part"]
            if part == "_bias":
                self._check(name, tensor, (self.num_experts, 2 * self.intermediate if proj == "gate_up_proj"
                                           else self.hidden))  # fmt: skip
                yield name, deinterleave(tensor, 1) if proj == "gate_up_proj" else tensor
            elif part is None:
                yield name, self._from_transformers(name, proj, tensor)
            else:
                halves = self.pending.setdefault(f"{match['moe']}.{proj}", {})
                halves[part] = (name, tensor)
                if len(halves) == 2:
                    del self.pending[f"{match['moe']}.{proj}"]
                    yield f"{match['moe']}.{proj}", self._mxfp4_matrix(proj, halves, moe)
        if self.pending:
            lone = sorted(name for halves in self.pending.values() for name, _ in halves.values())
            raise ValueError(
                f"the checkpoint holds {len(lone)} MXFP4 tensors without their other half ({', '.join(lone[:4])}): "
                "each `<proj>_blocks` loads with its `<proj>_scales`; the download is incomplete"
            )

    def _from_transformers(self, name: str, proj: str, tensor: torch.Tensor) -> torch.Tensor:
        """transformers' gate_up_proj [E, H, 2I] / down_proj [E, I, H] -> w13 [E, 2I, H] / w2 [E, H, I]."""
        e, h, i = self.num_experts, self.hidden, self.intermediate
        if proj == "gate_up_proj":
            self._check(name, tensor, (e, h, 2 * i))
            return deinterleave(tensor, 2).transpose(1, 2)
        self._check(name, tensor, (e, i, h))
        return tensor.transpose(1, 2)

    def _mxfp4_matrix(
        self, proj: str, halves: dict[str, tuple[str, torch.Tensor]], moe: FusedMoE
    ) -> torch.Tensor:
        """An MXFP4 matrix's blocks and scales -> w13 [E, 2I, H] (gate rows, then up rows) / w2 [E, H, I] in the
        model dtype, or their `pair` (gate rows, then up rows) when the experts are kept 4-bit."""
        (blocks_name, blocks), (scales_name, scales) = halves["_blocks"], halves["_scales"]
        e, h, i = self.num_experts, self.hidden, self.intermediate
        rows, cols = (2 * i, h) if proj == "gate_up_proj" else (h, i)
        if cols % MXFP4_BLOCK:
            field = "hidden_size" if proj == "gate_up_proj" else "intermediate_size"
            raise ValueError(
                f"checkpoint tensor {blocks_name!r}: MXFP4 blocks cut each row in {MXFP4_BLOCK}-value blocks, but its "
                f"rows are {cols} wide (config.json's {field})"
            )
        self._check(blocks_name, blocks, (e, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2))
        self._check(scales_name, scales, (e, rows, cols // MXFP4_BLOCK))
        if proj == "gate_up_proj":  # reorder the rows while they are bytes: gates, then ups
            blocks, scales = deinterleave(blocks, 1), deinterleave(scales, 1)
        self.num_mxfp4 += 1
        self.mxfp4_bytes += blocks.numel() + scales.numel()
        if moe.mxfp4_layout is not None:
            return pair(blocks, scales)
        return dequantize_mxfp4(blocks, scales, moe.w13_weight.dtype, moe.w13_weight.device)

    @staticmethod
    def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {shape} "
                "(num_local_experts, hidden_size and intermediate_size of config.json, in the files' layout): the "
                "checkpoint does not match config.json"
            )

    def log_experts(self) -> None:
        """One INFO line when the files held MXFP4 experts: kept 4-bit, or dequantized (on the CPU, or with
        TREADLE_MXFP4_DEQUANTIZE=1) and what that costs in memory against the files."""
        if not self.num_mxfp4:
            return
        experts = [m for m in self.modules.values() if isinstance(m, FusedMoE)]
        if experts[0].mxfp4_layout is not None:
            read = f"{self.num_mxfp4} matrices, {self.mxfp4_bytes / 2**30:.2f} GiB in the files"
            log_experts(self.model, read)
            return
        held = sum(expert_bytes(m) for m in experts)
        dtype = str(experts[0].w13_weight.dtype).removeprefix("torch.")
        logger.info(
            "gpt-oss: dequantized %d MXFP4 expert matrices (%.2f GiB in the files) to %s at load (on the CPU, or "
            "TREADLE_MXFP4_DEQUANTIZE=1; CUDA keeps them 4-bit): the experts take %.2f GiB of memory on this rank",
            self.num_mxfp4, self.mxfp4_bytes / 2**30, dtype, held / 2**30,
        )  # fmt: skip
