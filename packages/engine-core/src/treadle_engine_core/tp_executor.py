"""The tensor-parallel executor: one process per device; rank 0 is this (the engine's) process.

    rank 0   here: the ModelRunner the EngineCore drives; its outputs are the step's outputs
    rank r   a spawned worker (`run_worker`) with its own ModelRunner on device r (CPU: gloo, one thread share each)

Every call rank 0 makes — initialize the KV cache, switch async output, execute a SchedulerOutput — is first sent to
each worker over its pipe (msgspec msgpack, as everything crossing a process boundary; never pickle), then run
here. The ranks meet in the model's collectives (treadle_model_runner.parallel), so they run the same calls in the
same order. Workers send nothing back per step: every rank samples the same tokens from the same gathered logits
with the same seeds, so each keeps the same persistent batch.
LoRA adapters: rank 0's host cache decides what every rank keeps (model_runner's lora/host_cache.py says why).
add_lora, hold_lora and remove_lora run on rank 0 alone; when its cache loads an adapter it first asks each worker
to read it (ReadLoRA, answered by a LoRAReply: the one message workers send back), and then has every worker make
the change it made (ApplyLoRA: install what was read, drop what it dropped). A worker that cannot read an adapter
(its directory went away after rank 0 read it) makes the load fail on every rank, so the request that needed it
fails alone (the scheduler's error output) and no step ever misses an adapter on any rank. These messages go from
the engine's one thread, as the steps do, so a worker makes each change between the same two steps as rank 0's
engine thread did; none runs inside a step, and none is a collective. Waiting for the answers to ReadLoRA waits for
the steps in flight on the workers, which is paid only when an adapter is read from disk; it also means rank 0
installs an adapter only once every step sent before has prepared its adapters on every rank, so all ranks run the
new weights (of an in-place reload too) from the same step on.
A worker that dies takes the engine process down with it (rank 0 would wait in a collective for ever): a monitor
thread logs which rank exited and ends the process; the API server then reports the engine dead.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from treadle_engine_core import messages as msg
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.executor import InprocExecutor, build_runner
from treadle_model_runner.kv_cache_spec import KVCacheConfig
from treadle_model_runner.lora.change import HostChange
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel
from treadle_model_runner.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# frame 0 of every message to a worker
_INIT, _ASYNC, _STEP, _LORA, _STOP = b"i", b"a", b"s", b"l", b"q"
_GRACE_S = 2.0  # once a worker exited, how long rank 0 may take to fail on its own before the process ends


def rank_device(rank: int, size: int) -> torch.device:
    """cuda:rank when CUDA is present (ValueError when fewer than `size` GPUs are visible), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible < size:
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} GPUs, but {visible} "
            f"{'is' if visible == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", rank)


