"""treadle-engine-core: token ids in, token ids out.

The scheduler (token budget, chunked prefill, preemption by recompute), the KV cache manager (block pool,
prefix cache, KV-cache groups), the EngineCore step loop, the engine process over ZMQ and its clients.
"""

from __future__ import annotations

from treadle_engine_core.client import EngineCoreClient, EngineDeadError, InprocClient
from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    SchedulerStats,
)
from treadle_engine_core.mp_client import AsyncMPClient, SyncMPClient
from treadle_engine_core.request import FinishReason

__all__ = [
    "AsyncMPClient",
    "EngineConfig",
    "EngineCore",
    "EngineCoreClient",
    "EngineCoreOutput",
    "EngineCoreOutputs",
    "EngineCoreRequest",
    "EngineDeadError",
    "EngineReady",
    "FakeRunnerConfig",
    "FinishReason",
    "InprocClient",
    "SchedulerConfig",
    "SchedulerStats",
    "SyncMPClient",
]
