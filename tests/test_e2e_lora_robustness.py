"""LoRA adapters that go away while requests wait for them, on a tiny random Llama with PEFT adapters (CPU, fp32).

With one adapter slot and one adapter kept in host memory, a waiting request's adapter is evicted by later
arrivals; if its directory is then deleted, that request alone fails when it is admitted, with the adapter and the
file problem named, while the engine goes on: the requests around it still give PEFT's greedy continuations, and
later requests still run. Checked on the EngineCore (sync and async scheduling) and through `treadle serve` with
the openai SDK, where a streamed request whose adapter is gone gets the unstreamed request's HTTP 400, not a 200
whose stream carries the error.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e_helpers import API_KEY, MODEL_NAME, RealServer, start_server
from lora_e2e_assets import Tiny, build_tiny

from treadle import LoRARequest, SamplingParams
from treadle_engine_core.config import EngineConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_engine_core.request import FinishReason
from treadle_model_runner import CacheConfig, LoRAConfig, ModelConfig

PORT = int(os.environ.get("E2E_LORA_PORT", "0")) or None
PROMPTS = {"r1": [5, 40, 17, 200, 9], "r2": [6, 43, 17, 199, 9], "r3": [7, 46, 17, 198, 9], "r4": [8, 49, 17]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("lora_robust"))


def _engine(tiny: Tiny, async_scheduling: bool) -> EngineCore:
    config = EngineConfig(
        model_config=ModelConfig(
            str(tiny.model), dtype="float32", attention_backend="torch", max_model_len=64
        ),
        cache_config=CacheConfig(block_size=4, num_gpu_blocks_override=64),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=32, async_scheduling=async_scheduling
        ),
        lora_config=LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1),
    )
    return EngineCore(config)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_deleted_adapter_fails_its_request_and_the_engine_goes_on(
    tiny: Tiny, tmp_path: Path, async_scheduling: bool
) -> None:
    doomed = Path(shutil.copytree(tiny.adapters["poet"], tmp_path / "doomed"))
    loras = {
        "r1": tiny.request("sql"),
        "r2": LoRARequest("doomed", 7, str(doomed)),
        "r3": tiny.request("poet"),
        "r4": None,
    }
    engine = _engine(tiny, async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def add(rid: str) -> None:
        engine.add_request(EngineCoreRequest(rid, PROMPTS[rid], params, 0.0, lora_request=loras[rid]))

    tokens: dict[str, list[int]] = {}
    finished: dict[str, tuple[FinishReason | None, str | None]] = {}

    def step() -> None:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.error)

    try:
        for rid in ("r1", "r2", "r3"):  # each add loads its adapter; host memory keeps one: r2's is evicted
            add(rid)
        step()  # r1 admitted (sql back in host memory); r2 and r3 wait for the one slot
        assert set(tokens) <= {"r1"} and not finished
        shutil.rmtree(doomed)
        for _ in range(100):
            if not engine.has_work:
                break
            step()
        add("r4")  # the engine still serves
        while engine.has_work:
            step()
    finally:
        engine.shutdown()
    reason, error = finished["r2"]
    assert reason == FinishReason.ERROR and tokens.get("r2", []) == []
    assert error is not None and "LoRA adapter 'doomed'" in error and f"{doomed} is not a directory" in error
    for rid, adapter in (("r1", "sql"), ("r3", "poet"), ("r4", None)):
        assert finished[rid] == (FinishReason.LENGTH, None), rid
        assert tokens[rid] == tiny.peft.greedy(adapter, PROMPTS[rid], 6), rid


# ---- through the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doomed_server(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RealServer, Path]]:
    root = tmp_path_factory.mktemp("served")
    doomed = Path(shutil.copytree(tiny.adapters["poet"], root / "doomed"))
    modules = [f"sql={tiny.adapters['sql']}", f"doomed={doomed}", f"poet={tiny.adapters['poet']}"]
    extra = ["--load-format", "auto", "--dtype", "float32", "--enable-lora", "--max-loras", "1", "--max-cpu-loras",
             "1", "--max-lora-rank", "8", "--lora-modules", *modules]  # fmt: skip
    server = start_server(tiny.model, root / "server.log", extra, port=PORT)
    try:
        yield server, doomed
    finally:
        server.stop()


def test_serve_is_ready_only_once_its_adapters_are_loaded(doomed_server: tuple[RealServer, Path]) -> None:
    """start_server returned on the first /health 200: by then the log says ready, after every adapter loaded."""
    lines = doomed_server[0].log.read_text().splitlines()
    ready = next(i for i, line in enumerate(lines) if "treadle is ready" in line)
    for name in ("sql", "doomed", "poet"):
        loaded = next(i for i, line in enumerate(lines) if f"Loaded LoRA adapter {name!r}" in line)
        assert loaded < ready, (name, lines[loaded], lines[ready])


def test_a_deleted_adapter_fails_its_request_and_the_server_goes_on(
    tiny: Tiny, doomed_server: tuple[RealServer, Path]
) -> None:
    """sql runs a long request in the one slot; doomed's and poet's requests wait, and poet's arrival evicts
    doomed from host memory; doomed's directory is deleted: its request fails (400, the adapter and the problem
    named) once admitted, and poet's request and a base-model request still run."""
    server, doomed = doomed_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    greedy: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    results: dict[str, Any] = {}

    def complete(model: str, prompt: list[int], max_tokens: int) -> None:
        try:
            results[model] = client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, **greedy
            )
        except openai.APIError as e:
            results[model] = e

    threads = [threading.Thread(target=complete, args=("sql", PROMPTS["r1"], 250 - len(PROMPTS["r1"])))]
    threads[0].start()
    _wait_for(server, "num_requests_running", 1)
    for model, rid in (("doomed", "r2"), ("poet", "r3")):  # in this order: poet's load evicts doomed
        threads.append(threading.Thread(target=complete, args=(model, PROMPTS[rid], 6)))
        threads[-1].start()
        _wait_for(server, "num_requests_waiting", len(threads) - 1)
    shutil.rmtree(doomed)
    for thread in threads:
        thread.join(timeout=120)
    assert not isinstance(results["sql"], Exception), results["sql"]
    assert isinstance(results["doomed"], openai.BadRequestError), results["doomed"]
    message = results["doomed"].message
    assert "LoRA adapter 'doomed'" in message and f"{doomed} is not a directory" in message, message
    assert results["poet"].choices[0].model_extra["token_ids"] == tiny.peft.greedy("poet", PROMPTS["r3"], 6)
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPTS["r4"], max_tokens=6, **greedy)
    assert base.choices[0].model_extra["token_ids"] == tiny.peft.greedy(None, PROMPTS["r4"], 6)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def gone_server(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RealServer, Path]]:
    """Adapters sql and gone, one of them in host memory at a time."""
    root = tmp_path_factory.mktemp("gone")
    gone = Path(shutil.copytree(tiny.adapters["sql"], root / "gone"))
    extra = ["--load-format", "auto", "--dtype", "float32", "--enable-lora", "--max-loras", "1", "--max-cpu-loras",
             "1", "--max-lora-rank", "8", "--lora-modules", f"sql={tiny.adapters['sql']}", f"gone={gone}"]  # fmt: skip
    server = start_server(tiny.model, root / "server.log", extra, port=PORT + 1 if PORT else None)
    try:
        yield server, gone
    finally:
        server.stop()


