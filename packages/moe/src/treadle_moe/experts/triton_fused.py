"""Triton fused MoE experts: sort slots by expert, two grouped GEMMs, weighted reduction.

Standard format (`TritonExperts`), for M tokens routed to top_k experts each:
  1. align: slots grouped by expert and padded to BLOCK_M (experts/align.py), no host sync;
  2. w13 grouped GEMM with the gated activation fused in its epilogue -> workspace13 [M * top_k, N];
  3. w2 grouped GEMM scaling each row by its routing weight -> workspace2 [M * top_k, K];
  4. sum over top_k -> output [M, K]. The experts weight and reduce themselves (WeightAndReduceNoOp).
Slots of expert -1 (expert parallelism: another rank's expert) are in no block; when the layer holds only some of
the router's experts (`config_experts` more than the weights') workspace2 is zeroed first so that their rows add
nothing to the sum.
Batched format (`BatchedTritonExperts`): the same two GEMMs over slabs [E, max_tokens, K] with one fixed set of
blocks per slab; the output stays per slab and finalize weights and sums (WeightAndReduceDelegate).

Block sizes come from configs/ (tuned per device) unless a BlockConfig is passed in; under TRITON_INTERPRET=1
(CPU tests) a small config keeps the interpreter fast. The launches are triton_launch.py's (a config too big for the
GPU's shared memory is shrunk at its first launch and remembered). Accumulation is float32; float32 inputs use IEEE
dot products (no TF32), so fp32 results match the torch reference closely.
fp8 weights (float8_e4m3fn w13 / w2 with `Fp8ExpertScales`) take the fp8 GEMMs of triton_fp8.py in both formats:
the activations quantized per token (group), fp8 tensor-core products, scales in the epilogue or per K block.
4-bit weights (packed int32 w13 / w2 with `Int4ExpertScales`) take triton_int4.py's W4A16 GEMMs: the nibbles
unpacked in registers inside the grouped GEMM, 16-bit activations. MXFP4 weights (uint8 blocks with
`Mxfp4ExpertScales`, gpt-oss) take triton_mxfp4.py's GEMMs: e2m1 nibbles and e8m0 scales decoded in registers, the
biases and swigluoai in their epilogues as below.
gpt-oss's `ExpertEpilogue` (model-dtype weights only, experts/epilogue.py): each GEMM adds its expert's bias to the
float32 accumulator in the epilogue (w13: before the activation; w2: before the routing weight), and swigluoai runs
there too with the epilogue's alpha and limit; fp8 and 4-bit weights with either are refused (ValueError).
"""

from __future__ import annotations

import functools

import torch

from treadle_moe import envs
from treadle_moe.activation import check_activation
from treadle_moe.configs import INTERPRETER_CONFIG, BlockConfig, get_block_config
from treadle_moe.experts.align import BlockAlignment, align_batched, align_block_size
from treadle_moe.experts.base import Experts, WorkspaceShapes, check_weights
from treadle_moe.experts.epilogue import ExpertEpilogue, check_epilogue, quantized_kind
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout, check_fp8_scales
from treadle_moe.experts.int4 import Int4ExpertScales, Int4Layout, check_int4_experts
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, check_mxfp4_experts
from treadle_moe.experts.triton_fp8 import fp8_support_reason, run_fp8_gemms
from treadle_moe.experts.triton_int4 import int4_config, run_int4_gemms
from treadle_moe.experts.triton_launch import invoke_moe_gemm
from treadle_moe.experts.triton_mxfp4 import decode_kind, mxfp4_config, run_mxfp4_gemms
from treadle_moe.prepare_finalize import ActivationFormat
from treadle_moe.topk_weight_and_reduce import (
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
)

_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


