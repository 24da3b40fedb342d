"""Test helpers (no tests here): write an HF model as a 4-bit weight-only checkpoint in the AWQ, GPTQ or
compressed-tensors pack-quantized format, with packing written here from the formats' published layouts (independent
of treadle's code), and the reference: the HF model running the weights the files dequantize to.

`write_int4_checkpoint(hf, path, fmt)` quantizes every decoder projection (not `fmt.ignore`d; never the lm_head) to
unsigned 4-bit codes q in groups of `fmt.group_size` input rows (-1: one group per output column): asymmetric groups
get scale (max - min) / 15 and zero point round(-min / scale), symmetric ones scale amax / 7 and zero point 8, scales
rounded to fp16 (bf16 for compressed-tensors) before the codes are taken. With `fmt.act_order` each input's rows are
grouped in a random order shared by the projections that read that input (as GPTQ's desc_act does, whose order follows
the input's activations): g_idx[perm[i]] = i // group_size. Spellings:
- AWQ: qweight int32 [k, n / 8] and qzeros [groups, n / 8] with nibble i of each word holding column
  8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; scales fp16 [groups, n]; config bits, group_size, zero_point, version "gemm",
  modules_to_not_convert;
- GPTQ: qweight int32 [k / 8, n] (nibble j: row 8i + j), qzeros [groups, n / 8] (nibble j: column 8c + j) holding
  zero - 1 mod 16 in the v1 format (checkpoint_format "gptq"; read back plus one, so a zero point 0 reads as 16) or the
  zero point (gptq_v2); scales fp16; g_idx int32 [k] always; config bits, group_size, desc_act, sym, checkpoint_format,
  dynamic {"-:<regex>": {}} for ignored modules;
- compressed-tensors: weight_packed int32 [n, k / 8] (nibble j of word [c, i]: row 8i + j), weight_scale bf16
  [n, groups], weight_zero_point int32 [n / 8, groups] packed along n (asymmetric), weight_shape, weight_g_idx (act
  order); codes and zero points stored as the signed value plus 8, i.e. the unsigned code; one config group targeting
  "Linear", ignore ["lm_head", *ignored].
Mixture-of-experts models (transformers holds their experts fused, `experts.gate_up_proj` [E, 2N, K] and
`experts.down_proj` [E, K, N]) are written as GPTQ / AWQ MoE checkpoints are (Qwen3-30B-A3B-GPTQ-Int4): each
expert's gate, up and down matrix a projection of its own (`mlp.experts.{e}.gate_proj.qweight` ..., Mixtral
`block_sparse_moe.experts.{e}.w1.qweight`), gate and up sharing one act order; the router (`mlp.gate`) and
Qwen2-MoE's `shared_expert_gate` stay unquantized (no projections), the shared expert's projections are quantized;
an `ignore`d prefix (`model.layers.1.mlp.experts`) leaves those experts fp32, one `.weight` per expert.
`dequantized_reference(hf, weights)` copies the model with each quantized projection's weight replaced by the fp32
dequantization (q - z[g]) * s[g] of what the files hold (as their readers read it).
"""

from __future__ import annotations

import copy
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fp8_checkpoints import PROJECTIONS, write_checkpoint
from torch import nn

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "w1": "gate_up",
    "w3": "gate_up",
}
EXPERT_NAMES = {"MixtralForCausalLM": (("w1", "w3", "w2"), "block_sparse_moe")}


@dataclass(frozen=True)
class Int4Format:
    method: str  # "awq", "gptq" or "compressed-tensors"
    group_size: int = 32  # -1: per output channel
    symmetric: bool = False
    act_order: bool = False
    gptq_v2: bool = False  # GPTQ: zero points stored as they are (else minus one)
    ignore: tuple[str, ...] = ()  # projections (full names) left in fp32
    num_shards: int = 1


FORMATS = {
    "awq": Int4Format("awq", num_shards=2, ignore=("model.layers.1.mlp.down_proj",)),
    "awq-per-channel": Int4Format("awq", group_size=-1),
    "gptq": Int4Format("gptq", symmetric=True),
    "gptq-act-order": Int4Format("gptq", symmetric=True, act_order=True, num_shards=2),
    "gptq-asym-act-order": Int4Format("gptq", act_order=True, ignore=("model.layers.0.self_attn.o_proj",)),
    "gptq-v2": Int4Format("gptq", gptq_v2=True),
    "ct-sym": Int4Format("compressed-tensors", symmetric=True, num_shards=2),
    "ct-asym": Int4Format("compressed-tensors", ignore=("model.layers.0.mlp.down_proj",)),
    "ct-sym-act-order": Int4Format("compressed-tensors", symmetric=True, act_order=True),
}


