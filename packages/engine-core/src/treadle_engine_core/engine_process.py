"""The engine process: EngineCore in its own process, behind ZMQ, named `treadle-engine-core`.

Threads. An input thread receives from the ROUTER socket (ADD / ABORT / UTILITY from DEALER clients),
decodes, and queues; it also watches the parent process (every 100 ms) and asks the loop to stop if the parent
is gone. An output thread encodes EngineCoreOutputs and sends them on the PUSH socket. The main thread runs the
busy loop — drain the input queue, `step()`, queue the outputs — and never touches a socket, so a slow client
or a burst of requests never stalls a step.

Lifecycle. Spawned (never forked: CUDA and threads do not survive fork) by an MP client, which binds the
output address first. The engine binds the input address, builds EngineCore (loads the model, allocates the
KV cache), and sends READY with the KV capacity, or FAILED with the error. It exits cleanly on SIGTERM /
SIGINT or when its parent dies; an exception in the loop is sent as FAILED before the process exits with
code 1, so the client can fail in-flight requests with the engine's own message.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq

from treadle_engine_core import messages as msg
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.heap import freeze_startup_heap

logger = logging.getLogger(__name__)

PROCESS_NAME = "treadle-engine-core"  # multiprocessing's name; `ps -o comm` shows COMM_NAME (15 bytes max)
COMM_NAME = "treadle-engine"
_PARENT_POLL_MS = 100
_STOP = object()  # input-queue sentinel: leave the loop


def set_process_name(name: str) -> None:
    """Name the process for ps/top (/proc/<pid>/comm holds 15 bytes; setproctitle is not a dependency)."""
    try:
        libc = ctypes.CDLL(None)
        pr_set_name = 15
        libc.prctl(pr_set_name, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run_engine_process(
    config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int, spawned_at: float | None = None
) -> None:
    """Entry point of the spawned process (`spawned_at`: the parent's time.time() when it started it)."""
    entered = time.time()
    if config.visible_devices is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = config.visible_devices
    set_process_name(COMM_NAME)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s"
    )
    logger.info("engine process: up %.1f s after spawn", entered - (spawned_at or entered))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("engine core: signal %d, shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)
    out_sock.connect(output_addr)
    in_sock = ctx.socket(zmq.ROUTER)
    in_sock.setsockopt(zmq.LINGER, 0)
    in_sock.bind(input_addr)
    code = 0
    try:
        from treadle_engine_core.core import EngineCore  # after the name is set: imports may be slow

        engine = EngineCore(config)
        if stop.is_set():  # Ctrl-C / SIGTERM arrived while loading: never report ready
            engine.shutdown()
            raise KeyboardInterrupt("interrupted during start-up")
    except BaseException as e:
        if isinstance(e, (ValueError, KeyboardInterrupt)):  # a user's error or an interruption: its message
            logger.error("engine core failed to start: %s", e)
        else:
            logger.exception("engine core failed to start")
        out_sock.send_multipart([msg.FAILED, msg.encode(_failure(e))])
        out_sock.close()
        in_sock.close()
        ctx.term()
        raise SystemExit(1) from None
    freeze_startup_heap("engine process")
    out_sock.send_multipart([msg.READY, msg.encode(engine.ready_message(os.getpid()))])
    in_q: queue.Queue[Any] = queue.Queue()
    out_q: queue.Queue[Any] = queue.Queue()
    t_in = threading.Thread(
        target=_input_loop, args=(in_sock, in_q, stop, parent_pid), name="engine-input", daemon=True
    )
    t_out = threading.Thread(target=_output_loop, args=(out_sock, out_q), name="engine-output", daemon=True)
    t_in.start()
    t_out.start()
    try:
        _busy_loop(engine, in_q, out_q, stop)
    except BaseException as e:
        logger.exception("engine core failed")
        out_q.put((msg.FAILED, _failure(e)))
        code = 1
    finally:
        stop.set()
        out_q.put(_STOP)
        t_out.join(timeout=5)
        t_in.join(timeout=1)
        if os.getppid() != parent_pid:  # orphaned: nobody else will remove the socket directory
            shutil.rmtree(os.path.dirname(input_addr.removeprefix("ipc://")), ignore_errors=True)
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine core: executor shutdown failed")
        out_sock.close()
        in_sock.close()
        ctx.term()
    raise SystemExit(code)


def _failure(e: BaseException) -> msg.EngineFailure:
    return msg.EngineFailure(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())


def _busy_loop(engine: Any, in_q: queue.Queue[Any], out_q: queue.Queue[Any], stop: threading.Event) -> None:
    while not stop.is_set():
        if not engine.has_work:
            try:
                item = in_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if _handle(engine, item, out_q):
                return
        while True:
            try:
                item = in_q.get_nowait()
            except queue.Empty:
                break
            if _handle(engine, item, out_q):
                return
        if engine.has_work:
            outputs = engine.step()
            if outputs.outputs or outputs.finished_requests:
                out_q.put((msg.OUTPUTS, outputs))


def _handle(engine: Any, item: Any, out_q: queue.Queue[Any]) -> bool:
    """Apply one client message; True means stop."""
    if item is _STOP:
        return True
    kind, payload = item
    if kind == msg.ADD:
        try:
            engine.add_request(payload)
        except ValueError as e:  # the client validates first; this is the engine's last word
            out = msg.EngineCoreOutput(
                payload.request_id, [], finish_reason=msg.FinishReason.ERROR, error=str(e)
            )
            out_q.put(
                (msg.OUTPUTS, msg.EngineCoreOutputs(outputs=[out], finished_requests=[payload.request_id]))
            )
    elif kind == msg.ABORT:
        engine.abort_requests(payload)
    elif kind == msg.UTILITY:
        try:
            result = msg.UtilityResult(
                payload.call_id, result=engine.call_utility(payload.method, payload.args)
            )
        except Exception as e:
            result = msg.UtilityResult(payload.call_id, error=f"{type(e).__name__}: {e}")
        out_q.put((msg.OUTPUTS, msg.EngineCoreOutputs(utility_results=[result])))
    return False


_DECODE_TYPES: dict[bytes, type] = {
    msg.ADD: msg.EngineCoreRequest,
    msg.ABORT: list[str],  # type: ignore[dict-item]
    msg.UTILITY: msg.UtilityRequest,
}


def _input_loop(
    sock: zmq.Socket[Any], in_q: queue.Queue[Any], stop: threading.Event, parent_pid: int
) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if os.getppid() != parent_pid:
            logger.warning("engine core: parent process %d is gone, shutting down", parent_pid)
            stop.set()
            in_q.put(_STOP)
            return
        if not poller.poll(_PARENT_POLL_MS):
            continue
        try:
            while True:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                kind = bytes(frames[1].buffer)
                try:
                    in_q.put((kind, msg.decode(frames[2].buffer, _DECODE_TYPES[kind])))
                except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as e:
                    logger.error("engine core: dropped a malformed message (kind %r): %s", kind, e)
        except zmq.Again:
            pass
        except zmq.ZMQError:
            if stop.is_set():
                return
            raise
    in_q.put(_STOP)


def _output_loop(sock: zmq.Socket[Any], out_q: queue.Queue[Any]) -> None:
    while True:
        item = out_q.get()
        if item is _STOP:
            return
        kind, obj = item
        sock.send_multipart([kind, msg.encode(obj)], copy=False)