def _share_cpu_threads(device: torch.device, size: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TensorParallelExecutor(InprocExecutor):
    """Rank 0's runner here, ranks 1..size-1 in worker processes fed the same calls."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.model_config.tensor_parallel_size
        device = rank_device(0, size)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Connection]] = []
        # set by shutdown: workers exiting from then on are expected
        self._closing = threading.Event()
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=run_worker, args=(config, rank, size, init_method, theirs),
                               name=f"treadle-tp{rank}", daemon=True)  # fmt: skip
            proc.start()
            theirs.close()
            self._workers.append((proc, ours))
        # the monitor holds the processes and the flag, not this executor: a shut-down engine's runner (and its
        # KV cache) must be freed at once, not when the monitor wakes up
        procs = [proc for proc, _ in self._workers]
        monitor = threading.Thread(target=_watch, args=(procs, self._closing), name="treadle-tp-monitor")
        monitor.daemon = True
        monitor.start()
        _share_cpu_threads(device, size)
        try:
            init_tensor_parallel(0, size, init_method, device)
            super().__init__(config)
            lora = getattr(self.runner, "lora", None)
            if lora is not None:  # rank 0's adapter cache decides, the workers' follow
                lora.lead(_WorkerCaches(self))
        except BaseException:  # e.g. heads the group size does not divide: all ranks fail; rank 0 says why
            self._stop_workers()
            raise

    def _send(self, kind: bytes, payload: bytes = b"") -> None:
        message = kind + payload
        for rank, (_, conn) in enumerate(self._workers, start=1):
            try:
                conn.send_bytes(message)
            except OSError as exc:
                raise RuntimeError(f"tensor-parallel rank {rank} is gone ({exc})") from exc

    def initialize(self) -> KVCacheConfig:
        self._send(_INIT)
        return super().initialize()

    def set_async_output(self, enabled: bool) -> None:
        self._send(_ASYNC, b"1" if enabled else b"0")
        super().set_async_output(enabled)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._send(_STEP, msg.encode(so))
        return super().execute(so)

    def execute_async(self, so: SchedulerOutput) -> Future[ModelRunnerOutput | AsyncModelRunnerOutput]:
        self._send(_STEP, msg.encode(so))
        return super().execute_async(so)

    def _ask(self, call: msg.LoRACall) -> list[msg.LoRAReply]:
        """Send `call` to every worker and wait for each one's answer (after the steps it has yet to run)."""
        self._send(_LORA, msg.encode(call))
        replies = []
        for rank, (_, conn) in enumerate(self._workers, start=1):
            try:
                replies.append(msg.decode(conn.recv_bytes(), msg.LoRAReply))
            except (OSError, EOFError) as exc:
                raise RuntimeError(f"tensor-parallel rank {rank} is gone ({exc})") from exc
        return replies

    def loras_by_rank(self) -> list[list[int]]:
        """The adapter ids in each rank's host memory, rank 0 first (the ranks hold the same ones)."""
        return [self.list_loras()] + [reply.lora_ids for reply in self._ask(msg.ListLoRAs())]

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()
        self.runner.release_graphs()  # graphs holding all-reduces would block the group's teardown
        self._stop_workers()

    def _stop_workers(self) -> None:
        self._closing.set()
        for _, conn in self._workers:
            with contextlib.suppress(OSError):  # already gone
                conn.send_bytes(_STOP)
        destroy_tensor_parallel()  # while the workers leave the group too (NCCL's shutdown may wait for all ranks)
        for proc, conn in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            conn.close()


def _watch(procs: list[Any], closing: threading.Event) -> None:
    """End this process when a worker exits unasked (after `_GRACE_S`, unless shutdown began meanwhile)."""
    ranks = {p.sentinel: (rank, p) for rank, p in enumerate(procs, start=1)}
    ready = wait(list(ranks))
    # rank 0 may be failing for the same reason: let its own error through first
    if closing.wait(_GRACE_S):
        return
    rank, proc = ranks[ready[0]]  # type: ignore[index]
    logger.critical("tensor-parallel rank %d (pid %s) exited with code %s; the engine cannot go on without it",
                    rank, proc.pid, proc.exitcode)  # fmt: skip
    logging.shutdown()
    os._exit(1)


def run_worker(config: EngineConfig, rank: int, size: int, init_method: str, conn: Connection) -> None:
    """Entry point of rank `rank`'s process: build its runner, then run what rank 0 sends until told to stop."""
    from treadle_engine_core.engine_process import set_process_name

    set_process_name(f"treadle-tp{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s [tp-rank {rank}] %(name)s: %(message)s"
    )
    try:
        device = rank_device(rank, size)
        _share_cpu_threads(device, size)
        init_tensor_parallel(rank, size, init_method, device)
        runner = build_runner(config, device)
        while True:
            data = conn.recv_bytes()
            kind, payload = data[:1], data[1:]
            if kind == _STEP:
                runner.execute(msg.decode(payload, SchedulerOutput))
            elif kind == _INIT:
                runner.initialize_kv_cache()
            elif kind == _ASYNC:
                runner.async_output = payload == b"1"
            elif kind == _LORA:
                _run_lora_call(runner, msg.decode(payload, msg.LoRACall), conn)
            else:
                break
    except EOFError:  # rank 0's process is gone
        pass
    except ValueError as exc:  # a user's error (rank 0 reports it too): its message, no traceback
        logger.error("tensor-parallel rank %d failed: %s", rank, exc)
        raise SystemExit(1) from None
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", rank)
        raise SystemExit(1) from None
    runner.release_graphs()  # as rank 0 does: graphs holding all-reduces would block the group's teardown
    destroy_tensor_parallel()  # alongside rank 0's
    logging.shutdown()
    # nothing left to do: skip interpreter teardown, where CUDA and NCCL objects could still block
    os._exit(0)


class _WorkerCaches:
    """The workers' adapter host caches, as rank 0's cache sees them (lora/host_cache.py's Followers)."""

    def __init__(self, executor: TensorParallelExecutor) -> None:
        self.executor = executor

    def read(self, request: LoRARequest) -> None:
        replies = self.executor._ask(msg.ReadLoRA(request))
        failed = [(rank, reply.error) for rank, reply in enumerate(replies, start=1) if reply.error]
        if failed:
            self.apply(HostChange())  # the workers that read it drop it
            rank, error = failed[0]
            raise ValueError(
                f"tensor-parallel rank {rank} could not read LoRA adapter {request.lora_name!r}, which rank 0 had "
                f"just read: {error}"
            )

    def apply(self, change: HostChange) -> None:
        self.executor._send(_LORA, msg.encode(msg.ApplyLoRA(change)))


def _run_lora_call(runner: Any, call: msg.LoRACall, conn: Connection) -> None:
    """Rank 0's adapter cache speaking (lora/host_cache.py): ReadLoRA and ListLoRAs are answered, ApplyLoRA is not.
    A read that fails is answered with its error (rank 0 then loads the adapter nowhere); nothing here ends the
    worker."""
    if isinstance(call, msg.ApplyLoRA):
        runner.lora.apply(call.change)
    elif isinstance(call, msg.ReadLoRA):
        try:
            runner.lora.read(call.lora_request)
        except ValueError as exc:
            conn.send_bytes(msg.encode(msg.LoRAReply(error=str(exc))))
        else:
            conn.send_bytes(msg.encode(msg.LoRAReply()))
    else:
        conn.send_bytes(msg.encode(msg.LoRAReply(lora_ids=runner.list_loras())))
