"""Experts implementations: the contract, the torch reference (the spec) and Triton fused MoE; fp8, 4-bit and MXFP4
weights."""

from __future__ import annotations

from treadle_moe.experts.base import Experts, WorkspaceShapes
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout
from treadle_moe.experts.int4 import Int4ExpertScales, Int4Layout
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, Mxfp4Layout
from treadle_moe.experts.torch_ref import BatchedTorchExperts, TorchExperts
from treadle_moe.experts.triton_fused import BatchedTritonExperts, TritonExperts

__all__ = [
    "BatchedTorchExperts",
    "BatchedTritonExperts",
    "ExpertEpilogue",
    "Experts",
    "Fp8ExpertScales",
    "Fp8Layout",
    "Int4ExpertScales",
    "Int4Layout",
    "Mxfp4ExpertScales",
    "Mxfp4Layout",
    "TorchExperts",
    "TritonExperts",
    "WorkspaceShapes",
]
