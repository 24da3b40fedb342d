"""The oracle: pick the experts implementation and the prepare/finalize for a layer, and say why.

Rules, in order (each decision is recorded as a reason and shows in `describe()` and `report()`):
1. A forced backend (argument, else env TREADLE_MOE_BACKEND) wins if that implementation supports the case;
   otherwise it is an error naming the reason and the valid choices.
2. Prepare/finalize: single device, no expert parallelism -> the no-EP implementation of the experts' format.
   The standard format is the default; the batched one ([E, max_tokens, K] slabs) only pays off with an
   all-to-all that delivers tokens per expert, so it is used only when asked for.
3. Experts: on CUDA with triton installed and a supported dtype (fp16/bf16/fp32) and activation, Triton fused
   MoE; the batch size picks its block config (tuned JSON for the device when present, else the heuristic),
   reported for the layer's max batch. Everything else (CPU, where the interpreter is far too slow; float64;
   no triton) runs the torch reference.
4. fp8 expert weights (`MoEProblem.fp8`, per channel with dynamic or static activations, or block-wise,
   experts/fp8.py) follow rule 3 with the fp8
   GEMMs: on CUDA (compute capability >= 8.9, a block_k the kernel tiles) Triton fused MoE multiplies fp8 on the
   tensor cores, scales in the epilogue (per channel) or per K block (block-wise); elsewhere the torch reference
   runs the spec, the dense IR ops per expert. The reason names the layout (and "static per-tensor activations").
5. 4-bit expert weights (`MoEProblem.int4`, W4A16: GPTQ / AWQ / compressed-tensors checkpoints, experts/int4.py)
   follow rule 3 too: on CUDA Triton fused MoE unpacks the nibbles in registers inside its grouped GEMM (16-bit
   activations, the model-dtype block config with BLOCK_K inside one group); elsewhere the torch reference runs the
   spec, the dense `w4a16_linear` reference per expert. The reason names the layout.
6. Expert biases and the swigluoai activation (gpt-oss, experts/epilogue.py) run in the model dtype only: the torch
   reference and Triton fused MoE (both formats) add the biases and apply the clamped SwiGLU; an fp8 or 4-bit layer
   with either is refused (ValueError) whatever the backend, since neither quantized expert kernel has that epilogue.
7. MXFP4 expert weights (`MoEProblem.mxfp4`, gpt-oss's released experts, experts/mxfp4.py) follow rule 3: on CUDA
   Triton fused MoE decodes the e2m1 nibbles and e8m0 scales in registers inside its grouped GEMM (16-bit
   activations, the biases and swigluoai in its epilogues); elsewhere the torch reference runs the spec, each
   expert dequantized exactly to the activations' dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from treadle_moe import envs
from treadle_moe.configs import get_block_config
from treadle_moe.experts.base import Experts
from treadle_moe.experts.epilogue import quantized_support_reason
from treadle_moe.experts.fp8 import Fp8Layout
from treadle_moe.experts.int4 import Int4Layout
from treadle_moe.experts.mxfp4 import Mxfp4Layout
from treadle_moe.experts.torch_ref import BatchedTorchExperts, TorchExperts
from treadle_moe.experts.triton_fused import BatchedTritonExperts, TritonExperts
from treadle_moe.experts.triton_int4 import int4_config
from treadle_moe.experts.triton_mxfp4 import mxfp4_config
from treadle_moe.modular_kernel import ModularKernel
from treadle_moe.prepare_finalize import (
    ActivationFormat,
    NoEPBatchedPrepareFinalize,
    NoEPStandardPrepareFinalize,
    PrepareFinalize,
)

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[Experts]] = {
    "torch": TorchExperts,
    "triton": TritonExperts,
    "torch_batched": BatchedTorchExperts,
    "triton_batched": BatchedTritonExperts,
}


@dataclass(frozen=True, slots=True)
class MoEProblem:
    """What the oracle needs to know about a layer and where it runs."""

    num_experts: int  # E
    top_k: int
    hidden_size: int  # K
    intermediate_size: int  # N (per expert)
    dtype: torch.dtype  # activation and weight dtype
    device: torch.device  # where the layer runs
    max_num_tokens: int = 8192  # largest batch the layer will see (for the block-config report)
    activation: str = "silu"
    fp8: Fp8Layout | None = None  # float8_e4m3fn expert weights in this scale layout; None: `dtype` weights
    int4: Int4Layout | None = None  # packed 4-bit expert weights in this layout (activations in `dtype`)
    has_bias: bool = False  # gpt-oss's expert biases (w13 [E, 2N], w2 [E, K])
    mxfp4: Mxfp4Layout | None = None  # MXFP4 expert weights (e2m1, e8m0 scales; activations in `dtype`)
    # expert parallelism: the experts the router routes over when the layer holds num_experts of them; block configs
    # are those of that many experts (each held expert sees the load it would on one device)
    routed_experts: int | None = None

    def weights_describe(self) -> str:
        """The expert weights' format, for reasons and the decision log ("" for model-dtype weights)."""
        if self.fp8 is not None:
            return self.fp8.describe()
        if self.mxfp4 is not None:
            return self.mxfp4.describe()
        return self.int4.describe() if self.int4 is not None else ""


