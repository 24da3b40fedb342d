"""Clients of the engine process (engine_process.py): blocking `SyncMPClient` and asyncio `AsyncMPClient`.

The client owns the engine process. It makes a private temp dir for the ipc:// sockets, binds the output
PULL socket, spawns the engine, and waits for READY (or FAILED, or the process exiting) before returning.
It connects a DEALER to the engine's ROUTER for ADD / ABORT / UTILITY. Every wait on the output socket is
a poll of at most 100 ms followed by a liveness check of the child, so a dead engine is noticed within
~0.1 s: the client then raises `EngineDeadError` carrying the engine's own failure message (if it sent one)
and the ids of the requests that were in flight. `shutdown()` (also run by a finalizer at exit) sends SIGTERM,
kills after a grace period, reaps the child and removes the socket dir: nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from treadle_engine_core import messages as msg
from treadle_engine_core.client import EngineCoreClient, EngineDeadError, EngineStartError
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.engine_process import PROCESS_NAME, run_engine_process
from treadle_engine_core.request import validate_request_length

logger = logging.getLogger(__name__)

_POLL_MS = 100  # longest wait on a socket before checking the engine is alive


def _shutdown_engine(proc: Any, ctx: zmq.Context[Any], tmpdir: str) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            logger.warning("engine core (pid %s) ignored SIGTERM; killing it", proc.pid)
            proc.kill()
    proc.join(5)
    ctx.destroy(linger=0)
    shutil.rmtree(tmpdir, ignore_errors=True)


class _MPClient(EngineCoreClient):
    def __init__(self, config: EngineConfig, *, startup_timeout_s: float = 600.0) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="treadle-engine-")
        input_addr = f"ipc://{self._tmpdir}/input.sock"
        output_addr = f"ipc://{self._tmpdir}/output.sock"
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(output_addr)
        mp = multiprocessing.get_context("spawn")
        self.proc = mp.Process(
            target=run_engine_process,
            args=(config, input_addr, output_addr, os.getpid(), time.time()),
            name=PROCESS_NAME,
        )
        self.proc.start()
        self._finalizer = weakref.finalize(self, _shutdown_engine, self.proc, self._ctx, self._tmpdir)
        self._in_flight: set[str] = set()
        self._failure: str | None = None
        self._dead = False
        self._call_ids = itertools.count()
        try:
            self.ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._in = self._ctx.socket(zmq.DEALER)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.connect(input_addr)
        logger.info(
            "engine core ready (pid %d): %d KV blocks of %d tokens, max_model_len %d",
            self.ready.pid,
            self.ready.num_kv_blocks,
            self.ready.block_size,
            self.ready.max_model_len,
        )

    def _wait_ready(self, timeout_s: float) -> msg.EngineReady:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._out.poll(_POLL_MS):
                kind, payload = self._out.recv_multipart()
                if kind == msg.READY:
                    ready: msg.EngineReady = msg.decode(payload, msg.EngineReady)
                    return ready
                if kind == msg.FAILED:
                    failure = msg.decode(payload, msg.EngineFailure)
                    interrupted = failure.message.startswith("KeyboardInterrupt")
                    raise EngineStartError(f"engine core failed to start: {failure.message}", interrupted)
            elif not self.proc.is_alive():
                raise EngineStartError(
                    f"engine core process exited with code {self.proc.exitcode} before it was ready; "
                    "see its log above"
                )
        raise TimeoutError(f"engine core was not ready after {timeout_s:.0f} s")

    # ---- shared state -----------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self._dead or not self.proc.is_alive()

    def _check_alive(self) -> None:
        if self._dead:
            raise EngineDeadError(self._dead_message(0), [])

    def _dead_message(self, num_failed: int) -> str:
        why = self._failure or f"exit code {self.proc.exitcode}"
        return (
            f"The engine core process (pid {self.proc.pid}) died ({why}); "
            f"{num_failed} in-flight requests failed. Restart the server."
        )

    def _die(self) -> EngineDeadError:
        self._dead = True
        failed = sorted(self._in_flight)
        self._in_flight.clear()
        logger.error("%s", self._dead_message(len(failed)))
        return EngineDeadError(self._dead_message(len(failed)), failed)

    def _decode(self, kind: bytes, payload: bytes) -> msg.EngineCoreOutputs | None:
        if kind == msg.FAILED:
            failure = msg.decode(payload, msg.EngineFailure)
            self._failure = failure.message
            logger.error("engine core failed: %s\n%s", failure.message, failure.traceback)
            return None
        outputs: msg.EngineCoreOutputs = msg.decode(payload, msg.EngineCoreOutputs)
        if outputs.finished_requests:
            self._in_flight.difference_update(outputs.finished_requests)
        return outputs

    def _prepare_add(self, request: msg.EngineCoreRequest) -> list[bytes]:
        self._check_alive()
        validate_request_length(
            len(request.prompt_token_ids), request.sampling_params.max_tokens, self.ready.max_model_len
        )
        self._in_flight.add(request.request_id)
        return [msg.ADD, msg.encode(request)]

    def _prepare_abort(self, request_ids: list[str]) -> list[bytes]:
        self._in_flight.difference_update(request_ids)
        return [msg.ABORT, msg.encode(list(request_ids))]

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def shutdown(self) -> None:
        self._finalizer()


class SyncMPClient(_MPClient):
    """Blocking client (offline use with the engine in its own process)."""

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float = 600.0) -> None:
        super().__init__(config, startup_timeout_s=startup_timeout_s)
        self._pending: deque[msg.EngineCoreOutputs] = deque()
        self._utility_results: dict[int, msg.UtilityResult] = {}

    def add_request(self, request: msg.EngineCoreRequest) -> None:
        self._in.send_multipart(self._prepare_add(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._in.send_multipart(self._prepare_abort(request_ids))

    def _recv_one(self, timeout_s: float | None) -> bool:
        """Receive one message into the pending queues; False on timeout. Raises EngineDeadError."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            self._check_alive()
            if self._out.poll(_POLL_MS):
                kind, payload = self._out.recv_multipart()
                outputs = self._decode(kind, payload)
                if outputs is not None:
                    for r in outputs.utility_results:
                        self._utility_results[r.call_id] = r
                    if outputs.outputs or outputs.finished_requests:
                        self._pending.append(outputs)
                return True
            if not self.proc.is_alive() and not self._out.poll(0):
                raise self._die()
        return False

    def get_output(self, timeout_s: float | None = None) -> msg.EngineCoreOutputs:
        """The next outputs from the engine (blocks; TimeoutError after timeout_s)."""
        while not self._pending:
            if not self._recv_one(timeout_s):
                raise TimeoutError(f"no engine output within {timeout_s} s")
        return self._pending.popleft()

    def call_utility(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        self._check_alive()
        self._in.send_multipart([msg.UTILITY, msg.encode(msg.UtilityRequest(call_id, method, list(args)))])
        while call_id not in self._utility_results:
            self._recv_one(None)
        result = self._utility_results.pop(call_id)
        if result.error is not None:
            raise RuntimeError(f"engine utility {method!r} failed: {result.error}")
        return result.result


class AsyncMPClient(_MPClient):
    """asyncio client for the API server. Use it from one event loop."""

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float = 600.0) -> None:
        # set before the base starts the engine: a failed start calls shutdown(), which reads them
        self._queue: asyncio.Queue[msg.EngineCoreOutputs | EngineDeadError] | None = None
        self._task: asyncio.Task[None] | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ain: zmq.asyncio.Socket | None = None
        self._aout: zmq.asyncio.Socket | None = None
        super().__init__(config, startup_timeout_s=startup_timeout_s)

    def _start(self) -> zmq.asyncio.Socket:
        if self._ain is None:
            self._ain = zmq.asyncio.Socket.from_socket(self._in)
            self._aout = zmq.asyncio.Socket.from_socket(self._out)
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._output_loop(), name="engine-outputs")
        return self._ain

    async def _output_loop(self) -> None:
        sock, queue = self._aout, self._queue
        assert sock is not None and queue is not None
        while True:
            if await sock.poll(_POLL_MS):
                kind, payload = await sock.recv_multipart()
                outputs = self._decode(kind, payload)
                if outputs is None:
                    continue
                for r in outputs.utility_results:
                    fut = self._futures.pop(r.call_id, None)
                    if fut is not None and not fut.done():
                        if r.error is not None:
                            fut.set_exception(RuntimeError(f"engine utility failed: {r.error}"))
                        else:
                            fut.set_result(r.result)
                if outputs.outputs or outputs.finished_requests:
                    queue.put_nowait(outputs)
            elif not self.proc.is_alive() and not await sock.poll(0):
                err = self._die()
                for fut in self._futures.values():
                    if not fut.done():
                        fut.set_exception(EngineDeadError(str(err)))
                self._futures.clear()
                queue.put_nowait(err)
                return

    async def add_request_async(self, request: msg.EngineCoreRequest) -> None:
        sock = self._start()
        await sock.send_multipart(self._prepare_add(request))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        sock = self._start()
        if not self._dead:
            await sock.send_multipart(self._prepare_abort(request_ids))

    async def get_output_async(self) -> msg.EngineCoreOutputs:
        self._start()
        assert self._queue is not None
        if self._dead and self._queue.empty():
            raise EngineDeadError(self._dead_message(0))
        item = await self._queue.get()
        if isinstance(item, EngineDeadError):
            raise item
        return item

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        sock = self._start()
        self._check_alive()
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[call_id] = fut
        await sock.send_multipart([msg.UTILITY, msg.encode(msg.UtilityRequest(call_id, method, list(args)))])
        return await fut

    def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(RuntimeError):  # its loop may already be closed
                self._task.cancel()
        super().shutdown()
