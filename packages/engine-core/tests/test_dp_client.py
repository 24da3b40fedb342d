"""Data parallel (AsyncDPClient) over two fake-runner engine processes: every request is served by one engine and
its tokens equal a single engine's (the fake model is deterministic); both engines take work; aborts reach the
engine holding the request; the merged stats sum both engines; utility calls reach both; a killed engine makes
the client dead; GPUs are handed out per rank."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest

from treadle_engine_core import EngineDeadError
from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.dp_client import AsyncDPClient, rank_devices
from treadle_engine_core.messages import EngineCoreRequest
from treadle_engine_core.mp_client import AsyncMPClient
from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams


def _config(dp: int) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=256),
        cache_config=CacheConfig(block_size=8, num_gpu_blocks_override=160),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        executor="fake",
        fake_runner=FakeRunnerConfig(step_delay_s=0.002),
        data_parallel_size=dp,
    )


async def _serve(client: AsyncMPClient | AsyncDPClient, n: int, abort: set[str]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for i in range(n):
        params = SamplingParams(max_tokens=20 + i % 5, temperature=0.0)
        await client.add_request_async(EngineCoreRequest(f"r{i}", [3 + i, 9, 4 + i % 3], params, time.time()))
    finished: set[str] = set()
    while len(finished) < n - len(abort):
        out = await asyncio.wait_for(client.get_output_async(), timeout=30)
        for o in out.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                finished.add(o.request_id)
        late = [r for r in abort if r in tokens and r not in finished]
        if late:
            await client.abort_requests_async(late)
            abort -= set(late)
            finished.update(late)
    return tokens


def test_two_engines_serve_like_one() -> None:
    single = AsyncMPClient(_config(1))
    try:
        want = asyncio.run(_serve(single, 12, set()))
    finally:
        single.shutdown()
    client = AsyncDPClient(_config(2))
    try:
        assert len(client.engines) == 2 and "2 engines (data parallel)" in client.ready.runtime["device"]

        async def run() -> tuple[dict[str, list[int]], object, list[bool]]:
            got = await _serve(client, 12, set())
            used = [e.num_in_flight for e in client.engines]
            stats = await client.call_utility_async("get_stats")
            assert await client.call_utility_async("reset_prefix_cache") is True
            assert await client.call_utility_async("get_num_unfinished_requests") == 0
            aborted = await _serve(client, 6, {"r0", "r1", "r2", "r3"})
            return (
                got,
                stats,
                [used == [0, 0], all(not e.num_in_flight for e in client.engines), bool(aborted)],
            )

        got, _, checks = asyncio.run(run())
        assert got == want
        assert all(checks)
    finally:
        client.shutdown()


def test_requests_spread_and_stats_sum() -> None:
    client = AsyncDPClient(_config(2))
    try:

        async def run() -> tuple[list[int], int]:
            for i in range(8):
                req = EngineCoreRequest(f"s{i}", [5, 6, 7], SamplingParams(max_tokens=40), time.time())
                await client.add_request_async(req)
            spread = [e.num_in_flight for e in client.engines]
            assert await client.call_utility_async("get_num_unfinished_requests") == 8
            stats = await client.call_utility_async("get_stats")
            assert stats.get("num_running_reqs", 0) + stats.get("num_waiting_reqs", 0) == 8, stats
            running = 0
            for _ in range(20):
                out = await asyncio.wait_for(client.get_output_async(), timeout=30)
                if out.scheduler_stats is not None:
                    running = max(running, out.scheduler_stats.num_running_reqs)
            await client.abort_requests_async([f"s{i}" for i in range(8)])
            return spread, running

        spread, running = asyncio.run(run())
        assert spread == [4, 4], "least-loaded routing alternates between two idle engines"
        assert running > 4, "the merged stats count both engines' running requests"
    finally:
        client.shutdown()


def test_a_killed_engine_kills_the_client() -> None:
    client = AsyncDPClient(dataclasses.replace(_config(2), fake_runner=FakeRunnerConfig(step_delay_s=0.01)))
    try:

        async def run() -> None:
            for i in range(4):
                await client.add_request_async(
                    EngineCoreRequest(f"k{i}", [5], SamplingParams(max_tokens=200), 0.0)
                )
            await client.get_output_async()
            os.kill(client.engines[1].proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                while True:
                    await asyncio.wait_for(client.get_output_async(), timeout=10)

        asyncio.run(run())
        assert client.is_dead
    finally:
        client.shutdown()


def test_gpus_per_rank() -> None:
    gpus = ["4", "5", "6", "7"]
    assert [rank_devices(r, 2, gpus) for r in range(2)] == ["4,5", "6,7"]
    assert rank_devices(0, 1, []) is None
    with pytest.raises(ValueError, match=r"needs GPUs 4\.\.5 but 4 are visible"):
        rank_devices(2, 2, gpus)