@dataclass
class Quantized:
    q: torch.Tensor  # [k, n] codes 0..15
    zeros: torch.Tensor  # [groups, n] the zero points the files' readers reconstruct (0..16)
    scales: torch.Tensor  # [groups, n] fp16 / bf16
    g_idx: torch.Tensor  # [k] int32

    def dequantized(self) -> torch.Tensor:
        """fp32 [n, k]: W[c, r] = (q[r, c] - z[g(r), c]) * s[g(r), c]."""
        g = self.g_idx.long()
        return ((self.q - self.zeros[g]).float() * self.scales.float()[g]).t().contiguous()


def _input_order(name: str, k: int) -> torch.Tensor:
    """A permutation of the k input rows, the same for projections that read the same input."""
    prefix, _, leaf = name.rpartition(".")
    gen = torch.Generator().manual_seed(zlib.crc32(f"{prefix}.{_SHARED_INPUT.get(leaf, leaf)}".encode()))
    return torch.randperm(k, generator=gen)


def quantize(name: str, weight: torch.Tensor, fmt: Int4Format) -> Quantized:
    n, k = weight.shape
    size = k if fmt.group_size == -1 else fmt.group_size
    rows = torch.arange(k)
    g_idx = torch.argsort(_input_order(name, k)) // size if fmt.act_order else rows // size
    scale_dtype = torch.bfloat16 if fmt.method == "compressed-tensors" else torch.float16
    wt = weight.detach().float().t()  # [k, n]
    groups = -(-k // size)
    q = torch.empty(k, n, dtype=torch.int64)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    scales = torch.empty(groups, n, dtype=scale_dtype)
    for g in range(groups):
        block = wt[g_idx == g]
        if fmt.symmetric:
            s = (block.abs().amax(dim=0) / 7).clamp_min(1e-6).to(scale_dtype)
            z = torch.full((n,), 8, dtype=torch.int64)
        else:
            low, high = block.amin(dim=0), block.amax(dim=0)
            s = ((high - low) / 15).clamp_min(1e-6).to(scale_dtype)
            z = torch.round(-low / s.float()).clamp(0, 15).to(torch.int64)
        q[g_idx == g] = (torch.round(block / s.float()) + z).clamp(0, 15).to(torch.int64)
        zeros[g], scales[g] = z, s
    if fmt.method == "gptq" and not fmt.gptq_v2 and not fmt.symmetric:
        zeros = (zeros - 1) % 16 + 1  # stored minus one in 4 bits, read back plus one: 0 comes back as 16
    return Quantized(q, zeros, scales, g_idx.to(torch.int32))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[r, c] -> int32 [r / 8, c]; nibble j of word [i, c] is q[8i + j, c]."""
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= q[j::8].to(torch.int64) << (4 * j)
    return _as_int32(words)


def _pack_columns(q: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[r, c] -> int32 [r, c / 8]; nibble i of word [r, m] is q[r, 8m + order[i]]."""
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= q[:, order[i] :: 8].to(torch.int64) << (4 * i)
    return _as_int32(words)


def format_tensors(name: str, quantized: Quantized, fmt: Int4Format) -> dict[str, torch.Tensor]:
    """One projection's tensors as `fmt` spells them."""
    q, zeros, scales = quantized.q, quantized.zeros, quantized.scales
    if fmt.method == "awq":
        return {f"{name}.qweight": _pack_columns(q, AWQ_ORDER), f"{name}.qzeros": _pack_columns(zeros, AWQ_ORDER),
                f"{name}.scales": scales}  # fmt: skip
    if fmt.method == "gptq":
        stored = zeros if fmt.gptq_v2 else (zeros - 1) % 16
        return {f"{name}.qweight": _pack_rows(q), f"{name}.qzeros": _pack_columns(stored),
                f"{name}.scales": scales, f"{name}.g_idx": quantized.g_idx}  # fmt: skip
    n, k = q.shape[1], q.shape[0]
    tensors = {f"{name}.weight_packed": _pack_columns(q.t()), f"{name}.weight_scale": scales.t().contiguous(),
               f"{name}.weight_shape": torch.tensor([n, k])}  # fmt: skip
    if not fmt.symmetric:
        tensors[f"{name}.weight_zero_point"] = _pack_rows(zeros.t()).contiguous()  # packed along n
    if fmt.act_order:
        tensors[f"{name}.weight_g_idx"] = quantized.g_idx
    return tensors


def quantization_config(fmt: Int4Format) -> dict[str, Any]:
    size = fmt.group_size
    if fmt.method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": [n.removeprefix("model.") for n in fmt.ignore] or None}  # fmt: skip
    if fmt.method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": size, "desc_act": fmt.act_order,
                "sym": fmt.symmetric, "checkpoint_format": "gptq_v2" if fmt.gptq_v2 else "gptq", "lm_head": False,
                "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
                "dynamic": {f"-:{re.escape(n)}$": {} for n in fmt.ignore}}  # fmt: skip
    weights = {"num_bits": 4, "type": "int", "symmetric": fmt.symmetric, "dynamic": False, "observer": "minmax",
               "strategy": "channel" if size == -1 else "group", "group_size": None if size == -1 else size,
               "actorder": "group" if fmt.act_order else None}  # fmt: skip
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", *fmt.ignore], "kv_cache_scheme": None,
            "sparsity_config": {}}  # fmt: skip


