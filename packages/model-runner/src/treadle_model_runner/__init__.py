"""treadle-model-runner: a scheduled batch in, sampled tokens out, on one device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadle_model_runner.config import CacheConfig, LoRAConfig, ModelConfig, SpeculativeConfig
from treadle_model_runner.kv_cache_spec import KVCacheConfig, KVCacheGroupSpec
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.outputs import Logprobs, ModelRunnerOutput
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams
from treadle_model_runner.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from treadle_model_runner.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    from treadle_model_runner.runner import ModelRunner

__all__ = [
    "CacheConfig",
    "CachedRequestData",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "LoRAConfig",
    "LoRARequest",
    "Logprobs",
    "ModelConfig",
    "ModelRunner",
    "ModelRunnerOutput",
    "NewRequestData",
    "RequestOutputKind",
    "SamplingParams",
    "SchedulerOutput",
    "SpeculativeConfig",
    "StructuredOutputsParams",
]


def __getattr__(name: str) -> Any:
    # ModelRunner pulls in torch, the kernels and transformers: imported on first use, so the contract types
    # above stay cheap to import for the engine and the frontend.
    if name == "ModelRunner":
        from treadle_model_runner.runner import ModelRunner

        return ModelRunner
    raise AttributeError(f"module 'treadle_model_runner' has no attribute {name!r}")
