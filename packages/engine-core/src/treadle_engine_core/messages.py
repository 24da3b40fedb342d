"""Everything that crosses the engine-process boundary: msgspec structs, msgpack-encoded, never pickle.

Wire protocol (see engine_process.py). Client -> engine over DEALER -> ROUTER, two frames
`[kind, payload]` with kind one of ADD (EngineCoreRequest), ABORT (list of request ids), UTILITY
(UtilityRequest). Engine -> client over PUSH -> PULL, two frames `[kind, payload]` with kind READY
(EngineReady, once), OUTPUTS (EngineCoreOutputs), FAILED (EngineFailure, then the engine exits).
Outputs are diffs: only the tokens new since the last message for that request.
SamplingParams, LoRARequest and Logprobs are dataclasses; msgspec encodes and validates them natively.
"""

from __future__ import annotations

from typing import Any

import msgspec

from treadle_engine_core.request import FinishReason
from treadle_model_runner.lora.change import HostChange
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.outputs import Logprobs
from treadle_model_runner.sampling_params import DEFAULT_MAX_LOGPROBS, SamplingParams

# frame 0 of every message
ADD = b"\x00"
ABORT = b"\x01"
UTILITY = b"\x02"
READY = b"\x10"
OUTPUTS = b"\x11"
FAILED = b"\x12"


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str  # unique among live requests
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # time.time() when the frontend received it
    priority: int = 0  # lower = sooner under the priority policy
    cache_salt: str | None = None  # prefix-cache isolation key
    lora_request: LoRARequest | None = None  # the LoRA adapter it runs with (None: the base model)


class EngineCoreOutput(msgspec.Struct, omit_defaults=True, array_like=True):
    request_id: str
    new_token_ids: list[int]  # tokens produced since the last output of this request
    new_logprobs: list[Logprobs] | None = None  # one per new token, if sampling_params.logprobs was set
    new_prompt_logprobs: list[Logprobs] | None = None  # prompt positions computed this step, if asked
    finish_reason: FinishReason | None = None  # set on the last output of the request
    stop_reason: int | str | None = None  # the stop token id that ended it (None for EOS / length)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the engine rejected or failed it (finish_reason ERROR)
    pooled: list[float] | None = (
        None  # the request's embedding (sampling_params.pooling), with its first token
    )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """Engine state now, plus cumulative counters since start (consumers diff successive values)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks held by requests, [0, 1]
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # tokens found there (cumulative)
    num_preemptions: int = 0  # cumulative
    num_prompt_tokens: int = 0  # prompt tokens of requests that produced their first token (cumulative)
    num_generation_tokens: int = 0  # output tokens produced (cumulative)
    num_finished_reqs: int = 0  # cumulative
    # speculative decoding (cumulative; all 0 without it): verifications of a request's drafts, draft tokens
    # verified, drafts accepted, and per draft position i the verifications that accepted position i
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []


class UtilityRequest(msgspec.Struct, array_like=True):
    call_id: int  # echoed in the UtilityResult
    method: str  # an EngineCore method in EngineCore.UTILITY_METHODS
    args: list[Any] = []


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None  # msgpack-decoded builtins (structs arrive as dicts)
    error: str | None = None  # set instead of result when the call raised


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0  # time.monotonic() of the engine when the step finished
    utility_results: list[UtilityResult] = []
    finished_requests: list[str] = []  # requests that ended this step (also flagged in their outputs)


class EngineReady(msgspec.Struct):
    """The handshake: sent once the model is loaded and the KV cache allocated."""

    pid: int
    num_kv_blocks: int  # usable blocks (the null block excluded)
    block_size: int
    kv_capacity_tokens: int  # tokens the cache holds for one sequence in every group
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    runtime: dict[str, str] = {}  # device, dtypes, attention backend, CUDA graphs, weights (in words)
    scheduling_policy: str = "fcfs"  # fcfs | priority: whether request priorities mean anything
    # most logprobs / prompt_logprobs a request may ask for (ModelConfig.max_logprobs); -1 = the whole vocabulary
    max_logprobs: int = DEFAULT_MAX_LOGPROBS


class EngineFailure(msgspec.Struct):
    message: str  # what went wrong, with the exception type
    traceback: str = ""


# ---- rank 0 <-> tensor-parallel workers (tp_executor.py): the adapter host cache rank 0 decides for every rank -----
class ReadLoRA(msgspec.Struct, tag=True):
    """Read and check this adapter and keep it aside (rank 0 is loading it); the worker answers a LoRAReply."""

    lora_request: LoRARequest


class ApplyLoRA(msgspec.Struct, tag=True):
    """Make the change rank 0 made to its host cache: install what was read, drop what it dropped."""

    change: HostChange


class ListLoRAs(msgspec.Struct, tag=True):
    """Answer the adapter ids in this rank's host memory (a LoRAReply)."""


LoRACall = ReadLoRA | ApplyLoRA | ListLoRAs


class LoRAReply(msgspec.Struct):
    error: str = ""  # ReadLoRA: why this rank could not read the adapter ("" = it could)
    lora_ids: list[int] = []  # ListLoRAs: the adapters in this rank's host memory


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}  # by type, or union of struct types (LoRACall)


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes | memoryview, type_: Any) -> Any:
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    return dec.decode(data)
