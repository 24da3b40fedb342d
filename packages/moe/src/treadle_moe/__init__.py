"""treadle_moe: the modular fused-MoE layer (router, prepare/finalize, experts, oracle).

`FusedMoE` is what model code uses; the parts are exported for composing other kernels.
"""

from __future__ import annotations

from treadle_moe.experts import (
    BatchedTorchExperts,
    BatchedTritonExperts,
    ExpertEpilogue,
    Experts,
    Fp8ExpertScales,
    Fp8Layout,
    Int4ExpertScales,
    Int4Layout,
    Mxfp4ExpertScales,
    Mxfp4Layout,
    TorchExperts,
    TritonExperts,
    WorkspaceShapes,
)
from treadle_moe.layer import FusedMoE
from treadle_moe.modular_kernel import ModularKernel
from treadle_moe.oracle import MoEKernelChoice, MoEProblem, report, select_moe_kernel
from treadle_moe.placement import ExpertPlacement
from treadle_moe.prepare_finalize import (
    ActivationFormat,
    NoEPBatchedPrepareFinalize,
    NoEPStandardPrepareFinalize,
    PrepareFinalize,
    PrepareResult,
)
from treadle_moe.router import RouterConfig, fused_topk, grouped_topk, select_experts
from treadle_moe.shared_experts import SharedExperts
from treadle_moe.topk_weight_and_reduce import (
    TopKWeightAndReduce,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
)
from treadle_moe.workspace import WorkspaceManager

__all__ = [
    "ActivationFormat",
    "BatchedTorchExperts",
    "BatchedTritonExperts",
    "ExpertEpilogue",
    "ExpertPlacement",
    "Experts",
    "Fp8ExpertScales",
    "Fp8Layout",
    "FusedMoE",
    "Int4ExpertScales",
    "Int4Layout",
    "MoEKernelChoice",
    "MoEProblem",
    "ModularKernel",
    "Mxfp4ExpertScales",
    "Mxfp4Layout",
    "NoEPBatchedPrepareFinalize",
    "NoEPStandardPrepareFinalize",
    "PrepareFinalize",
    "PrepareResult",
    "RouterConfig",
    "SharedExperts",
    "TopKWeightAndReduce",
    "TorchExperts",
    "TritonExperts",
    "WeightAndReduceContiguous",
    "WeightAndReduceDelegate",
    "WeightAndReduceNoOp",
    "WorkspaceManager",
    "WorkspaceShapes",
    "fused_topk",
    "grouped_topk",
    "report",
    "select_experts",
    "select_moe_kernel",
]
