"""The tensor-parallel executor: one process per device; rank 0 is this (the engine's) process.

    rank 0   here: the ModelRunner the EngineCore drives; its outputs are the step's outputs
    rank r   a spawned worker (`run_worker`) with its own ModelRunner on device r (CPU: gloo, one thread share each)

Every call rank 0 makes — initialize the KV cache, switch async output, execute a SchedulerOutput — is first sent to
each worker over its pipe (msgspec msgpack, as everything crossing a process boundary; never pickle), then run
here. The ranks meet in the model's collectives (treadle_model_runner.parallel), so they run the same calls in the
same order. Workers send nothing back per step: every rank samples the same tokens from the same gathered logits
with the same seeds, so each keeps the same persistent batch.
LoRA calls (add_lora, hold_lora at admission, remove_lora) run on rank 0 first, and go to the workers only when
they succeeded there: an adapter that cannot run fails its call or request once, on rank 0, and every worker reads
and keeps its own part of each adapter rank 0 took (model_runner's lora/manager.py). They are sent from the engine's
one thread, as the steps are, so a worker holds a request's adapter before the step that runs it.
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
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from treadle_engine_core import messages as msg
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.executor import InprocExecutor, build_runner
from treadle_model_runner.kv_cache_spec import KVCacheConfig
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
        self._closing = False
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=run_worker, args=(config, rank, size, init_method, theirs),
                               name=f"treadle-tp{rank}", daemon=True)  # fmt: skip
            proc.start()
            theirs.close()
            self._workers.append((proc, ours))
        threading.Thread(target=self._watch, name="treadle-tp-monitor", daemon=True).start()
        _share_cpu_threads(device, size)
        try:
            init_tensor_parallel(0, size, init_method, device)
            super().__init__(config)
        except BaseException:  # e.g. heads the group size does not divide: all ranks fail; rank 0 says why
            self._stop_workers()
            raise

    def _watch(self) -> None:
        procs = {p.sentinel: (rank, p) for rank, (p, _) in enumerate(self._workers, start=1)}
        ready = wait(list(procs))
        time.sleep(_GRACE_S)  # rank 0 may be failing for the same reason: let its own error through first
        if self._closing:
            return
        rank, proc = procs[ready[0]]  # type: ignore[index]
        logger.critical("tensor-parallel rank %d (pid %s) exited with code %s; the engine cannot go on without it",
                        rank, proc.pid, proc.exitcode)  # fmt: skip
        logging.shutdown()
        os._exit(1)

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

    def add_lora(self, request: Any, load_inplace: bool = False) -> bool:
        added = super().add_lora(request, load_inplace)
        self._send(_LORA, msg.encode(msg.AddLoRA(request, load_inplace)))
        return added

    def hold_lora(self, request_id: str, request: Any) -> None:
        super().hold_lora(request_id, request)
        self._send(_LORA, msg.encode(msg.HoldLoRA(request_id, request)))

    def remove_lora(self, lora_id: int) -> bool:
        removed = super().remove_lora(lora_id)
        self._send(_LORA, msg.encode(msg.RemoveLoRA(lora_id)))
        return removed

    def shutdown(self) -> None:
        self._closing = True  # workers exiting from here on are expected
        super().shutdown()
        self.runner.release_graphs()  # graphs holding all-reduces would block the group's teardown
        self._stop_workers()

    def _stop_workers(self) -> None:
        self._closing = True
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
                _run_lora_call(runner, msg.decode(payload, msg.LoRACall), rank)
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


def _run_lora_call(runner: Any, call: msg.LoRACall, rank: int) -> None:
    """A LoRA call rank 0 ran without error. It fails here only when this rank read the adapter's directory after it
    changed or went: rank 0 read it earlier, or not at all because its host cache still held the adapter (under
    async scheduling a step's releases may run on rank 0 after the next admissions, so the two caches may evict in
    another order). Logged, not fatal: the adapter may never run here; a step that needs it then fails this rank."""
    try:
        if isinstance(call, msg.AddLoRA):
            runner.add_lora(call.lora_request, call.load_inplace)
        elif isinstance(call, msg.HoldLoRA):
            runner.hold_lora(call.request_id, call.lora_request)
        else:
            runner.remove_lora(call.lora_id)
    except ValueError as exc:
        name = type(call).__name__
        logger.error("tensor-parallel rank %d: %s failed here though rank 0 ran it: %s", rank, name, exc)
