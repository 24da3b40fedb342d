"""Streams of engine outputs as the routes serve them: SSE framing, merging the streams of several prompts, and
aborting work when the HTTP client goes away.

A streamed reply starts (HTTP 200, its first bytes) only once the engine's first output has come
(`first_output`): a request the engine refuses before that (a LoRA adapter that fails to load when the request is
admitted, a grammar it rejects) is answered as the same request unstreamed is, an HTTP 400 with the error body.
Failures after the first output stay in the stream, as events.

A client that goes away aborts its request, logged once at INFO with the request and its endpoint: before the first
output by `until_disconnect`; after it, while the reply streams, by `event_stream`'s reply, which Starlette
cancels or drops (closing it closes the outputs, and that aborts the request in the engine), with the output tokens
streamed so far (`OutputStream` counts them). A reply that ends (its requests finished) logs nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from treadle_frontend.outputs import RequestOutput
from treadle_frontend.server.errors import APIError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


def sse_event(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


async def merge_streams(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several prompts' output streams as (prompt index, output); closing aborts them all."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
            await queue.put((i, None))
        except asyncio.CancelledError:
            await gen.aclose()  # type: ignore[attr-defined]
            raise
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_all(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The final output of each stream (FINAL_ONLY streams yield one)."""
    finals: list[RequestOutput | None] = [None] * len(gens)
    async for i, out in merge_streams(gens):
        finals[i] = out
    assert all(f is not None for f in finals), "every stream ends with a final output"
    return [f for f in finals if f is not None]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (which aborts its requests in the engine) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.info("Client disconnected from %s; request aborted", request.url.path)
        raise APIError(499, "client disconnected")
    finally:
        watcher.cancel()


async def first_output(request: Request, outputs: AsyncIterator[T]) -> OutputStream[T]:
    """`outputs` once its first item has come (that item first): the engine's refusal before it raises here,
    before a StreamingResponse exists. This adds no wait to the first token beyond the token itself (it is that
    output); a client that disconnects meanwhile aborts the request (until_disconnect)."""

    async def head() -> tuple[T, ...]:
        async for out in outputs:  # leaving the loop does not close `outputs`
            return (out,)
        return ()

    return OutputStream(await until_disconnect(request, head()), outputs)


class OutputStream(Generic[T]):
    """A streamed reply's engine outputs, the first one (already come) and then the rest, counting the output
    tokens handed on. Items are RequestOutputs, or (prompt index, RequestOutput) pairs (merge_streams), in DELTA
    kind: each carries only its new tokens. Closing it closes the outputs (and so aborts unfinished requests)."""

    def __init__(self, head: tuple[T, ...], rest: AsyncIterator[T]) -> None:
        self.num_tokens = 0  # output tokens handed on so far, over every request and choice
        self.finished = False  # no request is left to abort: the last output came
        self._items = _prepend(head, rest)

    def __aiter__(self) -> OutputStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            item = await self._items.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise
        out: Any = item[1] if isinstance(item, tuple) else item
        if isinstance(out, RequestOutput):
            self.num_tokens += sum(len(c.token_ids) for c in out.outputs)
            self.finished = self.finished or (out.finished and not isinstance(item, tuple))
        return item

    async def aclose(self) -> None:
        await self._items.aclose()  # type: ignore[attr-defined]


async def _prepend(head: tuple[T, ...], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        for out in head:
            yield out
        async for out in rest:
            yield out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def event_stream(
    request: Request, reply_id: str, events: AsyncIterator[str], outputs: OutputStream[Any]
) -> StreamingResponse:
    """The SSE reply streaming `events`, which are made from `outputs`; a client that leaves before the outputs
    end is logged (the module docstring says how its request is aborted)."""
    return StreamingResponse(_watched(request, reply_id, events, outputs), media_type="text/event-stream")


async def _watched(
    request: Request, reply_id: str, events: AsyncIterator[str], outputs: OutputStream[Any]
) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        # Starlette cancels the reply when the client disconnects, or drops it (closed when collected): before
        # any await, which a cancelled task may not get to finish
        if not outputs.finished:
            logger.info("Aborted request %s: the client disconnected from %s mid-stream, after %d output tokens",
                        reply_id, request.url.path, outputs.num_tokens)  # fmt: skip
        raise
    finally:
        await events.aclose()  # type: ignore[attr-defined]
