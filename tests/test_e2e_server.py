"""End to end: the real server (API process + engine process) through the real openai and anthropic SDKs.

Runs in file order; the last test kills the engine process under load.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from e2e_helpers import API_KEY, CHAT, LLAMA, MODEL_NAME, RealServer, children_of, start_server
from test_server_errors import CASES
from tiny_assets import build_tokenizer_dir


def test_startup_log_and_models(real_server: RealServer, oai: openai.OpenAI) -> None:
    deadline = time.monotonic() + 30  # the platform lines come from a thread after start-up
    while "IR dispatch" not in real_server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = real_server.log.read_text()
    for needle in ("KV cache capacity", "attention backend", "IR dispatch", "ready in", "dtype", "device"):
        assert needle in log, needle
    for process in (
        "engine process",
        "API server",
    ):  # each froze its start-up heap (treadle_engine_core.heap)
        assert re.search(rf"{process}: [1-9]\d* start-up objects frozen", log), process
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_ctrl_c_right_after_start_up_waits_for_the_platform_report(tmp_path: Path) -> None:
    """The platform lines come from a thread that imports torch once the server is up: a Ctrl-C at once lets it
    finish (the lines are logged) and the process exits as on any Ctrl-C, rather than being torn down with the thread inside C++
    code (an abort at exit, seen on a GPU machine)."""
    model = build_tokenizer_dir(tmp_path / "tiny_llama")
    (model / "config.json").write_text(json.dumps(LLAMA))
    server = start_server(model, tmp_path / "server.log", [])
    server.stop()
    log = server.log.read_text()
    # 130: the CLI's exit on Ctrl-C; an abort reads -6
    assert server.proc.returncode in (0, 130), (server.proc.returncode, log[-3000:])
    assert "IR dispatch" in log and "Platform:" in log, log[-3000:]


def test_chat_greedy_stream_equals_non_stream(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    full = oai.chat.completions.create(**kw)
    assert full.usage is not None and full.usage.completion_tokens <= 12
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens,
        full.usage.completion_tokens,
    )
    # the second request reuses the first one's full prompt blocks from the prefix cache
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 16


def test_seeded_sampling_reproducible_and_streamed(oai: openai.OpenAI, oai_lax: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL_NAME, prompt="Hello world", max_tokens=10, temperature=1.0, seed=123
    )
    a = oai.completions.create(**kw).choices[0].text
    b = oai.completions.create(**kw).choices[0].text
    assert a == b
    streamed = "".join(c.choices[0].text for c in oai_lax.completions.create(stream=True, **kw) if c.choices)
    assert streamed == a


def test_logprobs_and_n(oai: openai.OpenAI, oai_lax: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=5,
        n=2,
        seed=1,
        temperature=1.0,
        logprobs=True,
        top_logprobs=3,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        for entry in c.logprobs.content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
            top = [t.logprob for t in entry.top_logprobs]
            assert top == sorted(top, reverse=True)
    echo = oai_lax.completions.create(
        model=MODEL_NAME, prompt="Hello world", max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    lp = echo.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def test_max_logprobs_reaches_the_engine(oai: openai.OpenAI) -> None:
    """`treadle serve --max-logprobs 25` (conftest): the engine process computes 25 top logprobs (above vLLM's
    default of 20) and reports its limit to the API server, which refuses 26 in vLLM's words, naming the field."""
    r = oai.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=2, temperature=0, logprobs=True, top_logprobs=25
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(entry.top_logprobs) == 25 for entry in content)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=26
        )
    error = info.value.response.json()["error"]
    assert error["param"] == "top_logprobs"
    assert error["message"].startswith(
        "Requested sample logprobs of 26, which is greater than max allowed: 25"
    )


