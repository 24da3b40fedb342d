"""GGUF tensors as HF tensors: dequantize, rename, and undo llama.cpp's q/k row permutation.

Theory: a GGUF file stores each tensor with its dims reversed (ne0 = the contiguous dim first), quantized
in blocks (Q4_1, Q8_0, ...) or plain (F32, F16, BF16). ``gguf.quants.dequantize`` turns the raw blocks into
float32 with numpy shape = reversed GGUF shape, which is already the PyTorch ``[out, in]`` layout.

Names follow llama.cpp (``blk.N.attn_q.weight``); each family's table (gguf_families.py, which also lists the
converter's conventions this module inverts) maps them onto the HF names its checkpoints use
(``model.layers.N.self_attn.q_proj.weight``). Then, per family:

- llama.cpp's converter permutes the rows of the Llama family's q and k projections from HF's rotate-half
  layout (per head: first half of the dims, then second half) to the interleaved pairs its rope kernel expects;
  :func:`unpermute_qk` inverts it per head, using ``head_count`` for q and ``head_count_kv`` for k.
- Gemma's norm weights were stored plus 1 (``norm_offset``): subtracted back.
- Parts of a tensor HF keeps fused (Phi-3 files with separate q, k, v) are held until the layer's last part
  arrives, then stacked on rows.
- Sparse MoE files (Qwen3-MoE, Qwen2-MoE; Mixtral, a ``llama`` file with ``llama.expert_count``) hold per
  layer the router ``ffn_gate_inp`` and the experts stacked as ``ffn_{gate,up,down}_exps`` [experts, out, in];
  they become the per-expert HF names checkpoints use (``mlp.experts.{e}.gate_proj.weight``, Mixtral
  ``block_sparse_moe.experts.{e}.w1.weight``), one tensor per expert.

Invariants: every yielded tensor is contiguous, has the target dtype and its HF name and shape; tensors only
llama.cpp's rope reads (``rope_freqs``, ``rope_factors_*``) are skipped; an unknown tensor name raises
ValueError naming it and the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treadle_model_runner.loader.gguf_families import (
    GGUF_ARCHITECTURES,
    GLOBAL_NAMES,
    MIXTRAL,
    ROPE_TENSORS,
    SUPPORTED_GGUF_ARCHITECTURES,
    GGUFArchitecture,
)

logger = logging.getLogger(__name__)


# stacked expert tensors [experts, out, in] -> index into GGUFArchitecture.expert_projs
_EXPERT_TENSORS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
_EXPERTS_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate_exps|ffn_up_exps|ffn_down_exps)\.weight$")
_ROUTER_RE = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
_MISSING = object()


def open_gguf(path: Path) -> Any:
    """Open a GGUF file for reading; raise ValueError naming the file when it is absent or malformed."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad input
        raise ValueError(f"GGUF file {path} is corrupt, truncated or not a GGUF file ({exc!r})") from exc


