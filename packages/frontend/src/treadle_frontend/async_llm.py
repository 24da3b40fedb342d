"""AsyncLLM: the asyncio front of an engine-core client, used by the API server.

`generate()` is an async iterator of RequestOutputs. One background task (the output handler) pulls
EngineCoreOutputs from the client, runs them through the OutputProcessor, and puts each RequestOutput on its
request's queue; stop-string hits are aborted in the engine from there. Leaving the iterator early (break,
cancellation, a disconnected HTTP client) aborts the request in the engine, which frees its KV blocks.

If the engine dies, the handler records the error, every waiting request gets EngineDeadError, and
`is_dead` turns True (the server's /health then answers 503). Stats listeners (metrics, the periodic log
line) see each step's scheduler stats and the frontend's IterationStats.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from treadle_frontend.engine_client import AsyncEngineClient, EngineDeadError, make_engine_request
from treadle_frontend.input_processor import InputProcessor, ModelInfo, PromptType
from treadle_frontend.output_processor import FinishedRequestStats, IterationStats, OutputProcessor
from treadle_frontend.outputs import RequestOutput
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_CHUNK = 128  # engine outputs processed between yields to the event loop

StatsListener = Callable[[Any, IterationStats], None]  # (scheduler stats or None, iteration stats)


class AsyncLLM:
    def __init__(
        self,
        client: AsyncEngineClient,
        input_processor: InputProcessor,
        request_factory: Callable[..., Any] = make_engine_request,
    ) -> None:
        self.client = client
        self.input_processor = input_processor
        self.model: ModelInfo = input_processor.model
        self.tokenizer = input_processor.tokenizer
        self.output_processor = OutputProcessor()
        self.request_factory = request_factory
        self.stats_listeners: list[StatsListener] = []
        self.dead_error: BaseException | None = None
        self._handler: asyncio.Task[None] | None = None
        self._abort_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()

    # ---- state ------------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        if self.dead_error is None and getattr(self.client, "is_dead", False):
            self.dead_error = EngineDeadError("the engine process exited")
        return self.dead_error is not None

    @property
    def num_unfinished(self) -> int:
        return self.output_processor.num_unfinished

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine process is dead ({self.dead_error}); restart the server")

    def _ensure_handler(self) -> None:
        if self._handler is None or self._handler.done():
            self._check_alive()
            self._handler = asyncio.get_running_loop().create_task(
                self._output_handler(), name="treadle-outputs"
            )

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs of one prompt; `prompt_token_ids` skips tokenization when given; `lora_request`:
        the LoRA adapter it runs with (None: the base model)."""
        self._check_alive()
        self._ensure_handler()
        self.input_processor.check_priority(priority)
        request_id = request_id or f"req-{next(self._ids)}"
        if prompt_token_ids is None:
            text, ids = self.input_processor.encode_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_token_ids
            self.input_processor.check_token_ids(ids, "prompt")
        parent, states, engine_reqs = self.input_processor.make_requests(
            request_id, text, ids, params, arrival_time
        )
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        parent.queue = queue
        self.output_processor.add_request(parent, states)
        finished = False
        try:
            now = time.time()
            lora = {"lora_request": lora_request} if lora_request is not None else {}
            for child_id, child_params in engine_reqs:
                await self.client.add_request_async(
                    self.request_factory(
                        child_id, parent.prompt_token_ids, child_params, now, priority, **lora
                    )
                )
            merge = params.output_kind == RequestOutputKind.DELTA and params.n == 1
            while True:
                item = await queue.get()
                while merge and not queue.empty() and isinstance(item, RequestOutput) and not item.finished:
                    nxt = queue.get_nowait()  # the consumer fell behind: hand over one merged delta
                    item = nxt if isinstance(nxt, BaseException) else _merge_delta(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_soon(request_id)

    def _forget(self, request_id: str) -> list[str]:
        """Drops a request its caller left or aborted; returns the engine ids to abort. Its engine requests reach
        the stats listeners as finished with reason abort (vLLM's request_success_total never counts these)."""
        aborted: list[FinishedRequestStats] = []
        ids = self.output_processor.abort_requests([request_id], aborted)
        if aborted:
            stats = IterationStats(finished=aborted)
            for listener in self.stats_listeners:
                listener(None, stats)
        return ids

    def _abort_soon(self, request_id: str) -> None:
        ids = self._forget(request_id)
        if not ids or self.is_dead:
            return
        logger.debug("Aborting request %s (engine ids %s)", request_id, ids)
        try:
            task = asyncio.get_running_loop().create_task(self._abort_engine(ids))
        except RuntimeError:  # no running loop (generator collected after the loop closed)
            return
        self._abort_tasks.add(task)
        task.add_done_callback(self._abort_tasks.discard)

    async def _abort_engine(self, engine_ids: list[str]) -> None:
        try:
            await self.client.abort_requests_async(engine_ids)
        except Exception as e:  # the engine is going away; its death is reported by the handler
            logger.debug("abort of %s failed: %s", engine_ids, e)

    async def abort(self, request_id: str) -> None:
        ids = self._forget(request_id)
        if ids and not self.is_dead:
            await self.client.abort_requests_async(ids)

    async def collect(self, prompt: PromptType, params: SamplingParams, **kwargs: Any) -> RequestOutput:
        """The final RequestOutput of one prompt (params.output_kind is set to FINAL_ONLY)."""
        params.output_kind = RequestOutputKind.FINAL_ONLY
        last: RequestOutput | None = None
        async for out in self.generate(prompt, params, **kwargs):
            last = out
        assert last is not None, "a finished request always yields a final output"
        return last

    async def call_utility(self, method: str, *args: Any) -> Any:
        self._check_alive()
        return await self.client.call_utility_async(method, *args)

    # ---- the output handler -----------------------------------------------------------------------
    async def _output_handler(self) -> None:
        try:
            while True:
                outputs = await self.client.get_output_async()
                engine_outs = list(getattr(outputs, "outputs", None) or [])
                stats = IterationStats()
                for start in range(0, max(len(engine_outs), 1), _CHUNK):
                    processed = self.output_processor.process_outputs(engine_outs[start : start + _CHUNK])
                    if processed.reqs_to_abort:
                        await self.client.abort_requests_async(processed.reqs_to_abort)
                    _merge(stats, processed.stats)
                    if start + _CHUNK < len(engine_outs):
                        await asyncio.sleep(0)
                sched = getattr(outputs, "scheduler_stats", None)
                for listener in self.stats_listeners:
                    listener(sched, stats)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.error(
                "The engine died (%s: %s); failing %d in-flight requests",
                type(e).__name__,
                e,
                self.output_processor.num_unfinished,
            )
            self.dead_error = e
            self.output_processor.fail_all(
                EngineDeadError(f"the engine died while serving this request: {e}")
            )

    def shutdown(self) -> None:
        if self._handler is not None:
            self._handler.cancel()
        try:
            self.client.shutdown()
        except Exception as e:
            logger.debug("engine client shutdown: %s", e)


def _merge_delta(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of a single-completion request as one."""
    ca, cb = a.outputs[0], b.outputs[0]
    cb.text = ca.text + cb.text
    cb.token_ids = ca.token_ids + cb.token_ids
    if ca.logprobs is not None and cb.logprobs is not None:
        cb.logprobs = ca.logprobs + cb.logprobs
    return b


def _merge(into: IterationStats, other: IterationStats) -> None:
    into.num_prompt_tokens += other.num_prompt_tokens
    into.num_generation_tokens += other.num_generation_tokens
    into.time_to_first_tokens.extend(other.time_to_first_tokens)
    into.inter_token_latencies.extend(other.inter_token_latencies)
    into.finished.extend(other.finished)
