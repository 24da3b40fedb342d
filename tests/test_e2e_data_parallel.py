"""`treadle serve -dp 2`: two engine processes behind one server (on CPU they share the machine). Concurrent
requests through the openai SDK get the single-engine server's greedy completions (same tiny model and dummy
weights), both engines serve, /metrics counts the requests of both, and stopping the server ends both engines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from e2e_helpers import API_KEY, LLAMA, MODEL_NAME, RealServer, children_of, start_server
from tiny_assets import build_tokenizer_dir

PROMPTS = [f"Tell me about the number {i} and the letter {chr(97 + i)}" for i in range(10)]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    model = build_tokenizer_dir(tmp_path_factory.mktemp("tiny_llama_dp"))
    (model / "config.json").write_text(json.dumps(LLAMA))
    server = start_server(model, tmp_path_factory.mktemp("logs") / "dp.log", ["-dp", "2"])
    try:
        yield server
    finally:
        server.stop()


async def _complete_all(url: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        asks = [
            client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0.0)
            for p in PROMPTS
        ]
        outs = await asyncio.gather(*asks)
    return [o.choices[0].text for o in outs]


def _engines(server: RealServer) -> list[int]:
    return [
        pid
        for pid in children_of(server.proc.pid)
        if "treadle-engine" in Path(f"/proc/{pid}/comm").read_text()
    ]


def test_two_engines_answer_like_one(dp_server: RealServer, real_server: RealServer) -> None:
    engines = _engines(dp_server)
    assert len(engines) == 2, engines
    want = asyncio.run(_complete_all(real_server.url))
    got = asyncio.run(_complete_all(dp_server.url))
    assert got == want
    metrics = httpx.get(dp_server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    line = next(
        ln for ln in metrics.splitlines() if ln.startswith("treadle:request_success_total") and "length" in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == len(PROMPTS)
    log = dp_server.log.read_text()
    assert "Data parallel: 2 engine processes" in log
    dp_server.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in engines), "stopping the server ends both engines"
