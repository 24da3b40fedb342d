"""Engine clients: one interface, whether the EngineCore runs in this process or in its own.

`EngineCoreClient` has a blocking half (offline `LLM`: add_request / abort_requests / get_output /
call_utility) and an asyncio half (API server: the same names with `_async`). `InprocClient` runs the
EngineCore inline: get_output() is one step. `SyncMPClient` and `AsyncMPClient` (mp_client.py) talk to the
engine process over ZMQ and raise `EngineDeadError` once it is gone.
"""

from __future__ import annotations

from typing import Any

from treadle_engine_core.config import EngineConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady, SchedulerStats


class EngineDeadError(RuntimeError):
    """The engine process is gone; every request that was in flight failed with this error."""

    def __init__(self, message: str, request_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.request_ids = request_ids or []  # requests in flight when the engine died


class EngineStartError(RuntimeError):
    """The engine process did not get ready: its error (already logged by the engine, with its traceback unless
    it was a user's error), or `interrupted` when a signal stopped it while it loaded."""

    def __init__(self, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


class EngineCoreClient:
    """The interface both the offline LLM and the API server program against."""

    ready: EngineReady  # capacity and model facts, from the handshake

    @staticmethod
    def make(config: EngineConfig, *, multiprocess: bool, asyncio_mode: bool = False) -> EngineCoreClient:
        from treadle_engine_core.mp_client import AsyncMPClient, SyncMPClient

        if not multiprocess:
            return InprocClient(config)
        return AsyncMPClient(config) if asyncio_mode else SyncMPClient(config)

    @property
    def is_dead(self) -> bool:
        return False

    # blocking half
    def add_request(self, request: EngineCoreRequest) -> None:
        raise NotImplementedError

    def abort_requests(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def get_output(self) -> EngineCoreOutputs:
        raise NotImplementedError

    def call_utility(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    # asyncio half
    async def add_request_async(self, request: EngineCoreRequest) -> None:
        raise NotImplementedError

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    async def get_output_async(self) -> EngineCoreOutputs:
        raise NotImplementedError

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    # typed utilities
    def get_stats(self) -> SchedulerStats:
        return _as_stats(self.call_utility("get_stats"))

    def reset_prefix_cache(self) -> bool:
        return bool(self.call_utility("reset_prefix_cache"))

    async def get_stats_async(self) -> SchedulerStats:
        return _as_stats(await self.call_utility_async("get_stats"))

    async def reset_prefix_cache_async(self) -> bool:
        return bool(await self.call_utility_async("reset_prefix_cache"))

    def shutdown(self) -> None:
        pass


def _as_stats(value: Any) -> SchedulerStats:
    if isinstance(value, SchedulerStats):
        return value
    import msgspec

    return msgspec.convert(value, SchedulerStats)


class InprocClient(EngineCoreClient):
    """EngineCore in this process, no ZMQ: get_output() runs one step (empty outputs when idle)."""

    def __init__(self, config: EngineConfig, engine: EngineCore | None = None) -> None:
        self.engine = engine if engine is not None else EngineCore(config)
        self.ready = self.engine.ready_message(pid=0)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.engine.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine.step() if self.engine.has_work else EngineCoreOutputs()

    def call_utility(self, method: str, *args: Any) -> Any:
        return self.engine.call_utility(method, list(args))

    @property
    def has_unfinished_requests(self) -> bool:
        return self.engine.has_work

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self.add_request(request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.abort_requests(request_ids)

    async def get_output_async(self) -> EngineCoreOutputs:
        return self.get_output()

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        return self.call_utility(method, *args)

    def shutdown(self) -> None:
        self.engine.shutdown()


def __getattr__(name: str) -> Any:
    """`from treadle_engine_core.client import AsyncMPClient` works too (they live in mp_client.py)."""
    if name in ("AsyncMPClient", "SyncMPClient"):
        from treadle_engine_core import mp_client

        return getattr(mp_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
