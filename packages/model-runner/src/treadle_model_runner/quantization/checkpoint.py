"""Loading an fp8 checkpoint as it is: its float8_e4m3fn bytes and fp32 scales go straight into the projections.

Steps (ModelRunner.load_model), for a plan whose `checkpoint` is an `Fp8CheckpointScheme`:
1. the model is built with its projections on the meta device (`layers.linear.projections_on_meta`), so it never
   holds its model-dtype size (an fp8 checkpoint of a model whose bf16 weights would not fit still loads);
2. `allocate_projections` gives each `Linear` its storage: fp8 weight + scales when the checkpoint holds every HF
   projection it stacks in fp8 (`Fp8CheckpointScheme.quantizes`), the model dtype when it holds none of them (an
   ignored projection); a stacked layer whose shards disagree (an ignore list naming q_proj but not k_proj) is a
   ValueError, as the fused matmul has one weight dtype. Block-wise scales: a layer whose stacking or tensor-parallel
   cuts do not fall on block boundaries (layers/fp8_weights.py) is a ValueError naming config.json's block field;
   the model learns the files' spelling of the weight scales (`weight_scale_inv` for quant_method fp8 with blocks);
   a MoE model's routed experts (FusedMoE layers, also built on the meta device) get fp8 storage in the checkpoint's
   layout, or the model dtype where it leaves them unquantized (quantization/experts.py);
3. `checkpoint_weights` drops the K/V cache scales some checkpoints carry (`k_scale`, `v_scale`, ...; treadle's fp8
   KV cache runs at unit scale), logged once;
4. `CausalLM.load_weights` copies the bytes and scales (models/base.py, `fp8_weights.load_scale`), refusing any fp8
   tensor for a model-dtype parameter and the reverse, so files that disagree with config.json fail by tensor name.
The embedding, the lm_head and the norms are never projections here: they load in the model dtype as always.
A 4-bit checkpoint (an `Int4CheckpointScheme`) takes the same steps through int4_checkpoint.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from treadle_model_runner.layers import fp8_weights
from treadle_model_runner.layers.linear import Linear, StackedLinear
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.quantization import int4_checkpoint
from treadle_model_runner.quantization.blocks import checked_blocks
from treadle_model_runner.quantization.experts import allocate_experts
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme
from treadle_model_runner.quantization.online import weight_bytes
from treadle_model_runner.quantization.scheme import CheckpointScheme
from treadle_moe import FusedMoE

logger = logging.getLogger(__name__)

__all__ = ["allocate_projections", "checkpoint_weights", "log_loaded"]

# tensors of a K/V-cache (or attention-output) quantization that treadle does not apply
KV_CACHE_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".prob_scale", ".kv_scale", ".output_scale")


def hf_projections(model: torch.nn.Module, name: str, layer: Linear) -> list[str]:
    """The HF module names whose weights `layer` (at `name`) holds: each stacked shard's, or its own (also a
    stacked layer the checkpoint holds whole, as Phi-3's qkv_proj)."""
    if not isinstance(layer, StackedLinear):
        return [name]
    prefix, _, stacked = name.rpartition(".")
    stacked_params = getattr(model, "stacked_params", ())
    return [
        f"{prefix}.{hf_part}"
        for target, hf_part, shard in stacked_params
        if target == stacked and shard in layer.shard_sizes  # DeepSeek-V3's fused_qkv_a_proj has no V2 q_proj
    ] or [name]


def allocate_projections(model: CausalLM, scheme: CheckpointScheme, device: torch.device) -> None:
    """Storage for every projection of a model built under `projections_on_meta`, in the dtypes the checkpoint
    holds (step 2 above)."""
    if isinstance(scheme, Int4CheckpointScheme):
        return int4_checkpoint.allocate_projections(model, scheme, device)
    for name, layer, quantized in projections(model, scheme.quantizes, "fp8", "ignore all of them or none"):
        blocks = checked_blocks(layer, name, scheme) if quantized else None
        fp8_weights.allocate(layer, device, quantized, scheme.static_activations, blocks)
    allocate_experts(model, scheme, device)
    model.weight_scale_name = scheme.scale_name


def projections(
    model: torch.nn.Module, quantizes: Callable[[str], bool], kind: str, remedy: str
) -> Iterator[tuple[str, Linear, bool]]:
    """Every projection of `model` with whether the checkpoint holds it quantized (`quantizes` of each HF module
    it stacks); a stacked layer whose modules disagree is a ValueError naming them (`kind`: the format, "fp8" or
    "4-bit"; `remedy`: what config.json should say instead), as the fused matmul has one weight format."""
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        parts = hf_projections(model, name, layer)
        quantized = [quantizes(part) for part in parts]
        if any(quantized) and not all(quantized):
            held = [p for p, q in zip(parts, quantized, strict=True) if q]
            plain = [p for p, q in zip(parts, quantized, strict=True) if not q]
            raise ValueError(
                f"the checkpoint's quantization_config makes {', '.join(held)} {kind} but leaves "
                f"{', '.join(plain)} unquantized; treadle runs them as one fused projection ({name}), which needs "
                f"one weight format: {remedy}"
            )
        yield name, layer, all(quantized)


def checkpoint_weights(
    weights: Iterable[tuple[str, torch.Tensor]], scheme: CheckpointScheme, device: torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors less its K/V cache scales (step 3 above); a 4-bit one's in treadle's layout, repacked
    on `device` (the model's: fast on a GPU)."""
    dropped = 0
    if isinstance(scheme, Int4CheckpointScheme):
        weights = int4_checkpoint.layout_weights(weights, scheme, device)
    for name, tensor in weights:
        if name.endswith(KV_CACHE_SCALE_SUFFIXES):
            dropped += 1
            continue
        yield name, tensor
    if dropped or scheme.has_kv_cache_scales:
        logger.info(
            "fp8 checkpoint: %d K/V cache scale tensors ignored (kv_cache_scheme); the KV cache keeps its dtype "
            "(--kv-cache-dtype fp8 stores K/V at unit scale)", dropped,
        )  # fmt: skip


def log_loaded(model: torch.nn.Module, scheme: CheckpointScheme) -> None:
    if isinstance(scheme, Int4CheckpointScheme):
        return int4_checkpoint.log_loaded(model, scheme)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    fp8 = sum(m.weight_scale is not None for m in layers)
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    fp8_experts = sum(m.fp8_layout is not None for m in experts)
    logger.info(
        "%s: %d projections loaded as float8_e4m3fn, %d kept in the model dtype (ignored); %d of %d expert layers "
        "fp8; embedding, lm_head, router and norms in the model dtype; weights %.1f MiB", scheme.describe(), fp8,
        len(layers) - fp8, fp8_experts, len(experts), weight_bytes(model) / (1 << 20),
    )  # fmt: skip
