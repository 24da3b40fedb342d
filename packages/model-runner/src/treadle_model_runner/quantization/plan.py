"""How a model's projections get quantized, decided once before anything loads: `resolve_quantization`.

Three cases, from `ModelConfig.quantization` (the user's) and config.json's `quantization_config` (the checkpoint's):
- neither: no quantization (None);
- the user's only: online quantization at load (online.py);
- the checkpoint's (whatever the user passed, as long as it is None or the same method): the fp8 bytes and scales
  of the files load as they are (checkpoint.py), with the layout `parse_quantization_config` read from config.json.
  Dummy weights with such a config.json are filled in the model dtype and quantized online (logged): random
  weights have no file scales to reproduce. Per channel, except for a block-wise checkpoint (weight_block_size,
  block_structure): block-wise with its block size (`dummy_blocks`), so the model runs the checkpoint's GEMM.
  A 4-bit checkpoint (AWQ, GPTQ, compressed-tensors W4A16) loads in treadle's 4-bit layout (int4_checkpoint.py),
  with dummy weights too (random codes and scales); a MoE model's routed experts in the stacked 4-bit expert layout
  (int4_experts.py; the router stays in the model dtype).
  An MXFP4 checkpoint (quant_method mxfp4: gpt-oss's released experts) is the exception: the model dequantizes its
  experts to the model dtype as they load (mxfp4.py, models/gpt_oss_weights.py), or keeps them 4-bit on CUDA when
  they would not fit in half the GPU's memory or TREADLE_MXFP4_DEQUANTIZE=0 asks (mxfp4_experts.py: dummy weights are
  then random experts quantized at load), so the plan is None (logged).
Mixture-of-experts models (Qwen3-MoE, Mixtral, Qwen2-MoE) quantize their routed experts too (experts.py): online
per channel; a block-wise fp8 checkpoint (Qwen3-30B-A3B-FP8 style: quant_method fp8, weight_block_size) or one with
per-channel / per-tensor weight scales, with dynamic or static (per-tensor input_scale, Mixtral-8x7B-Instruct-FP8
style) activations, loads as it is (the router stays in the model dtype).
Refused with a ValueError: a user method other than the checkpoint's (naming both), a checkpoint layout treadle
cannot load (scheme.py, int4_scheme.py), and expert layouts the fused-MoE kernels cannot run (experts.py,
int4_experts.py: each names the field).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme, check_int4_request
from treadle_model_runner.quantization.mxfp4 import MXFP4_METHOD, is_mxfp4_config
from treadle_model_runner.quantization.scheme import (
    CheckpointScheme,
    Fp8CheckpointScheme,
    parse_quantization_config,
    quantization_config_of,
)

logger = logging.getLogger(__name__)

__all__ = ["QuantizationPlan", "resolve_quantization"]


@dataclass(frozen=True)
class QuantizationPlan:
    # "fp8": projections run ops.fp8_linear (ops.fp8_block_linear) on float8_e4m3fn weights; "w4a16":
    # ops.w4a16_linear on 4-bit weights
    method: str
    checkpoint: CheckpointScheme | None  # the checkpoint's layout, loaded as is; None = quantize at load
    # online only: dummy weights for this block-wise checkpoint's config.json, quantized with its block size
    dummy_blocks: Fp8CheckpointScheme | None = None

    @property
    def is_online(self) -> bool:
        return self.checkpoint is None

    def describe(self) -> str:
        if self.checkpoint is not None:
            return self.checkpoint.describe()
        if self.dummy_blocks is not None and self.dummy_blocks.weight_block is not None:
            block_n, block_k = self.dummy_blocks.weight_block
            return f"{self.method} (dummy weights, {block_n}x{block_k} block scales)"
        return self.method

    def cpu_warning(self) -> str:
        """What running these projections on the CPU costs (logged once at load)."""
        if self.method == "w4a16":
            return ("4-bit projections on the CPU dequantize their weights at every call (a slice at a time): "
                    "correct, but slower than the unquantized model; 4-bit checkpoints are for GPUs")  # fmt: skip
        return ("fp8 projections on the CPU run the reference path (the fp8 values widened for every matmul): "
                "correct, but many times slower than the unquantized model; fp8 is for GPUs")  # fmt: skip


def resolve_quantization(
    requested: str | None, hf_config: Any, model_cls: type, config_file: Path, load_format: str
) -> QuantizationPlan | None:
    """The plan for `requested` (ModelConfig.quantization) and the checkpoint at `config_file` (read into
    `hf_config`), for `model_cls`; None when nothing is quantized."""
    try:
        raw = quantization_config_of(hf_config)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    if raw is None:
        if requested is None:
            return None
        if requested != "fp8":
            raise ValueError(
                f"quantization {requested!r} names a checkpoint format, but {config_file} has no "
                "quantization_config; pass fp8 to quantize this model's weights at load"
            )
        return QuantizationPlan(requested, None)
    if is_mxfp4_config(raw):
        _check_mxfp4(requested, model_cls, config_file, load_format)
        return None
    scheme = parse_quantization_config(raw, config_file)
    if isinstance(scheme, Int4CheckpointScheme):  # dummy weights too: random 4-bit codes (int4_checkpoint.py)
        check_int4_request(requested, scheme, model_cls, config_file)
        return QuantizationPlan("w4a16", scheme)
    if requested not in (None, "fp8", scheme.quant_method):
        raise ValueError(
            f"quantization {requested!r} was requested, but {config_file} describes an fp8 checkpoint "
            f"(quant_method {scheme.quant_method!r}); leave --quantization unset (or pass fp8) to load it as it is"
        )
    if load_format == "dummy":
        blocks = scheme if scheme.weight_block is not None else None
        logger.info(
            "load_format dummy with %s's %s: random weights are quantized online (%s); the checkpoint's scales "
            "are not reproduced, its ignore list is not applied", config_file, scheme.describe(),
            "the same block layout" if blocks else "per-channel weight scales, dynamic per-token activations",
        )  # fmt: skip
        return QuantizationPlan("fp8", None, blocks)
    return QuantizationPlan("fp8", scheme)


def _check_mxfp4(requested: str | None, model_cls: type, config_file: Path, load_format: str) -> None:
    """MXFP4 experts (gpt-oss's released checkpoints): the model itself keeps them 4-bit on CUDA or dequantizes them
    (mxfp4_experts.py), so there is no plan. Refused for a model class that does not read them, or with another
    requested method."""
    if not getattr(model_cls, "loads_mxfp4", False):
        raise ValueError(
            f"{config_file}: quantization_config.quant_method is 'mxfp4' (gpt-oss's MXFP4 experts), which treadle "
            f"reads for GptOssForCausalLM only, not {model_cls.__name__}; serve the model's unquantized checkpoint"
        )
    if requested not in (None, MXFP4_METHOD):
        raise ValueError(
            f"quantization {requested!r} was requested, but {config_file} describes MXFP4 experts (quant_method "
            "'mxfp4'), which treadle loads as they are; leave --quantization unset (or pass mxfp4)"
        )
    what = "random experts" if load_format == "dummy" else "the checkpoint's experts"
    logger.info(
        "%s: MXFP4 experts (quant_method mxfp4): %s dequantized to the model dtype when they fit in half the GPU's "
        "memory so, on the CPU, or with TREADLE_MXFP4_DEQUANTIZE=1; else kept 4-bit on CUDA (Triton MXFP4 fused MoE)",
        config_file, what,
    )  # fmt: skip