def gguf_value(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """One metadata value (str, int, float, bool or list); ``default`` when absent, else ValueError."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file {reader.data.filename} lacks the metadata key {key!r}")
        return default
    return field.contents()


def gguf_architecture(reader: Any) -> str:
    arch = str(gguf_value(reader, "general.architecture"))
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {reader.data.filename} has architecture {arch!r}; treadle converts "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} GGUF files. Use the model's HF safetensors release instead"
        )
    return arch


def gguf_model_kind(reader: Any) -> GGUFArchitecture:
    """The HF model a GGUF file converts to (a "llama" file with experts is Mixtral)."""
    arch = gguf_architecture(reader)
    if arch == "llama" and int(gguf_value(reader, "llama.expert_count", 0) or 0) > 0:
        return MIXTRAL
    return GGUF_ARCHITECTURES[arch]


def hf_tensor_name(gguf_name: str, kind: GGUFArchitecture = GGUF_ARCHITECTURES["llama"]) -> str | None:
    """HF name of a llama.cpp tensor name in a file of family ``kind``; None for tensors only llama.cpp reads."""
    if gguf_name in ROPE_TENSORS:
        return None
    if match := _LAYER_RE.match(gguf_name):
        layer, part, suffix = match.groups()
        if part in kind.layer_names:
            return f"model.layers.{layer}.{kind.layer_names[part]}.{suffix}"
    elif (match := _GLOBAL_RE.match(gguf_name)) and match.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart")


def _fused_target(gguf_name: str, kind: GGUFArchitecture) -> tuple[str, str, tuple[str, ...]] | None:
    """(HF name, this part, all parts in row order) when the tensor is one part of a tensor HF keeps fused."""
    if not kind.fused or not (match := _LAYER_RE.match(gguf_name)):
        return None
    layer, part, suffix = match.groups()
    for hf_suffix, parts in kind.fused.items():
        if part in parts:
            return f"model.layers.{layer}.{hf_suffix}.{suffix}", part, parts
    return None


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a q or k projection (weight [heads*head_dim, ...])."""
    head_dim = weight.shape[0] // num_heads
    assert head_dim * num_heads == weight.shape[0] and head_dim % 2 == 0, (
        f"q/k rows {weight.shape[0]} do not split into {num_heads} heads of an even size"
    )
    rest = tuple(weight.shape[1:])
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()
    )


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """float32 numpy array in PyTorch layout (GGUF dims reversed) for one ReaderTensor."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    array = np.asarray(values, dtype=np.float32).reshape(shape)
    return array if array.flags.writeable else array.copy()  # plain F32 tensors are read-only mmap views


def _dequantize(tensor: Any, path: str) -> torch.Tensor:
    try:
        return torch.from_numpy(dequantize_tensor(tensor))
    except (NotImplementedError, ValueError) as exc:
        raise ValueError(
            f"GGUF file {path}: tensor {tensor.name!r} of type {tensor.tensor_type.name} cannot be "
            f"dequantized ({exc})"
        ) from exc


def count_gguf_tensors(reader: Any) -> int:
    """HF tensors the file yields: one per tensor, one per expert of a stacked expert tensor, one per fused
    group of parts."""
    kind = gguf_model_kind(reader)

    def count(tensor: Any) -> int:
        if _EXPERTS_RE.match(tensor.name):
            return int(tensor.shape[-1])
        fused = _fused_target(tensor.name, kind)
        return int(tensor.name not in ROPE_TENSORS and (fused is None or fused[1] == fused[2][0]))

    return sum(count(t) for t in reader.tensors)


def iterate_gguf_tensors(
    reader: Any, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor of an open GGUF reader, dequantized to ``dtype``."""
    path = reader.data.filename
    arch = gguf_architecture(reader)
    num_heads = int(gguf_value(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(gguf_value(reader, f"{arch}.attention.head_count_kv", num_heads))
    kind = gguf_model_kind(reader)
    permute = kind.permute_qk
    pending: dict[str, dict[str, torch.Tensor]] = {}  # fused HF name -> the parts read so far
    for tensor in reader.tensors:
        if moe := _moe_tensors(tensor, kind, dtype):
            yield from moe
            continue
        if fused := _fused_target(tensor.name, kind):
            target, part, parts = fused
            got = pending.setdefault(target, {})
            got[part] = _dequantize(tensor, path)
            if len(got) == len(parts):
                yield target, torch.cat([got[p] for p in parts]).to(dtype).contiguous()
                del pending[target]
            continue
        try:
            name = hf_tensor_name(tensor.name, kind)
        except ValueError as exc:
            raise ValueError(
                f"GGUF file {path}: {exc}; it may be a different architecture than {arch!r}"
            ) from exc
        if name is None:
            continue
        values = _dequantize(tensor, path)
        if kind.norm_offset and tensor.name.endswith("norm.weight"):
            values = values - kind.norm_offset
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_qk(values, num_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_qk(values, num_kv_heads)
        elif name.endswith("shared_expert_gate.weight"):
            values = values.reshape(1, -1)  # HF's [1, hidden], whether the file has it 1-D or 2-D
        yield name, values.to(dtype).contiguous()
    if pending:
        raise ValueError(
            f"GGUF file {path}: {', '.join(sorted(pending))} lack some of their parts in the file"
        )


def _moe_tensors(tensor: Any, kind: GGUFArchitecture, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """HF tensors of a router or a stacked expert tensor ([experts, out, in] -> one per expert); [] otherwise."""
    if match := _ROUTER_RE.match(tensor.name):
        name = f"model.layers.{match.group(1)}.{kind.moe_block}.gate.weight"
        return [(name, torch.from_numpy(dequantize_tensor(tensor)).to(dtype).contiguous())]
    if not (match := _EXPERTS_RE.match(tensor.name)):
        return []
    layer, proj = match.group(1), kind.expert_projs[_EXPERT_TENSORS[match.group(2)]]
    stacked = torch.from_numpy(dequantize_tensor(tensor)).to(dtype)
    prefix = f"model.layers.{layer}.{kind.moe_block}.experts"
    return [(f"{prefix}.{e}.{proj}.weight", stacked[e].contiguous()) for e in range(stacked.shape[0])]


def iterate_gguf_weights(
    path: Path, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor of the GGUF file at ``path``."""
    yield from iterate_gguf_tensors(open_gguf(Path(path)), dtype=dtype)
