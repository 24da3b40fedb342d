"""Data parallel: N engine processes behind one API server (`treadle serve -dp N`), each a whole engine (scheduler,
KV cache, model) on its own device(s): rank r sees GPUs [r * tp, (r + 1) * tp) of the visible ones.

`AsyncDPClient` offers the AsyncMPClient calls the server makes. A new request goes to the engine with the fewest
requests in flight and stays there (its aborts follow it); the engines' outputs are merged into one stream, each
batch carrying the sum of the engines' latest scheduler stats (KV usage: their mean), so the metrics describe the
whole server. Utility calls go to every engine and their answers are merged (`merge_results`). One engine dying
makes the client dead, as one engine's death would (the server then answers 503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any

import msgspec

from treadle_engine_core import messages as msg
from treadle_engine_core.client import EngineDeadError
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.mp_client import AsyncMPClient


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without importing torch (the API server does not): CUDA_VISIBLE_DEVICES when
    set, else every GPU the NVIDIA driver lists; [] on a machine without one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def rank_devices(rank: int, per_rank: int, gpus: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES of data-parallel rank `rank` (None without GPUs: the engines share the CPU)."""
    if not gpus:
        return None
    mine = gpus[rank * per_rank : (rank + 1) * per_rank]
    if len(mine) < per_rank:
        raise ValueError(
            f"data parallel rank {rank} needs GPUs {rank * per_rank}..{(rank + 1) * per_rank - 1} but "
            f"{len(gpus)} are visible: data_parallel_size x tensor_parallel_size must not exceed the GPUs"
        )
    return ",".join(mine)


def _sum_stats(stats: list[msg.SchedulerStats]) -> msg.SchedulerStats:
    total = msg.SchedulerStats()
    for s in stats:
        for f in msg.SchedulerStats.__struct_fields__:
            if f == "spec_num_accepted_tokens_per_pos":  # per position: element-wise
                mine, theirs = total.spec_num_accepted_tokens_per_pos, s.spec_num_accepted_tokens_per_pos
                longest = max(len(mine), len(theirs))
                total.spec_num_accepted_tokens_per_pos = [
                    (mine[i] if i < len(mine) else 0) + (theirs[i] if i < len(theirs) else 0)
                    for i in range(longest)
                ]
            elif f != "kv_cache_usage":
                setattr(total, f, getattr(total, f) + getattr(s, f))
    total.kv_cache_usage = sum(s.kv_cache_usage for s in stats) / max(1, len(stats))
    return total


def merge_results(method: str, results: list[Any]) -> Any:
    """One answer from every engine's answer to a utility call: stats summed (KV usage averaged), counts summed,
    reset_prefix_cache true only if every engine reset; otherwise the first engine's."""
    if (
        method == "get_stats"
    ):  # the engines' SchedulerStats arrive as dicts (fields at their default left out)
        return msgspec.to_builtins(_sum_stats([msgspec.convert(r, msg.SchedulerStats) for r in results]))
    if method == "get_num_unfinished_requests":
        return sum(results)
    if method == "reset_prefix_cache":
        return all(results)
    return results[0]


class AsyncDPClient:
    def __init__(self, config: EngineConfig, *, startup_timeout_s: float = 600.0) -> None:
        n, tp = config.data_parallel_size, config.model_config.tensor_parallel_size
        gpus = visible_gpus()
        configs = [
            dataclasses.replace(config, data_parallel_size=1, visible_devices=rank_devices(r, tp, gpus))
            for r in range(n)
        ]
        started: list[AsyncMPClient | BaseException | None] = [None] * n

        def start(rank: int) -> None:
            try:
                started[rank] = AsyncMPClient(configs[rank], startup_timeout_s=startup_timeout_s)
            except BaseException as e:  # re-raised below, after every rank has settled
                started[rank] = e

        threads = [threading.Thread(target=start, args=(r,), name=f"treadle-dp{r}-boot") for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.engines = [c for c in started if isinstance(c, AsyncMPClient)]
        failure = next((c for c in started if isinstance(c, BaseException)), None)
        if failure is not None:
            self.shutdown()
            raise failure
        first = self.engines[0].ready
        runtime = dict(first.runtime)
        runtime["device"] = f"{runtime.get('device', '?')}; {n} engines (data parallel)"
        self.ready = msgspec.structs.replace(first, runtime=runtime)
        self._owner: dict[str, int] = {}
        self._stats: list[msg.SchedulerStats] = [msg.SchedulerStats() for _ in range(n)]
        self._queue: asyncio.Queue[msg.EngineCoreOutputs | BaseException] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- what the server calls --------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return any(e.is_dead for e in self.engines)

    @property
    def num_in_flight(self) -> int:
        return sum(e.num_in_flight for e in self.engines)

    async def add_request_async(self, request: msg.EngineCoreRequest) -> None:
        self._start()
        rank = min(range(len(self.engines)), key=lambda r: self.engines[r].num_in_flight)
        self._owner[request.request_id] = rank
        await self.engines[rank].add_request_async(request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for rid in request_ids:
            rank = self._owner.pop(rid, None)
            if rank is not None:
                by_rank.setdefault(rank, []).append(rid)
        for rank, ids in by_rank.items():
            await self.engines[rank].abort_requests_async(ids)

    async def get_output_async(self) -> msg.EngineCoreOutputs:
        queue = self._start()
        item = await queue.get()
        if isinstance(item, BaseException):
            queue.put_nowait(item)  # every later call fails the same way
            raise item
        return item

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        results = await asyncio.gather(*(e.call_utility_async(method, *args) for e in self.engines))
        return merge_results(method, results)

    def shutdown(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for engine in self.engines:
            engine.shutdown()

    # ---- merging --------------------------------------------------------------------------------
    def _start(self) -> asyncio.Queue[msg.EngineCoreOutputs | BaseException]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._pump(r), name=f"dp{r}-outputs") for r in range(len(self.engines))
            ]
        return self._queue

    async def _pump(self, rank: int) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while True:
                outputs = await self.engines[rank].get_output_async()
                for rid in outputs.finished_requests:
                    self._owner.pop(rid, None)
                if outputs.scheduler_stats is not None:
                    self._stats[rank] = outputs.scheduler_stats
                    outputs.scheduler_stats = _sum_stats(self._stats)
                queue.put_nowait(outputs)
        except EngineDeadError as e:
            queue.put_nowait(e)
