"""EngineCore: token ids in, token ids out. One step = schedule -> execute -> update.

The same object runs in-process (offline `LLM`, InprocClient) and inside the engine process
(engine_process.py). It is single-threaded: every method is called from one thread.

With async scheduling the step keeps a queue of at most two steps in flight: it schedules step N+1 and
hands it to the executor before waiting for step N's output, so the host work of scheduling overlaps the
device work of the previous step. Tokens not yet sampled are placeholders in the scheduler (see scheduler.py).
With speculative decoding it schedules ahead only while no step with drafts is in flight and the proposer finds
nothing to draft from the tokens known (`_may_schedule_ahead`): a step with drafts is scheduled on an empty queue.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from typing import Any

from treadle_engine_core.config import EngineConfig
from treadle_engine_core.executor import Executor
from treadle_engine_core.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady, SchedulerStats
from treadle_engine_core.request import Request, RequestStatus, check_vocabulary
from treadle_engine_core.scheduler import Scheduler
from treadle_model_runner.config import SpeculativeConfig
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
from treadle_model_runner.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

_BATCH_QUEUE_DEPTH = 2  # steps in flight under async scheduling


_NO_OUTPUT = ModelRunnerOutput.empty()


def _has_work(so: SchedulerOutput) -> bool:
    """Whether the runner must see this step (tokens to run, or rows to drop)."""
    return bool(so.total_num_scheduled_tokens or so.finished_req_ids or so.preempted_req_ids)


def describe_speculation(spec: SpeculativeConfig | None) -> str:
    """The speculative config in words, for start-up logs ("off" without one)."""
    if spec is None:
        return "off"
    if spec.drafts_in_runner:
        return f"{spec.method} ({spec.model}, num_speculative_tokens={spec.num_speculative_tokens})"
    return (
        f"{spec.method} (num_speculative_tokens={spec.num_speculative_tokens}, "
        f"prompt_lookup_min={spec.prompt_lookup_min}, prompt_lookup_max={spec.prompt_lookup_max})"
    )


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class EngineCore:
    # Methods a client may call by name (utility RPC); anything else is refused.
    UTILITY_METHODS = frozenset(
        {"reset_prefix_cache", "get_stats", "ping", "get_num_unfinished_requests", "add_lora", "remove_lora",
         "list_loras"}
    )  # fmt: skip

    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor = executor if executor is not None else Executor.create(config)
        self.kv_cache_config = self.executor.initialize()
        has_cuda = config.executor != "fake" and _has_cuda()
        spec = config.speculative_config
        self.scheduler_config = config.scheduler_config.resolve(self.executor.max_model_len, has_cuda)
        # the runner may then return before a step's tokens reach the host (the queue below waits for them)
        self.executor.set_async_output(bool(self.scheduler_config.async_scheduling))
        self.scheduler = Scheduler(
            self.scheduler_config,
            self.kv_cache_config,
            enable_prefix_caching=config.cache_config.enable_prefix_caching,
            eos_token_ids=frozenset(self.executor.eos_token_ids),
            log_stats=config.log_stats,
            max_loras=config.max_loras,
            hold_lora=self.executor.hold_lora if config.max_loras else None,
            speculative_config=spec,
        )
        self.max_model_len: int = self.scheduler.max_model_len
        self.max_logprobs: int = config.model_config.max_logprobs  # per request; -1 = the whole vocabulary
        self.lora_generations: dict[int, int] = {}  # adapter id -> in-place reloads so far (block_hash.py)
        self._batch_queue: deque[
            tuple[SchedulerOutput, Future[ModelRunnerOutput | AsyncModelRunnerOutput]]
        ] = deque()
        logger.info(
            "engine core: max_model_len=%d, max_num_seqs=%d, max_num_batched_tokens=%d, policy=%s, "
            "prefix caching=%s, async scheduling=%s, speculative decoding=%s, KV capacity %d tokens",
            self.max_model_len,
            self.scheduler_config.max_num_seqs,
            self.scheduler_config.max_num_batched_tokens,
            self.scheduler_config.policy,
            config.cache_config.enable_prefix_caching,
            self.scheduler_config.async_scheduling,
            describe_speculation(spec),
            self.kv_cache_config.num_tokens,
        )

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; ValueError (HTTP 400) if it can never fit, its id is in flight, a token id is outside
        the vocabulary or it asks for more logprobs than max_logprobs (the client checks these first; an id the
        model would index with must never reach it)."""
        check_vocabulary(request.prompt_token_ids, request.sampling_params, self.executor.vocab_size)
        request.sampling_params.check_logprobs_limit(self.max_logprobs, self.executor.vocab_size)
        structured = request.sampling_params.structured_outputs
        if structured is not None:  # an invalid grammar fails this request only
            self.executor.check_structured_outputs(structured)
        lora = request.lora_request
        if (
            lora is not None and self.config.max_loras
        ):  # a bad adapter fails this request only (cached once loaded)
            self.executor.add_lora(lora)
        self.scheduler.add_request(
            Request(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
                max_model_len=self.max_model_len,
                lora_request=lora,
                lora_generation=self.lora_generations.get(lora.lora_int_id, 0) if lora is not None else 0,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        """End requests now and free everything they hold; unknown ids are ignored."""
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_requests or bool(self._batch_queue)

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        if self.scheduler_config.async_scheduling:
            return self._step_async()
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute(scheduler_output) if _has_work(scheduler_output) else _NO_OUTPUT
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _step_async(self) -> EngineCoreOutputs:
        queue = self._batch_queue
        scheduled = False
        if len(queue) < _BATCH_QUEUE_DEPTH and self.scheduler.has_requests and self._may_schedule_ahead():
            so = self.scheduler.schedule()
            if _has_work(so):
                queue.append((so, self.executor.execute_async(so)))
                scheduled = not so.is_empty
        if not queue or (scheduled and len(queue) < _BATCH_QUEUE_DEPTH):
            return EngineCoreOutputs()  # nothing to wait for yet: let the caller schedule the next step
        so, future = queue.popleft()
        # an AsyncModelRunnerOutput waits here only for this step's sampled-token copy
        return self.scheduler.update_from_output(so, future.result().get_output())

    def _may_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled now, with the queue's steps still in flight. Speculative decoding
        needs a step's tokens before the next: drafts follow the last sampled token, and a verification's accepted
        count moves num_computed_tokens. So not while a step with drafts is in flight, nor when the proposer would
        draft for the tokens known so far (then the queue drains and the next step carries the drafts)."""
        queue = self._batch_queue
        if not queue or self.scheduler.spec is None:
            return True
        if any(so.scheduled_spec_decode_tokens for so, _ in queue):
            return False
        return not self.scheduler.spec.would_draft(self.scheduler.running)

    # ---- utility RPC ------------------------------------------------------------------------------
    def call_utility(self, method: str, args: list[Any]) -> Any:
        if method not in self.UTILITY_METHODS:
            raise ValueError(
                f"unknown utility method {method!r}; valid ones: {', '.join(sorted(self.UTILITY_METHODS))}"
            )
        return getattr(self, method)(*args)

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def ping(self) -> str:
        return "pong"

    def add_lora(self, request: LoRARequest | dict[str, Any], load_inplace: bool = False) -> bool:
        """vLLM's add_lora: load and check an adapter now (ValueError when it cannot run), so requests naming it
        find it loaded. Over the utility RPC the LoRARequest arrives as a dict. `load_inplace`: read the adapter
        with this id again (from the request's path) and serve its new weights from the next step on."""
        if not self.config.max_loras:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        lora = request if isinstance(request, LoRARequest) else LoRARequest(**request)
        added = self.executor.add_lora(lora, load_inplace)
        if load_inplace:  # later requests must not match prefixes the old weights computed
            self.lora_generations[lora.lora_int_id] = self.lora_generations.get(lora.lora_int_id, 0) + 1
        return added

    def remove_lora(self, lora_id: int) -> bool:
        return self.executor.remove_lora(lora_id) if self.config.max_loras else False

    def list_loras(self) -> list[int]:
        return self.executor.list_loras() if self.config.max_loras else []

    def ready_message(self, pid: int) -> EngineReady:
        kv = self.kv_cache_config
        runtime = self.executor.describe()
        if self.config.speculative_config is not None:
            runtime["speculative_decoding"] = describe_speculation(self.config.speculative_config)
        return EngineReady(
            pid=pid,
            num_kv_blocks=kv.num_blocks - 1,
            block_size=kv.block_size,
            kv_capacity_tokens=kv.num_tokens,
            max_model_len=self.max_model_len,
            vocab_size=self.executor.vocab_size,
            eos_token_ids=sorted(self.executor.eos_token_ids),
            runtime=runtime,
            scheduling_policy=self.scheduler_config.policy,
            max_logprobs=self.max_logprobs,
        )

    def shutdown(self) -> None:
        self._batch_queue.clear()
        self.executor.shutdown()
