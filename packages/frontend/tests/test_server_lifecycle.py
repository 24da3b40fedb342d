"""Client disconnects abort work in the engine; a dead engine turns /health to 503 and fails requests."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import httpx
from frontend_helpers import start_fake_server


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _series(url: str, name: str, label: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{label}}} not in /metrics")


def test_disconnect_mid_stream_aborts(tokenizer: Any) -> None:
    server, h = start_fake_server(tokenizer)
    h.client.step_delay = 0.01
    with server:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200,
            "stream": True,
            "extra": 1,
        }
        with httpx.stream("POST", h.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert h.engine.running, "the request is running while we read"
        deadline = time.monotonic() + 5
        while h.engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not h.engine.running and h.engine.num_aborted == 1
        assert _gauge(h.url, "treadle:num_requests_running") == 0
        # counted as finished with reason abort (vLLM's counter stays 0), kept out of the e2e latencies
        assert _series(h.url, "treadle:request_success_total", 'finished_reason="abort"') == 1
        assert _series(h.url, "treadle:e2e_request_latency_seconds_count", "") == 0
        # the same for a non-streaming request whose client gives up
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(h.url + "/v1/completions", json={"prompt": "x", "max_tokens": 150}, timeout=0.3)
        deadline = time.monotonic() + 5
        while h.engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not h.engine.running and h.engine.num_aborted == 2
        assert httpx.get(h.url + "/load").json() == {"server_load": 0}
        assert _series(h.url, "treadle:request_success_total", 'finished_reason="abort"') == 2
        # a request that finishes still counts as before
        httpx.post(
            h.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10
        ).raise_for_status()
        assert _series(h.url, "treadle:request_success_total", 'finished_reason="length"') == 1
        assert _series(h.url, "treadle:e2e_request_latency_seconds_count", "") == 1


def test_engine_death(tokenizer: Any) -> None:
    server, h = start_fake_server(tokenizer)
    h.client.step_delay = 0.01
    results: list[Any] = []

    def stream_one() -> None:
        body = {"model": "tiny", "prompt": "go", "max_tokens": 200, "stream": True}
        try:
            with httpx.stream("POST", h.url + "/v1/completions", json=body, timeout=10) as r:
                results.append("".join(r.iter_lines()))
        except httpx.HTTPError as e:
            results.append(e)

    with server:
        threads = [threading.Thread(target=stream_one) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(h.engine.running) < 3:
            assert time.monotonic() < deadline, results
            time.sleep(0.01)
        killed = time.monotonic()
        h.client.kill()
        while httpx.get(h.url + "/health").status_code != 503:
            assert time.monotonic() - killed < 2.0, "/health did not turn 503 within 2 s"
            time.sleep(0.02)
        for t in threads:
            t.join(timeout=10)
        assert len(results) == 3
        assert all(isinstance(r, str) and '"error"' in r for r in results), results
        r = httpx.post(h.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