def test_a_streamed_request_whose_adapter_is_gone_is_a_400(
    tiny: Tiny, gone_server: tuple[RealServer, Path]
) -> None:
    """gone's directory is deleted after sql's request evicted it from host memory: a streamed chat or completion
    naming it is answered as the unstreamed request is, HTTP 400 with the adapter and the problem named (not a 200
    whose stream carries the error), and the server goes on."""
    server, gone = gone_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    greedy: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    # sql's request loads sql, which evicts gone from host memory
    client.completions.create(model="sql", prompt=PROMPTS["r1"], max_tokens=2, **greedy)
    shutil.rmtree(gone)
    hi: Any = [{"role": "user", "content": "hi"}]
    requests = {
        "chat": lambda stream: client.chat.completions.create(model="gone", messages=hi, max_tokens=4,
                                                              stream=stream),
        "completion": lambda stream: client.completions.create(model="gone", prompt=PROMPTS["r2"], max_tokens=4,
                                                               stream=stream),
    }  # fmt: skip
    for route, request in requests.items():
        errors = []
        for stream in (True, False):
            with pytest.raises(openai.BadRequestError) as info:
                list(request(True)) if stream else request(False)
            errors.append(info.value)
        streamed, whole = errors
        message = streamed.message
        assert "LoRA adapter 'gone'" in message and f"{gone} is not a directory" in message, (route, message)
        assert streamed.body == whole.body, route
    chunks = client.completions.create(model="sql", prompt=PROMPTS["r3"], max_tokens=6, stream=True, **greedy)
    ids = [t for chunk in chunks for c in chunk.choices for t in (c.model_extra or {}).get("token_ids") or []]
    assert ids == tiny.peft.greedy("sql", PROMPTS["r3"], 6)
    assert httpx.get(server.url + "/health").status_code == 200


def _wait_for(server: RealServer, gauge: str, value: int) -> None:
    """Until /metrics shows `treadle:<gauge>` at `value` (the engine's per-step stats feed it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith(f"treadle:{gauge}{{") and float(line.rsplit(" ", 1)[1]) == value:
                return
        time.sleep(0.01)
    raise AssertionError(f"treadle:{gauge} never reached {value}")
