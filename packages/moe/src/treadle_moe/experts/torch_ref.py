"""Torch reference experts: a plain loop over experts. This is the semantic spec of every other Experts.

Standard format: group the (token, k) slots by expert with one argsort, then for each expert that received
tokens gather them, run `w2 @ act_and_mul(w13 @ x)` and write the unweighted result to its slots; the output
is [M, top_k, K] and finalize weights and sums (WeightAndReduceDelegate). Batched format: the same MLP on the
first expert_num_tokens[e] rows of every slab. Experts with no token are skipped, and so are slots of expert -1
(expert parallelism: another rank's expert), whose output rows are zero. One host synchronization
per call (the per-expert counts), which is why this is the reference and not the fast path.
fp8 weights (either layout of experts/fp8.py) run `expert_mlp_fp8`: the dense IR ops' reference implementations
applied to each expert's tokens, the spec of the fp8 kernels; 4-bit weights (experts/int4.py) run `expert_mlp_int4`,
the dense `w4a16_linear` reference on each expert's two projections. An `ExpertEpilogue` (gpt-oss, model-dtype
weights only) adds each expert's biases to its two projections (`F.linear`'s bias: the w2 one before finalize
weights the output) and gives swigluoai its constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treadle_moe.activation import ACTIVATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT, act_and_mul
from treadle_moe.experts.base import Experts, WorkspaceShapes, check_weights
from treadle_moe.experts.epilogue import ExpertEpilogue, check_epilogue, quantized_kind
from treadle_moe.experts.fp8 import Fp8ExpertScales, check_fp8_scales, expert_mlp_fp8
from treadle_moe.experts.int4 import Int4ExpertScales, check_int4_experts, expert_mlp_int4
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, check_mxfp4_experts, dequantize_expert
from treadle_moe.prepare_finalize import ActivationFormat
from treadle_moe.topk_weight_and_reduce import TopKWeightAndReduce, WeightAndReduceDelegate

_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def expert_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """One expert: x [T, K], w13 [2N, K], w2 [K, N] (biases b13 [2N], b2 [K]) -> [T, K]
    = w2 @ act_and_mul(w13 @ x + b13) + b2."""
    return F.linear(act_and_mul(F.linear(x, w13, b13), activation, alpha, limit), w2, b2)


def run_expert(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert: int,
    activation: str,
    fp8: Fp8ExpertScales | None,
    int4: Int4ExpertScales | None = None,
    epilogue: ExpertEpilogue | None = None,
    mxfp4: Mxfp4ExpertScales | None = None,
) -> torch.Tensor:
    """Expert `expert` of the stacks w13 / w2 on its tokens x [T, K]: model-dtype, fp8, 4-bit or MXFP4 weights."""
    if int4 is not None:
        return expert_mlp_int4(x, w13, w2, int4, expert, activation)
    if fp8 is not None:
        return expert_mlp_fp8(x, w13[expert], w2[expert], fp8.w13[expert], fp8.w2[expert], fp8.layout, activation,
                              fp8.w13_input, fp8.w2_input)  # fmt: skip
    e = epilogue or ExpertEpilogue()
    b13 = None if e.w13_bias is None else e.w13_bias[expert]
    b2 = None if e.w2_bias is None else e.w2_bias[expert]
    w13_e, w2_e = w13[expert], w2[expert]
    if mxfp4 is not None:
        w13_e, w2_e = dequantize_expert(w13, w2, mxfp4, expert, x.dtype)
    return expert_mlp(x, w13_e, w2_e, activation, b13, b2, e.swiglu_alpha, e.swiglu_limit)


class TorchExperts(Experts):
    """Per-expert loop over the standard format; output [M, top_k, K], unweighted."""

    name = "torch_reference"
    activation_format = ActivationFormat.STANDARD
    supported_dtypes = _DTYPES
    supported_activations = frozenset(ACTIVATIONS)
    supported_device_types = frozenset({"cpu", "cuda"})

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, E: int) -> WorkspaceShapes:
        return WorkspaceShapes(workspace13=(0,), workspace2=(0,), output=(M, top_k, K))

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceDelegate()

    def apply(
        self,
        output: torch.Tensor,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str,
        expert_num_tokens: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        fp8: Fp8ExpertScales | None = None,
        int4: Int4ExpertScales | None = None,
        epilogue: ExpertEpilogue | None = None,
        mxfp4: Mxfp4ExpertScales | None = None,
    ) -> None:
        num_experts, n = check_weights(hidden.shape[1], w13, w2)
        check_fp8_scales(w13, w2, fp8)
        if int4 is not None:
            check_int4_experts(w13, w2, int4)
        if mxfp4 is not None:
            check_mxfp4_experts(w13, w2, mxfp4)
        check_epilogue(epilogue, activation, quantized_kind(fp8, int4), num_experts, n, hidden.shape[1])
        top_k = topk_ids.shape[1]
        slots_out = output.view(-1, hidden.shape[1])  # [M * top_k, K], slot s = token s // top_k
        flat_ids = topk_ids.reshape(-1).long()
        skipped = flat_ids < 0  # another rank's expert: the slot contributes zero
        flat_ids = torch.where(skipped, num_experts, flat_ids)  # sorted after every expert's slots
        order = torch.argsort(flat_ids, stable=True)  # slot indices grouped by expert
        # the one host sync
        counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts].tolist()
        slots_out[skipped] = 0
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start : start + count]
            start += count
            slots_out[slots] = run_expert(
                hidden[slots // top_k], w13, w2, expert, activation, fp8, int4, epilogue, mxfp4
            )


class BatchedTorchExperts(Experts):
    """Per-expert loop over the batched format; output [E, max_tokens, K] (rows past the count untouched)."""

    name = "batched_torch_reference"
    activation_format = ActivationFormat.BATCHED
    supported_dtypes = _DTYPES
    supported_activations = frozenset(ACTIVATIONS)
    supported_device_types = frozenset({"cpu", "cuda"})

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, E: int) -> WorkspaceShapes:
        return WorkspaceShapes(workspace13=(0,), workspace2=(0,), output=(E, M, K))

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceDelegate()

    def apply(
        self,
        output: torch.Tensor,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str,
        expert_num_tokens: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        fp8: Fp8ExpertScales | None = None,
        int4: Int4ExpertScales | None = None,
        epilogue: ExpertEpilogue | None = None,
        mxfp4: Mxfp4ExpertScales | None = None,
    ) -> None:
        assert expert_num_tokens is not None, "batched experts need expert_num_tokens [E]"
        num_experts, n = check_weights(hidden.shape[2], w13, w2)
        check_fp8_scales(w13, w2, fp8)
        if int4 is not None:
            check_int4_experts(w13, w2, int4)
        if mxfp4 is not None:
            check_mxfp4_experts(w13, w2, mxfp4)
        check_epilogue(epilogue, activation, quantized_kind(fp8, int4), num_experts, n, hidden.shape[2])
        for expert, count in enumerate(expert_num_tokens.tolist()):
            if count:
                output[expert, :count] = run_expert(
                    hidden[expert, :count], w13, w2, expert, activation, fp8, int4, epilogue, mxfp4
                )
