"""treadle-model-runner: a scheduled batch in, sampled tokens out, on one device."""

from __future__ import annotations

from treadle_model_runner.config import CacheConfig, ModelConfig
from treadle_model_runner.kv_cache_spec import KVCacheConfig, KVCacheGroupSpec
from treadle_model_runner.outputs import Logprobs, ModelRunnerOutput
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams
from treadle_model_runner.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

__all__ = [
    "CacheConfig",
    "CachedRequestData",
    "KVCacheConfig",
    "KVCacheGroupSpec",
    "Logprobs",
    "ModelConfig",
    "ModelRunnerOutput",
    "NewRequestData",
    "RequestOutputKind",
    "SamplingParams",
    "SchedulerOutput",
]
