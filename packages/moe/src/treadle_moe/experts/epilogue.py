"""What an expert's GEMM epilogues add to the plain gated MLP: gpt-oss's biases and its activation's constants.

Per token and selected expert e (HF `GptOssExperts`):

    y_e = act(x @ w13[e].T + w13_bias[e]) @ w2[e].T + w2_bias[e]          out = sum_e topk_weight_e * y_e

so the w13 bias is added before the activation (gate's half, then up's: the rows of w13) and the w2 bias before
the routing weight multiplies (the down bias is weighted too). `w2_bias` None adds none: a tensor-parallel rank
whose partial output another rank's bias already completes (the ranks' outputs are summed). `swiglu_alpha` and
`swiglu_limit` parametrize the "swigluoai" activation (activation.py); other activations ignore them.
Model-dtype and MXFP4 expert weights (experts/mxfp4.py, gpt-oss's own format) run an epilogue; the fp8 and 4-bit
expert kernels have no bias or swigluoai (`quantized_support_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treadle_moe.activation import SWIGLU_ALPHA, SWIGLU_LIMIT

__all__ = ["ExpertEpilogue", "check_epilogue", "quantized_kind", "quantized_support_reason"]


@dataclass(frozen=True, slots=True)
class ExpertEpilogue:
    """Biases and activation constants of one layer's experts (all optional)."""

    w13_bias: torch.Tensor | None = None  # [E, 2N]: gate's bias, then up's; added before the activation
    w2_bias: torch.Tensor | None = None  # [E, K]: added before the routing weight; None on TP ranks but one
    swiglu_alpha: float = SWIGLU_ALPHA  # swigluoai: the sigmoid's slope
    swiglu_limit: float = SWIGLU_LIMIT  # swigluoai: the clamp of gate (above) and up (both sides)

    @property
    def has_bias(self) -> bool:
        return self.w13_bias is not None or self.w2_bias is not None


def check_epilogue(
    epilogue: ExpertEpilogue | None, activation: str, quantized: str | None, num_experts: int, n: int, k: int
) -> None:
    """Biases of [E, 2N] / [E, K] for weights w13 [E, 2N, K] / w2 [E, K, N]; with swigluoai, model-dtype weights
    only (`quantized`: "fp8" / "4-bit" for quantized ones, `quantized_kind`)."""
    has_bias = epilogue is not None and epilogue.has_bias
    if (
        quantized is not None
        and (why := quantized_support_reason(quantized, activation, has_bias)) is not None
    ):
        raise ValueError(why)
    if epilogue is None:
        return
    for name, bias, shape in (("w13_bias", epilogue.w13_bias, (num_experts, 2 * n)),
                              ("w2_bias", epilogue.w2_bias, (num_experts, k))):  # fmt: skip
        if bias is not None and tuple(bias.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(bias.shape)}, expected {shape} for expert weights with E={num_experts}, "
                f"N={n}, K={k}"
            )


def quantized_kind(fp8: object | None, int4: object | None) -> str | None:
    """The quantized weights' kind ("fp8", "4-bit") their scales say; None for model-dtype weights."""
    return "fp8" if fp8 is not None else "4-bit" if int4 is not None else None


def quantized_support_reason(weights: str, activation: str, has_bias: bool) -> str | None:
    """Why quantized experts (`weights`: "fp8" or "4-bit") cannot run this layer, or None."""
    missing = [what for what, needed in (("expert biases", has_bias), ("the swigluoai activation",
                                         activation == "swigluoai")) if needed]  # fmt: skip
    if not missing:
        return None
    return (
        f"{weights} experts do not support {' or '.join(missing)} (gpt-oss): their kernels have no bias or clamped "
        "SwiGLU epilogue; run the experts in the model dtype (quantization=None) or in MXFP4 (gpt-oss's released "
        "checkpoints, quantization mxfp4)"
    )
