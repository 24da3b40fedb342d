"""Background responses of /v1/responses (`background: true`): the reply is made by a server task, not the request.

The create answers at once with the response `queued` (output []), kept in the store (responses_store.py), which
then holds its current state: `in_progress` once its task runs, then `completed` / `incomplete` as an unstreamed
reply ends, `failed` (with an `error` object) or `cancelled`; a failed or cancelled response keeps no output items.
Background needs the store: with `store: false`, or a store of size 0, it is a 400 naming `background`.

The task belongs to the server, not to the HTTP request: a client that disconnects leaves it running. POST
/v1/responses/{id}/cancel aborts it in the engine, then cancels the task; cancelling an ended background response
returns it unchanged, a response made without `background` is a 400, an unknown id a 404. DELETE of a running one
cancels it first. At shutdown (`close`) every running task is cancelled the same way and awaited; uvicorn ends the
lifespan only once open connections have closed, so a client still following a streamed one (below) holds the
shutdown until that response ends, as any open stream does.

With `stream: true` too, the task records each event it makes (`response.created` first, its status `queued`;
every event's `sequence_number` is its place in the record): the create streams them from the start, and GET
/v1/responses/{id}?stream=true&starting_after=N replays those after N, then follows the live ones until the
response ends (`response.failed` when it fails; a cancelled one's stream just ends, the API having no event for
it). The record lives as long as the response stays in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import ResponsesRequest
from treadle_frontend.server.responses_store import ResponseStore
from treadle_frontend.server.streams import sse_event

__all__ = ["BackgroundRun", "BackgroundRuns", "check_background"]

logger = logging.getLogger(__name__)


def check_background(body: ResponsesRequest, store: ResponseStore) -> None:
    """400 naming `background` where a background response could not be kept to be read back."""
    if body.store is False:
        raise APIError(400, "background: true needs store: a background response is read back from the store; "
                       "send store: true (or leave it out)", param="background")  # fmt: skip
    if store.capacity <= 0:
        raise APIError(400, "background: true needs the response store, which keeps none here "
                       "(TREADLE_RESPONSES_STORE_SIZE=0); raise it to serve background responses",
                       param="background")  # fmt: skip


@dataclass(slots=True)
class BackgroundRun:
    """One background response being made (or made)."""

    rid: str  # the response id (also its request id in the engine)
    streamed: bool  # created with stream: true (its events are recorded)
    # the response in its ended state (status, error message or None), kept in the store; called once
    end: Callable[[str, str | None], dict[str, Any]]
    events: list[str] = field(default_factory=list)  # the SSE events so far; index = sequence_number
    is_done: bool = False  # the task has ended (every event is recorded)
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on each new event

    def add(self, event: str) -> None:
        self.events.append(event)
        self._wake()

    def finish(self) -> None:
        """The task has ended: its followers stop once they have sent every event."""
        self.is_done = True
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class BackgroundRuns:
    """The background responses of one server: their tasks, and their event records while they are stored."""

    def __init__(self, store: ResponseStore, abort: Callable[[str], Awaitable[None]]) -> None:
        self.store = store
        # aborts a request in the engine, by its id
        self.abort = abort
        self._runs: dict[str, BackgroundRun] = {}

    def start(self, run: BackgroundRun, work: Callable[[BackgroundRun], Coroutine[Any, Any, None]]) -> None:
        """Runs `work` (which makes the response and stores its end) in a server task."""
        # records of ended responses no longer stored go
        self._runs = {rid: r for rid, r in self._runs.items() if not r.is_done or rid in self.store}
        self._runs[run.rid] = run
        run.task = asyncio.create_task(work(run), name=f"treadle-background-{run.rid}")
        run.task.add_done_callback(lambda task: self._ended(run, task))

    def _ended(self, run: BackgroundRun, task: asyncio.Task[None]) -> None:
        """Stores how the task ended when `work` did not (cancelled, even before it started; or failed)."""
        if task.cancelled():
            run.end("cancelled", None)
        elif (error := task.exception()) is not None:
            logger.warning("Background response %s failed: %s: %s", run.rid, type(error).__name__, error)
            failed = run.end("failed", str(error) or type(error).__name__)
            if run.streamed:
                data = {"type": "response.failed", "sequence_number": len(run.events), "response": failed}
                run.add(sse_event("response.failed", data))
        run.finish()

    async def cancel(self, rid: str) -> dict[str, Any]:
        """POST /v1/responses/{id}/cancel (the module docstring says what it answers)."""
        response = self.store.get(rid)
        if not response.get("background"):
            raise APIError(400, f"response {rid!r} was not created with background: true; only background "
                           "responses can be cancelled", param="response_id")  # fmt: skip
        await self._stop(rid)
        return self.store.get(rid)

    async def delete(self, rid: str) -> dict[str, Any]:
        """DELETE /v1/responses/{id}: a running background response is cancelled first."""
        await self._stop(rid)
        self._runs.pop(rid, None)
        return self.store.delete(rid)

    async def close(self) -> None:
        """Server shutdown: every running task is cancelled (its request aborted) and awaited."""
        await asyncio.gather(*(self._stop(rid) for rid, run in list(self._runs.items()) if not run.is_done))

    async def _stop(self, rid: str) -> None:
        """Aborts a running response's request in the engine, then cancels its task (a task that ended meanwhile
        keeps its end); nothing for one that has ended."""
        run = self._runs.get(rid)
        if run is None or run.task is None or run.is_done:
            return
        try:
            await self.abort(rid)
        except Exception as e:
            # the engine is going away; cancelling the task still ends the response
            logger.debug("abort of background response %s failed: %s", rid, e)
        run.task.cancel()
        await asyncio.wait({run.task})
        if run.task.cancelled():
            logger.info("Cancelled background response %s", rid)

    def retrieve(self, rid: str, stream: bool, starting_after: int | None) -> Any:
        """GET /v1/responses/{id}: the response's current state, or with stream its events after `starting_after`
        (all of them without it) and the live ones that follow."""
        response = self.store.get(rid)
        if not stream:
            return JSONResponse(response)
        run = self._runs.get(rid)
        if run is None or not run.streamed:
            raise APIError(400, f"response {rid!r} was not created with background: true and stream: true; only "
                           "those can be streamed again (GET it without stream)", param="stream")  # fmt: skip
        if starting_after is not None and starting_after < -1:
            raise APIError(400, f"starting_after must be a sequence number (>= 0), got {starting_after}",
                           param="starting_after")  # fmt: skip
        return self.stream(run, -1 if starting_after is None else starting_after)

    def stream(self, run: BackgroundRun, starting_after: int) -> StreamingResponse:
        """The SSE reply: `run`'s events after sequence number `starting_after`, then the live ones until it ends;
        a client that leaves stops only its own reply."""
        return StreamingResponse(_follow(run, starting_after + 1), media_type="text/event-stream")


async def _follow(run: BackgroundRun, start: int) -> AsyncIterator[str]:
    sent = start
    while True:
        # taken before the events are sent: one added meanwhile sets it
        changed = run.changed
        while sent < len(run.events):
            yield run.events[sent]
            sent += 1
        if run.is_done:
            return
        await changed.wait()
