"""A streaming client that goes away after the first output aborts its request, and the server logs it once at INFO,
as vLLM logs an abort: the request id the client saw, the endpoint, and the output tokens streamed so far. Chat,
completions and responses through the real openai SDK, messages through the real anthropic SDK, each closing its
stream after a few events; a stream read to its end logs nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import start_fake_server

LOGGER = "treadle_frontend.server.streams"
MAX_TOKENS = 200


def _logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_leaving_mid_stream_is_logged_once_with_its_request(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server, h = start_fake_server(tokenizer)
    h.client.step_delay = 0.01
    generated: dict[str, int] = {}  # engine request id -> tokens it had made when aborted
    abort = h.engine.abort

    def recording_abort(ids: list[str]) -> None:
        generated.update({rid: len(h.engine.running[rid].output) for rid in ids if rid in h.engine.running})
        abort(ids)

    h.engine.abort = recording_abort
    messages = [{"role": "user", "content": "go"}]
    with server:
        # not openai_client's strict validation: the SDK's Completion model has no null finish_reason for chunks
        oa = openai.OpenAI(base_url=h.url + "/v1", api_key="x", max_retries=0)
        claude = anthropic.Anthropic(base_url=h.url, api_key="x", max_retries=0)

        def chat(n: int) -> Any:
            return oa.chat.completions.create(model="tiny", messages=messages, max_tokens=n, stream=True)

        def completions(n: int) -> Any:
            return oa.completions.create(model="tiny", prompt="go", max_tokens=n, stream=True)

        def responses(n: int) -> Any:
            return oa.responses.create(model="tiny", input="go", max_output_tokens=n, stream=True)

        def claude_messages(n: int) -> Any:
            return claude.messages.create(model="tiny", messages=messages, max_tokens=n, stream=True)

        cases: dict[str, tuple[Callable[[int], Any], Callable[[Any], str | None]]] = {
            "/v1/chat/completions": (chat, lambda e: e.id),
            "/v1/completions": (completions, lambda e: e.id),
            "/v1/responses": (responses, lambda e: e.response.id if e.type == "response.created" else None),
            "/v1/messages": (claude_messages, lambda e: e.message.id if e.type == "message_start" else None),
        }
        for num_left, (path, (start, reply_id)) in enumerate(cases.items(), start=1):
            stream = start(MAX_TOKENS)
            events = iter(stream)
            seen = [reply_id(next(events)) for _ in range(5)]  # the first output and a few more events
            stream.close()
            _wait(lambda k=num_left: h.engine.num_aborted == k, f"{path}: the request is aborted")
            _wait(lambda k=num_left: len(_logged(caplog)) == k, f"{path}: the abort is logged")
            rid = next(i for i in seen if i)
            record = _logged(caplog)[-1]
            assert record.levelno == logging.INFO
            prefix = f"Aborted request {rid}: the client disconnected from {path} mid-stream, after "
            message = record.getMessage()
            assert message.startswith(prefix) and message.endswith(" output tokens"), message
            num_streamed = int(message.removeprefix(prefix).split()[0])
            (made,) = [n for engine_id, n in generated.items() if engine_id.startswith(rid)]
            assert 1 <= num_streamed <= made < MAX_TOKENS, (path, num_streamed, made)
            generated.clear()
        for path, (start, _) in cases.items():  # read to the end: nothing aborted, nothing logged
            assert len(list(start(3))) > 1, path
        time.sleep(0.3)
        assert h.engine.num_aborted == len(cases) and len(_logged(caplog)) == len(cases)