@functools.cache
def is_triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _TritonBase(Experts):
    supported_dtypes = _DTYPES
    supported_activations = frozenset({"silu", "gelu_tanh", "swigluoai"})
    supported_device_types = frozenset({"cuda"})

    def __init__(self, block_config: BlockConfig | None = None, config_experts: int | None = None) -> None:
        self.block_config = block_config  # None: tuned JSON / fallback per batch
        # expert parallelism: the router's expert count (None: the weights' own). Block configs are looked up for it
        # (tuned table and heuristic: a rank's expert sees the load it would on one device), and when it exceeds the
        # weights' count, slots of other ranks' experts (-1) may come, whose rows the standard format zeroes
        self.config_experts = config_experts

    @classmethod
    def support_reason(
        cls,
        device_type: str,
        dtype: torch.dtype,
        activation: str,
        fp8: Fp8Layout | None = None,
        int4: Int4Layout | None = None,
    ) -> str | None:
        if not is_triton_available():
            return f"{cls.name} needs triton, which is not installed"
        runs_on = device_type
        if device_type == "cpu" and envs.triton_interpret():
            device_type = "cuda"  # the interpreter runs the kernels on CPU tensors
        why = fp8_support_reason(runs_on, fp8) if fp8 is not None and device_type == "cuda" else None
        if why is not None:
            return f"{cls.name}: {why}"
        return super().support_reason(device_type, dtype, activation, fp8, int4)

    def config_for(
        self,
        num_tokens: int,
        w13: torch.Tensor,
        top_k: int,
        int4: Int4ExpertScales | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[BlockConfig, str]:
        """The block config for this batch; 4-bit weights (packed [E, K / 8, 2N]) start from the model dtype's, MXFP4
        ones (uint8 [E, 2N, K / 32, 16]) from the activations' `dtype`'s, weight-only 4-bit tables first."""
        num_experts, two_n, hidden = w13.shape[:3]
        num_experts = self.config_experts or num_experts
        mxfp4 = w13.dtype == torch.uint8
        if mxfp4:
            hidden, dtype = hidden * w13.shape[3] * 2, dtype or torch.bfloat16
        else:
            dtype = w13.dtype
        if int4 is not None:
            two_n, hidden, dtype = w13.shape[2], w13.shape[1] * 8, int4.w13_scale.dtype
        if self.block_config is not None:
            config, source = self.block_config, "given"
        elif w13.device.type != "cuda":
            config, source = INTERPRETER_CONFIG, "interpreter"
        else:
            device_name = torch.cuda.get_device_name(w13.device)
            weight_only = int4 is not None or mxfp4  # weight-only 4-bit tables first
            config, source = get_block_config(
                num_tokens, num_experts, two_n // 2, hidden, top_k, dtype, device_name, int4=weight_only
            )
        if mxfp4:  # measured tiles for few rows per expert; whole scale blocks per K step, a given config too
            decode = decode_kind(dtype, w13.device)
            return mxfp4_config(config, num_tokens, top_k, num_experts, source=source, decode=decode), source
        if int4 is None or source == "given":  # a given config runs as it is (steps may straddle groups)
            return config, source
        return int4_config(config, int4.layout, hidden, two_n // 2), source


class TritonExperts(_TritonBase):
    """Fused MoE over the standard format; weights and reduces itself (output [M, K])."""

    name = "triton_fused"
    activation_format = ActivationFormat.STANDARD

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, E: int) -> WorkspaceShapes:
        return WorkspaceShapes(workspace13=(M * top_k, N), workspace2=(M * top_k, K), output=(M, K))

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceNoOp()

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
        check_activation(activation)
        num_experts, n = check_weights(hidden.shape[1], w13, w2)
        check_fp8_scales(w13, w2, fp8)
        if int4 is not None:
            check_int4_experts(w13, w2, int4)
        if mxfp4 is not None:
            check_mxfp4_experts(w13, w2, mxfp4)
        check_epilogue(epilogue, activation, quantized_kind(fp8, int4), num_experts, n, hidden.shape[1])
        num_tokens, top_k = topk_ids.shape
        config, _ = self.config_for(num_tokens, w13, top_k, int4, hidden.dtype)
        alignment = align_block_size(topk_ids, config.block_m, num_experts)
        intermediate = workspace13.view(num_tokens * top_k, n)
        down = workspace2.view(num_tokens * top_k, hidden.shape[1])
        weights = topk_weights.reshape(-1).float().contiguous()  # [M * top_k] indexed by slot
        if (self.config_experts or num_experts) != num_experts:  # some of the router's experts are elsewhere:
            down.zero_()  # no GEMM writes the rows of slots of expert -1, which the sum below reads
        run_gemms(hidden.contiguous(), w13, w2, intermediate, down, weights, alignment, config, top_k, activation,
                  fp8, int4, epilogue, mxfp4)  # fmt: skip
        torch.sum(down.view(num_tokens, top_k, -1), dim=1, out=output)


class BatchedTritonExperts(_TritonBase):
    """Fused MoE over the batched format; output [E, max_tokens, K] unweighted (finalize reduces)."""

    name = "batched_triton_fused"
    activation_format = ActivationFormat.BATCHED

    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, E: int) -> WorkspaceShapes:
        return WorkspaceShapes(workspace13=(E * M, N), workspace2=(0,), output=(E, M, K))

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
        check_activation(activation)
        num_experts, max_tokens, hidden_size = hidden.shape
        _, n = check_weights(hidden_size, w13, w2)
        check_fp8_scales(w13, w2, fp8)
        if int4 is not None:
            check_int4_experts(w13, w2, int4)
        if mxfp4 is not None:
            check_mxfp4_experts(w13, w2, mxfp4)
        check_epilogue(epilogue, activation, quantized_kind(fp8, int4), num_experts, n, hidden_size)
        # Config by the expected load of one slab: max_tokens rows spread over the experts like top-1 routing.
        config, _ = self.config_for(max_tokens, w13, 1, int4, hidden.dtype)
        alignment = align_batched(expert_num_tokens, max_tokens, config.block_m)
        rows = hidden.contiguous().view(num_experts * max_tokens, hidden_size)
        intermediate = workspace13.view(num_experts * max_tokens, n)
        out_rows = output.view(num_experts * max_tokens, hidden_size)
        run_gemms(rows, w13, w2, intermediate, out_rows, None, alignment, config, 1, activation, fp8, int4, epilogue,
                  mxfp4)  # fmt: skip


