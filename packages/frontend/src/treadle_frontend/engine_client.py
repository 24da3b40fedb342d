"""What the frontend needs from an engine-core client, and how it builds the engine's request message.

Two clients share one interface (treadle_engine_core): `InprocClient` runs EngineCore in this process (the
offline LLM), `AsyncMPClient` talks over ZMQ to the engine process (the API server). The frontend depends only
on the Protocols below, so tests can drive it with a fake engine that implements the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol

from treadle_engine_core.client import EngineDeadError  # the engine process is gone (HTTP 503)
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams

__all__ = ["AsyncEngineClient", "EngineDeadError", "SyncEngineClient", "make_engine_request"]


class SyncEngineClient(Protocol):
    def add_request(self, request: Any) -> None: ...
    def abort_requests(self, request_ids: list[str]) -> None: ...
    def get_output(self) -> Any: ...  # EngineCoreOutputs (outputs: list[EngineCoreOutput], scheduler_stats)
    def call_utility(self, method: str, *args: Any) -> Any: ...
    def shutdown(self) -> None: ...


class AsyncEngineClient(Protocol):
    async def add_request_async(self, request: Any) -> None: ...
    async def abort_requests_async(self, request_ids: list[str]) -> None: ...
    async def get_output_async(self) -> Any: ...
    async def call_utility_async(self, method: str, *args: Any) -> Any: ...
    def shutdown(self) -> None: ...


def make_engine_request(
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    arrival_time: float,
    priority: int = 0,
    cache_salt: str | None = None,
    lora_request: LoRARequest | None = None,
) -> Any:
    """The engine core's EngineCoreRequest for one (child) request."""
    from treadle_engine_core.messages import EngineCoreRequest

    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=params,
        arrival_time=arrival_time,
        priority=priority,
        cache_salt=cache_salt,
        lora_request=lora_request,
    )