def quantized_names(hf: nn.Module, fmt: Int4Format) -> list[str]:
    return [n for n, m in hf.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(PROJECTIONS) and n not in fmt.ignore]  # fmt: skip


def write_int4_checkpoint(hf: nn.Module, path: Path, fmt: Int4Format) -> dict[str, torch.Tensor]:
    """Write `hf` quantized as `fmt` to `path`; returns each quantized projection's dequantized fp32 weight [n, k]."""
    modules = dict(hf.named_modules())
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    names = quantized_names(hf, fmt)
    tensors = {n: t.detach().clone().contiguous() for n, t in hf.state_dict().items()
               if not (tied and n == "lm_head.weight") and n.removesuffix(".weight") not in names}  # fmt: skip
    dequantized = {}
    for name, weight in [(n, modules[n].weight) for n in names] + _expert_matrices(hf, tensors):
        if name.startswith(fmt.ignore):  # an ignored expert layer: its matrices stay fp32, one per expert
            tensors[f"{name}.weight"] = weight.detach().clone().contiguous()
            continue
        quantized = quantize(name, weight, fmt)
        tensors.update(format_tensors(name, quantized, fmt))
        dequantized[name] = quantized.dequantized()
    write_checkpoint(hf, path, tensors, quantization_config(fmt), fmt.num_shards)
    return dequantized


def _expert_matrices(hf: nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Pop every fused expert stack from `tensors`; (checkpoint module name, [n, k] matrix) of each expert's gate,
    up and down projection; the router renamed into the checkpoint's block (module docstring)."""
    names, block = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))
    matrices = []
    for fused in [n for n in tensors if n.endswith(".experts.gate_up_proj")]:
        prefix = fused.removesuffix(".gate_up_proj")
        gate_up, down = tensors.pop(fused), tensors.pop(f"{prefix}.down_proj")
        n = down.shape[2]
        out = prefix.replace(".mlp.", f".{block}.")
        for e in range(gate_up.shape[0]):
            for proj, w in zip(names, (gate_up[e, :n], gate_up[e, n:], down[e]), strict=True):
                matrices.append((f"{out}.{e}.{proj}", w))
    for name in [n for n in tensors if n.endswith(".mlp.gate.weight")]:
        tensors[name.replace(".mlp.", f".{block}.")] = tensors.pop(name)
    return matrices


_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)$")


def dequantized_reference(hf: nn.Module, dequantized: dict[str, torch.Tensor]) -> Any:
    """A copy of `hf` whose quantized projections (and experts) hold the weights their files dequantize to."""
    model = copy.deepcopy(hf).eval()
    modules = dict(model.named_modules())
    names, block = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))
    with torch.no_grad():
        for name, weight in dequantized.items():
            match = _EXPERT.match(name)
            if match is None:
                modules[name].weight.copy_(weight)
                continue
            experts = modules[match["prefix"].replace(f".{block}.", ".mlp.")]
            e, which = int(match["expert"]), names.index(match["proj"])
            n = experts.down_proj.shape[2]
            target = (
                experts.down_proj[e] if which == 2 else experts.gate_up_proj[e, which * n : (which + 1) * n]
            )
            target.copy_(weight)
    return model