def run_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    intermediate: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    rows_per_token: int,
    activation: str,
    fp8: Fp8ExpertScales | None,
    int4: Int4ExpertScales | None = None,
    epilogue: ExpertEpilogue | None = None,
    mxfp4: Mxfp4ExpertScales | None = None,
) -> None:
    """The two grouped GEMMs: hidden [rows, K] -> intermediate [slots, N] (act(gate + b13) * (up + b13')) -> out
    [slots, K] (+ b2, * topk_weights[slot] when given); fp8 weights take triton_fp8.py's path, 4-bit ones
    triton_int4.py's (neither has an epilogue: `check_epilogue` refused it), MXFP4 ones triton_mxfp4.py's."""
    if mxfp4 is not None:
        run_mxfp4_gemms(hidden, w13, w2, mxfp4, intermediate, out, topk_weights, alignment, config, rows_per_token,
                        activation, epilogue)  # fmt: skip
        return
    if int4 is not None:
        run_int4_gemms(hidden, w13, w2, int4, intermediate, out, topk_weights, alignment, config, rows_per_token,
                       activation)  # fmt: skip
        return
    if fp8 is not None:
        run_fp8_gemms(hidden, w13, w2, fp8, intermediate, out, topk_weights, alignment, config, rows_per_token,
                      activation)  # fmt: skip
        return
    e = epilogue or ExpertEpilogue()
    invoke_moe_gemm(hidden, w13, intermediate, None, alignment, config, a_rows_per_token=rows_per_token,
                    gated=True, activation=activation, bias=e.w13_bias,
                    swiglu=(e.swiglu_alpha, e.swiglu_limit))  # fmt: skip
    invoke_moe_gemm(intermediate, w2, out, topk_weights, alignment, config, a_rows_per_token=1, gated=False,
                    bias=e.w2_bias)  # fmt: skip
