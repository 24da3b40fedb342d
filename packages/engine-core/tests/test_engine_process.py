"""The engine in its own process, over ZMQ, with the fake runner: many requests with aborts, a killed engine,
an engine that fails mid-step, a parent that dies, a failed startup. Nothing may be left running."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from engine_core_harness import expected_output

from treadle_engine_core.client import EngineDeadError, EngineStartError
from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.messages import EngineCoreRequest
from treadle_engine_core.mp_client import AsyncMPClient, SyncMPClient
from treadle_engine_core.request import FinishReason
from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams

pytestmark = pytest.mark.timeout(120)

MAX_LEN = 256


def _config(async_scheduling: bool = False, **fake: object) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=MAX_LEN),
        cache_config=CacheConfig(block_size=8, num_gpu_blocks_override=160),
        scheduler_config=SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=128, async_scheduling=async_scheduling
        ),
        executor="fake",
        fake_runner=FakeRunnerConfig(**fake),  # type: ignore[arg-type]
    )


def _is_gone(pid: int) -> bool:
    """True if no such process runs (absent, or a zombie waiting for a reaper other than us)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "State:\tZ" in status


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _is_gone(pid):
            return True
        time.sleep(0.02)
    return _is_gone(pid)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_fifty_requests_ten_aborted_midway(async_scheduling: bool) -> None:
    fake = FakeRunnerConfig(eos_every=0, step_delay_s=0.002)
    client = AsyncMPClient(_config(async_scheduling, eos_every=0, step_delay_s=0.002))
    pid = client.proc.pid
    assert client.ready.max_model_len == MAX_LEN and client.ready.num_kv_blocks == 159
    shared = list(range(10, 42))  # 4 full blocks every request shares

    async def run() -> tuple[dict[str, list[int]], dict[str, FinishReason | None], object]:
        tokens: dict[str, list[int]] = {}
        reasons: dict[str, FinishReason | None] = {}
        to_abort = {f"r{i}" for i in range(0, 50, 5)}
        for i in range(50):
            prompt = shared + [100 + i] * (i % 7 + 1)
            params = SamplingParams(max_tokens=30 + i % 11, temperature=0.0)
            await client.add_request_async(EngineCoreRequest(f"r{i}", prompt, params, time.time()))
        aborted: set[str] = set()
        while client.num_in_flight:
            out = await asyncio.wait_for(client.get_output_async(), timeout=30)
            for o in out.outputs:
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    reasons[o.request_id] = o.finish_reason
            midway = [r for r in to_abort - aborted if len(tokens.get(r, [])) >= 5]
            if midway:
                await client.abort_requests_async(midway)
                aborted.update(midway)
        assert aborted == to_abort, "every request to abort should have reached its midpoint"
        stats = await client.get_stats_async()
        return tokens, reasons, stats

    try:
        tokens, reasons, stats = asyncio.run(run())
        for i in range(50):
            rid = f"r{i}"
            prompt_len = 32 + i % 7 + 1
            want, reason, _ = expected_output(
                rid, prompt_len, SamplingParams(max_tokens=30 + i % 11), MAX_LEN, fake
            )
            if i % 5 == 0:
                assert rid not in reasons, f"{rid} was aborted but finished with {reasons.get(rid)}"
                assert 5 <= len(tokens[rid]) < len(want) and tokens[rid] == want[: len(tokens[rid])]
            else:
                assert tokens[rid] == want and reasons[rid] == reason
        assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0  # type: ignore[attr-defined]
        assert stats.kv_cache_usage == 0.0  # type: ignore[attr-defined]
        assert stats.prefix_cache_hits >= 49 * 32  # type: ignore[attr-defined]
    finally:
        client.shutdown()
    assert _is_gone(pid)


def test_killed_engine_is_noticed_within_a_second() -> None:
    client = AsyncMPClient(_config(step_delay_s=0.01))
    pid = client.proc.pid

    async def run() -> tuple[float, EngineDeadError]:
        for i in range(4):
            await client.add_request_async(
                EngineCoreRequest(f"k{i}", [5, 6, 7], SamplingParams(max_tokens=200), 0.0)
            )
        await client.get_output_async()
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError) as info:
            while True:
                await client.get_output_async()
        elapsed = time.monotonic() - t0
        with pytest.raises(EngineDeadError):
            await client.add_request_async(EngineCoreRequest("late", [1], SamplingParams(), 0.0))
        return elapsed, info.value

    try:
        elapsed, err = asyncio.run(run())
        assert elapsed < 1.0, f"dead engine noticed after {elapsed:.2f} s"
        assert sorted(err.request_ids) == ["k0", "k1", "k2", "k3"]
        assert "died" in str(err) and client.is_dead
    finally:
        client.shutdown()
    assert _is_gone(pid)


def test_engine_exception_fails_requests_with_its_message() -> None:
    client = SyncMPClient(_config(fail_on_step=3))
    pid = client.proc.pid
    try:
        client.add_request(EngineCoreRequest("x", [1, 2, 3], SamplingParams(max_tokens=50), 0.0))
        with pytest.raises(EngineDeadError, match="injected failure in step 3") as info:
            while True:
                client.get_output(timeout_s=10)
        assert info.value.request_ids == ["x"]
    finally:
        client.shutdown()
    assert _is_gone(pid)