def test_stop_string_spanning_tokens(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL_NAME,
        prompt="The capital of",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = oai.completions.create(**kw).choices[0].text
    printable = [i for i in range(1, len(text) - 3) if "\ufffd" not in text[i : i + 3]]
    if not printable:
        pytest.skip("random weights produced no printable 3-character span")
    stop = text[printable[0] : printable[0] + 3]
    r = oai.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_anthropic_messages(real_server: RealServer) -> None:
    client = anthropic.Anthropic(
        base_url=real_server.url, api_key=API_KEY, _strict_response_validation=True, max_retries=0
    )
    kw: dict[str, Any] = dict(
        model=MODEL_NAME, max_tokens=6, messages=CHAT, system="Answer briefly.", extra_body={"temperature": 0}
    )
    m = client.messages.create(**kw)
    prompt = client.messages.count_tokens(
        model=MODEL_NAME, messages=CHAT, system="Answer briefly."
    ).input_tokens
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == prompt
    events = list(client.messages.create(stream=True, **kw))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    start = events[0].message.usage  # the same prompt again: its full blocks come from the prefix cache
    assert start.cache_read_input_tokens and start.input_tokens + start.cache_read_input_tokens == prompt
    assert [e.type for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == m.content[0].text


def test_bad_inputs_are_4xx(real_server: RealServer) -> None:
    statuses = []
    for name, route, body, status in CASES:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        if isinstance(body, str):
            r = httpx.post(
                real_server.url + route, content=body, headers={**headers, "content-type": "application/json"}
            )
        else:
            r = httpx.post(real_server.url + route, json=body, headers=headers)
        statuses.append(r.status_code)
        assert r.status_code == status, (name, r.text)
    assert len(CASES) >= 30 and max(statuses) < 500
    assert httpx.post(
        real_server.url + "/v1/models", headers={"Authorization": "Bearer nope"}
    ).status_code in (401, 405)
    assert (
        httpx.get(real_server.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    )


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def test_disconnect_frees_engine(real_server: RealServer) -> None:
    url = real_server.url
    body = {"model": MODEL_NAME, "prompt": "go " * 30, "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"x-api-key": API_KEY}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert _metric(url, "treadle:num_requests_running") == 1
        busy_kv = _metric(url, "treadle:kv_cache_usage_perc")
        assert busy_kv > 0
    deadline = time.monotonic() + 5
    while _metric(url, "treadle:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the aborted request is still running"
        time.sleep(0.05)
    assert _metric(url, "treadle:kv_cache_usage_perc") < busy_kv


def test_cli_chat_and_complete(real_server: RealServer) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "treadle.cli"]
    url = ["--url", real_server.url + "/v1", "--api-key", API_KEY, "--max-tokens", "5", "--temperature", "0"]
    chat = subprocess.run(
        [*base, "chat", *url, "--system-prompt", "Be brief.", "--quick", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chat.returncode == 0, chat.stderr
    expected = httpx.post(
        real_server.url + "/v1/chat/completions",
        headers={"x-api-key": API_KEY},
        json={
            "model": MODEL_NAME,
            "max_tokens": 5,
            "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        },
    ).json()
    assert chat.stdout == expected["choices"][0]["message"]["content"] + "\n"
    done = subprocess.run(
        [*base, "complete", *url, "--quick", "Hello"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.endswith("\n"), done.stderr
    version = subprocess.run([*base, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("treadle ")


def test_text_offsets_of_multibyte_text(real_server: RealServer) -> None:
    """Byte-level tokens of CJK text: text_offset never decreases, stays inside the text, and a stream gives the
    same offsets as one response (lm-eval finds the continuation by them)."""
    body = {"model": MODEL_NAME, "prompt": "日本語の猫は", "max_tokens": 6, "temperature": 0, "logprobs": 0,
            "echo": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    choice = httpx.post(real_server.url + "/v1/completions", json=body, headers=headers).json()["choices"][0]
    offsets, text = choice["logprobs"]["text_offset"], choice["text"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text) and offsets[0] == 0
    assert len(offsets) > len("日本語の猫は")  # several byte-level tokens per character
    streamed = httpx.post(
        real_server.url + "/v1/completions", json={**body, "stream": True}, headers=headers
    ).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])] == offsets
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


def test_bench_serve(
    real_server: RealServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`treadle bench serve` (vLLM's bench serve) against the real server: vLLM's result block, a strict-JSON
    result without the API key; a wrong model fails its initial test request in one line, as vLLM's does."""
    from treadle import cli

    port = real_server.url.rsplit(":", 1)[1]
    base = ["bench", "serve", "--port", port, "--api-key", API_KEY, "--dataset-name", "random",
            "--num-prompts", "4", "--random-input-len", "12", "--random-output-len", "4", "--random-vocab-size",
            "300", "--ignore-eos", "--max-concurrency", "2"]  # fmt: skip
    out = tmp_path / "results" / "serve.json"  # --result-dir, made if missing, as vLLM's
    assert (
        cli.main([*base, "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name])
        == 0
    )
    printed = capsys.readouterr().out
    assert re.search(r"Successful requests:\s+4 ", printed) and re.search(
        r"Total generated tokens:\s+16 ", printed
    )
    text = out.read_text()
    record = json.loads(text)  # strict: no Infinity
    assert record["completed"] == 4 and record["request_rate"] == "inf" and "Infinity" not in text
    assert record["args"]["api_key"] == "<redacted>" and API_KEY not in text
    assert (record["model_id"], record["num_prompts"], record["backend"]) == (MODEL_NAME, 4, "openai")
    assert record["output_lens"] == [4] * 4 and len(record["ttfts"]) == len(record["itls"]) == 4
    assert record["input_lens"] == [12] * 4 and record["server_version"]
    assert cli.main([*base, "--model", "nope"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # a value that would run another workload: a usage error
        cli.main([*base, "--random-output-len", "0"])
    assert exit_info.value.code == 2
    assert "initial test request to" in caplog.text and "failed: HTTP 404" in caplog.text


def test_zz_engine_killed_under_load(real_server: RealServer) -> None:
    import os
    import signal

    url = real_server.url
    results: list[Any] = []

    def one() -> None:
        body = {"model": MODEL_NAME, "prompt": "load", "max_tokens": 200, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream(
                "POST", url + "/v1/completions", json=body, headers={"x-api-key": API_KEY}, timeout=30
            ) as r:
                results.append("\n".join(r.iter_lines()))
        except httpx.HTTPError as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while _metric(url, "treadle:num_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine = real_server.engine_pid()
    os.kill(engine, signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(url + "/health").status_code != 503:
        assert time.monotonic() - killed < 2.0, "/health did not turn 503 within 2 s"
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    assert all(isinstance(r, httpx.HTTPError) or '"error"' in r or "[DONE]" in r for r in results)
    assert any(isinstance(r, str) and '"error"' in r for r in results), results
    r = httpx.post(
        url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}, headers={"x-api-key": API_KEY}
    )
    assert r.status_code == 503
    server_pid = real_server.proc.pid
    real_server.stop()
    assert real_server.proc.returncode is not None
    assert children_of(server_pid) == []