@dataclass(slots=True)
class MoEKernelChoice:
    """The oracle's answer: which parts, and the reasons."""

    experts_cls: type[Experts]
    prepare_finalize: PrepareFinalize
    reasons: list[str] = field(default_factory=list)
    routed_experts: int | None = (
        None  # MoEProblem.routed_experts: the Triton experts' block configs follow it
    )

    def build(self, shared_experts: torch.nn.Module | None = None) -> ModularKernel:
        if issubclass(self.experts_cls, (TritonExperts, BatchedTritonExperts)):
            experts: Experts = self.experts_cls(config_experts=self.routed_experts)
        else:
            experts = self.experts_cls()
        return ModularKernel(self.prepare_finalize, experts, shared_experts=shared_experts)

    def describe(self) -> str:
        head = f"moe: experts={self.experts_cls.name}, prepare_finalize={self.prepare_finalize.name}"
        return head + "".join(f"\n  - {reason}" for reason in self.reasons)


def select_moe_kernel(problem: MoEProblem, backend: str | None = None) -> MoEKernelChoice:
    """Choose experts + prepare/finalize for `problem`; `backend` (or TREADLE_MOE_BACKEND) forces the experts."""
    reasons: list[str] = []
    device_type = problem.device.type
    quantized = "fp8" if problem.fp8 is not None else "4-bit" if problem.int4 is not None else None
    if quantized is not None and (
        why := quantized_support_reason(quantized, problem.activation, problem.has_bias)
    ):
        raise ValueError(why)
    forced = backend if backend is not None else envs.moe_backend()
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"MoE backend {forced!r} is unknown; valid: {', '.join(BACKENDS)}")
        experts_cls = BACKENDS[forced]
        why_not = experts_cls.support_reason(
            device_type, problem.dtype, problem.activation, problem.fp8, problem.int4
        )
        if why_not is not None:
            raise ValueError(
                f"MoE backend {forced!r} was requested but {why_not}; choose another of {', '.join(BACKENDS)}"
            )
        reasons.append(
            f"experts {experts_cls.name}: requested ({'argument' if backend else 'TREADLE_MOE_BACKEND'})"
        )
    else:
        why_not = TritonExperts.support_reason(
            device_type, problem.dtype, problem.activation, problem.fp8, problem.int4
        )
        if device_type == "cuda" and why_not is None:
            experts_cls = TritonExperts
            fp8 = f", {problem.fp8.describe()} on fp8 tensor cores" if problem.fp8 is not None else ""
            if problem.int4 is not None:
                fp8 = f", {problem.int4.describe()}: 4-bit weights unpacked in registers in the grouped GEMM"
            if problem.mxfp4 is not None:
                fp8 = f", {problem.mxfp4.describe()}: e2m1 weights decoded in registers in the grouped GEMM"
            bias = ", expert biases in the GEMM epilogues" if problem.has_bias else ""
            reasons.append(
                f"experts {experts_cls.name}: cuda, {_dtype_name(problem.dtype)}, {problem.activation}{fp8}{bias}"
            )
        else:
            experts_cls = TorchExperts
            if device_type != "cuda" or why_not is None:
                why_not = f"Triton fused MoE is for cuda (on {device_type} the interpreter is far too slow)"
            if problem.fp8 is not None:
                why_not += f"; {problem.fp8.describe()} runs the spec (the dense IR fp8 ops per expert)"
            if problem.int4 is not None:
                why_not += (
                    f"; {problem.int4.describe()} runs the spec (the dense w4a16_linear reference per expert)"
                )
            if problem.mxfp4 is not None:
                why_not += f"; {problem.mxfp4.describe()} runs the spec (each expert dequantized, its MLP)"
            reasons.append(f"experts {experts_cls.name}: {why_not}")
    if experts_cls.activation_format == ActivationFormat.BATCHED:
        prepare_finalize: PrepareFinalize = NoEPBatchedPrepareFinalize()
        reasons.append(f"prepare_finalize {prepare_finalize.name}: single device, batched experts requested")
    else:
        prepare_finalize = NoEPStandardPrepareFinalize()
        reasons.append(f"prepare_finalize {prepare_finalize.name}: single device, no expert parallelism")
    if experts_cls in (TritonExperts, BatchedTritonExperts) and device_type == "cuda":
        device_name = torch.cuda.get_device_name(problem.device)
        for tokens in sorted({1, min(256, problem.max_num_tokens), problem.max_num_tokens}):
            config, source = get_block_config(
                tokens,
                problem.routed_experts or problem.num_experts,
                problem.intermediate_size,
                problem.hidden_size,
                problem.top_k,
                problem.dtype if problem.fp8 is None else torch.float8_e4m3fn,
                device_name,
                int4=problem.int4 is not None or problem.mxfp4 is not None,
            )
            if problem.mxfp4 is not None:
                experts = problem.routed_experts or problem.num_experts
                config = mxfp4_config(config, tokens, problem.top_k, experts, source=source)
            if problem.int4 is not None:
                config = int4_config(config, problem.int4, problem.hidden_size, problem.intermediate_size)
            reasons.append(
                f"block config at {tokens} tokens: BLOCK_M={config.block_m} BLOCK_N={config.block_n} "
                f"BLOCK_K={config.block_k} warps={config.num_warps} stages={config.num_stages}"
                f"{' swap_ab' if config.swap_ab else ''} ({source})"
            )
    choice = MoEKernelChoice(experts_cls, prepare_finalize, reasons, problem.routed_experts)
    _record(problem, choice)
    return choice


_decisions: dict[str, str] = {}  # problem summary -> describe() of its choice


def _record(problem: MoEProblem, choice: MoEKernelChoice) -> None:
    summary = (
        f"E={problem.num_experts} top_k={problem.top_k} K={problem.hidden_size} N={problem.intermediate_size} "
        f"{_dtype_name(problem.dtype)} on {problem.device}"
    ) + (f" {problem.weights_describe()}" if problem.weights_describe() else "")
    described = choice.describe()
    if _decisions.get(summary) != described:
        _decisions[summary] = described
        logger.info("MoE layer [%s]: %s", summary, described)


def report() -> str:
    """Every distinct MoE decision made in this process, for the dispatch report."""
    if not _decisions:
        return "moe: no MoE layer has run yet"
    return "\n".join(f"[{summary}] {described}" for summary, described in _decisions.items())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