def test_out_of_vocabulary_ids_fail_their_request_not_the_engine() -> None:
    """A token id the sampler would index with, outside the vocabulary, ends its request with an error naming the
    field; the engine keeps serving (it used to die on it in the sampler)."""
    client = SyncMPClient(_config())
    try:
        bad = {
            "logit_bias": SamplingParams(max_tokens=3, logit_bias={10**9: 1.0}),
            "allowed_token_ids": SamplingParams(max_tokens=3, allowed_token_ids=[5, 10**9]),
            "prompt token id": SamplingParams(max_tokens=3),
        }
        for name, params in bad.items():
            prompt = [1, 2, 10**9] if name == "prompt token id" else [1, 2, 3]
            client.add_request(EngineCoreRequest(name, prompt, params, 0.0))
            out = client.get_output(timeout_s=10).outputs
            assert [(o.request_id, o.finish_reason) for o in out] == [(name, FinishReason.ERROR)]
            assert name in (out[0].error or "") and "outside the vocabulary" in (out[0].error or "")
        client.add_request(EngineCoreRequest("ok", [1, 2, 3], SamplingParams(max_tokens=3), 0.0))
        tokens = []
        while client.num_in_flight:
            tokens.extend(t for o in client.get_output(timeout_s=10).outputs for t in o.new_token_ids)
        assert len(tokens) == 3
    finally:
        client.shutdown()


def test_sync_client_utilities_and_validation() -> None:
    client = SyncMPClient(_config())
    try:
        with pytest.raises(ValueError, match=r"maximum context length is 256 tokens.*300 in the completion"):
            client.add_request(EngineCoreRequest("long", [1] * 10, SamplingParams(max_tokens=300), 0.0))
        assert client.call_utility("ping") == "pong"
        assert (
            client.ready.scheduling_policy == "fcfs" and client.ready.runtime == {}
        )  # the fake runner says nothing
        assert client.reset_prefix_cache() is True
        with pytest.raises(RuntimeError, match="unknown utility method 'shutdown_now'"):
            client.call_utility("shutdown_now")
        client.add_request(EngineCoreRequest("a", [9] * 20, SamplingParams(max_tokens=4), 0.0))
        out = []
        while client.num_in_flight:
            out.extend(client.get_output(timeout_s=10).outputs)
        assert out[-1].finish_reason == FinishReason.LENGTH and sum(len(o.new_token_ids) for o in out) == 4
        stats = client.get_stats()
        assert stats.num_generation_tokens == 4 and stats.num_prompt_tokens == 20
        proc = client.proc
    finally:
        client.shutdown()
    assert proc.exitcode == 0, "SIGTERM should end the engine cleanly"


def test_startup_failure_is_reported() -> None:
    bad = EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=4096),
        cache_config=CacheConfig(block_size=8, num_gpu_blocks_override=16),
        executor="fake",
        fake_runner=FakeRunnerConfig(max_model_len=4096),
    )
    for client_cls in (
        SyncMPClient,
        AsyncMPClient,
    ):  # the asyncio client reports it too (not an AttributeError)
        with pytest.raises(
            RuntimeError, match=r"engine core failed to start: ValueError: max_model_len \(4096\)"
        ):
            client_cls(bad)


def test_signal_during_startup_is_not_reported_ready() -> None:
    """Ctrl-C reaches the whole process group: the engine, still loading, must report that it was interrupted
    instead of READY (a server went on to serve with a dead engine)."""
    import multiprocessing
    import threading

    result: dict[str, BaseException] = {}

    def start() -> None:
        try:
            SyncMPClient(_config(startup_delay_s=3.0)).shutdown()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 30
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the engine process is up and "loading"
    for child in multiprocessing.active_children():
        os.kill(child.pid or 0, signal.SIGINT)
    thread.join(timeout=30)
    error = result.get("error")
    assert isinstance(error, EngineStartError) and error.interrupted, error
    assert "interrupted during start-up" in str(error)


def _become_subreaper() -> bool:
    """Orphans of our children get reparented to us (so we can reap them) instead of to PID 1."""
    try:
        return ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def test_engine_exits_when_its_parent_dies(tmp_path: Path) -> None:
    reaper = _become_subreaper()
    script = textwrap.dedent(
        """
        import os, sys, time
        from treadle_engine_core.config import EngineConfig
        from treadle_engine_core.mp_client import SyncMPClient
        from treadle_model_runner import ModelConfig
        if __name__ == "__main__":
            client = SyncMPClient(EngineConfig(ModelConfig(model="fake", max_model_len=64), executor="fake"))
            print(client.proc.pid, flush=True)
            time.sleep(60)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        assert not _is_gone(engine_pid)
        comm = Path(f"/proc/{engine_pid}/comm").read_text().strip()
        assert comm.startswith("treadle-engine"), comm
        parent.kill()
        parent.wait()
        assert _wait_gone(engine_pid, 3.0), "engine process outlived its parent"
        if reaper:
            os.waitpid(engine_pid, 0)
            assert not Path(f"/proc/{engine_pid}").exists()
    finally:
        parent.kill()
    assert not list(tmp_path.glob("treadle-engine-*"))
