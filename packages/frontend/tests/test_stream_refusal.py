"""A streamed request the engine refuses before its first output (a LoRA adapter that fails to load when the request
is admitted; here the fake engine's `reject`) is answered as the same request unstreamed: HTTP 400 with the same
error body, before any stream bytes, on every generating route, through the openai and anthropic SDKs. A client
that leaves while its stream waits for the first output still aborts the request in the engine."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from frontend_helpers import start_fake_server

REASON = "LoRA adapter 'doomed' cannot be loaded: /adapters/doomed is not a directory"
ASK: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    with srv:
        yield handle


def _route(server: Any, route: str) -> Callable[[bool], Any]:
    """The route's request, streamed or not (a stream is read to its end)."""
    # not strict: the SDK's Completion type has no null finish_reason, which every streamed chunk but the last has
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    calls: dict[str, Callable[[bool], Any]] = {
        "chat": lambda stream: oai.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, stream=stream),
        # two prompts: their streams are merged, and either one's refusal fails the request
        "completions": lambda stream: oai.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3,
                                                             stream=stream),
        "responses": lambda stream: oai.responses.create(model="tiny", input="hi", max_output_tokens=3,
                                                         stream=stream),
        "messages": lambda stream: claude.messages.create(model="tiny", max_tokens=3, messages=ASK, stream=stream),
    }  # fmt: skip
    call = calls[route]
    return lambda stream: list(call(True)) if stream else call(False)


@pytest.mark.parametrize("route", ["chat", "completions", "responses", "messages"])
def test_a_stream_refused_before_its_first_output_is_a_400(server: Any, route: str) -> None:
    request = _route(server, route)
    errors = []
    server.engine.reject = REASON
    try:
        for stream in (False, True):
            with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)) as info:
                request(stream)
            errors.append(info.value)
    finally:
        server.engine.reject = None
    whole, streamed = errors
    assert streamed.status_code == whole.status_code == 400
    assert streamed.body == whole.body and REASON in str(streamed.body), (streamed.body, whole.body)
    assert request(True), "the server goes on serving streams"


@pytest.mark.parametrize(
    ("path", "body", "num_requests"),
    [
        ("/v1/chat/completions", {"messages": ASK, "max_tokens": 50, "stream": True}, 1),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 50, "stream": True}, 2),
    ],
)
def test_a_client_gone_before_the_first_output_aborts(
    server: Any, path: str, body: dict[str, Any], num_requests: int
) -> None:
    engine = server.engine
    aborted = engine.num_aborted
    engine.hold = True  # added, then no output: the stream waits for its first
    try:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=httpx.Timeout(10, read=0.5))
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.hold = False
    assert not engine.running and engine.num_aborted == aborted + num_requests
    assert server.llm.num_unfinished == 0
