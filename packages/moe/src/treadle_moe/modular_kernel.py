"""The modular MoE kernel: prepare/finalize + experts (+ shared experts), glued by the workspace manager.

    prepared = prepare_finalize.prepare(hidden, topk_weights, topk_ids)     # dispatch
    experts.apply(expert_out, prepared.hidden, w13, w2, ..., fp8=scales)    # the expert MLPs
    prepare_finalize.finalize(output, expert_out, prepared, experts.weight_and_reduce())   # combine
    output += shared_experts(hidden)                                          # optional

Any experts implementation composes with any prepare/finalize of the same activation format; the constructor
checks that. Scratch comes from the workspace manager; the returned output is always a fresh tensor. When the
experts reduce themselves (WeightAndReduceNoOp) in the standard format they write straight into the output.
fp8 expert weights (float8_e4m3fn w13 / w2) travel with their scales (`fp8`, experts/fp8.py); the activations and
the output stay in the model dtype; so do they with 4-bit weights (`int4`, experts/int4.py). gpt-oss's expert biases
and swigluoai constants travel as an `ExpertEpilogue` (`epilogue`, experts/epilogue.py; model-dtype and MXFP4 weights
only); MXFP4 blocks (uint8) with their e8m0 scales (`mxfp4`, experts/mxfp4.py).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_moe.experts.base import Experts, check_weights
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.fp8 import Fp8ExpertScales
from treadle_moe.experts.int4 import Int4ExpertScales
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales
from treadle_moe.prepare_finalize import ActivationFormat, PrepareFinalize
from treadle_moe.topk_weight_and_reduce import WeightAndReduceNoOp
from treadle_moe.workspace import WorkspaceManager, default_workspace_manager


class ModularKernel:
    """One MoE forward from routed tokens: dispatch, expert MLPs, combine."""

    def __init__(
        self,
        prepare_finalize: PrepareFinalize,
        experts: Experts,
        shared_experts: nn.Module | None = None,
        workspace: WorkspaceManager | None = None,
    ) -> None:
        if prepare_finalize.activation_format != experts.activation_format:
            raise ValueError(
                f"{prepare_finalize.name} produces the {prepare_finalize.activation_format.value} format but "
                f"{experts.name} consumes {experts.activation_format.value}; pair experts with a "
                "PrepareFinalize of the same activation format"
            )
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.shared_experts = shared_experts
        self.workspace = workspace or default_workspace_manager()

    def __call__(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
        fp8: Fp8ExpertScales | None = None,
        int4: Int4ExpertScales | None = None,
        epilogue: ExpertEpilogue | None = None,
        mxfp4: Mxfp4ExpertScales | None = None,
    ) -> torch.Tensor:
        """hidden [M, K], w13 [E, 2N, K], w2 [E, K, N], topk [M, top_k] -> [M, K]; `fp8`: the scales of
        float8_e4m3fn w13 / w2; `int4`: the scales of packed 4-bit w13 [E, K / 8, 2N] / w2 [E, N / 8, K];
        `epilogue`: biases w13 [E, 2N] / w2 [E, K] and the swigluoai constants; `mxfp4`: the scales of uint8
        MXFP4 blocks w13 [E, 2N, K / 32, 16] / w2 [E, K, N / 32, 16].
        topk_ids of -1 (expert parallelism: another rank's expert) contribute zero (experts/base.py)."""
        num_experts, n = check_weights(hidden.shape[-1], w13, w2)
        num_tokens, top_k = topk_ids.shape
        k = hidden.shape[1]
        output = torch.empty_like(hidden)  # [M, K]
        if num_tokens == 0:
            return output
        prepared = self.prepare_finalize.prepare(hidden, topk_weights, topk_ids, num_experts)
        rows = self.prepare_finalize.max_tokens_per_expert(num_tokens)
        shapes = self.experts.workspace_shapes(rows, n, k, top_k, num_experts)
        reduce = self.experts.weight_and_reduce()
        get = self.workspace.get
        ws13 = get("moe_workspace13", shapes.workspace13, hidden.dtype, hidden.device)
        ws2 = get("moe_workspace2", shapes.workspace2, hidden.dtype, hidden.device)
        writes_output = (
            isinstance(reduce, WeightAndReduceNoOp)
            and self.experts.activation_format == ActivationFormat.STANDARD
            and shapes.output == tuple(output.shape)
        )
        expert_out = (
            output if writes_output else get("moe_expert_output", shapes.output, hidden.dtype, hidden.device)
        )
        self.experts.apply(
            expert_out,
            prepared.hidden,
            w13,
            w2,
            prepared.topk_weights,
            prepared.topk_ids,
            activation=activation,
            expert_num_tokens=prepared.expert_num_tokens,
            workspace13=ws13,
            workspace2=ws2,
            fp8=fp8,
            int4=int4,
            epilogue=epilogue,
            mxfp4=mxfp4,
        )
        self.prepare_finalize.finalize(output, expert_out, prepared, reduce)
        if self.shared_experts is not None:
            output += self.shared_experts(hidden)
        return output

    def describe(self) -> str:
        shared = " + shared experts" if self.shared_experts is not None else ""
        return (
            f"experts={self.experts.describe()}, prepare_finalize={self.prepare_finalize.describe()}{shared}"
        )
