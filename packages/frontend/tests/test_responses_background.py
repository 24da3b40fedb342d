"""Background responses of /v1/responses (server/responses_background.py) through the real openai SDK: created queued
and polled to the same reply as an unstreamed request, cancelled in flight (its engine request aborted) or after it
ended (unchanged), failed with an error object, deleted while running, streamed and resumed after a sequence number;
`store: false`, a continuation of a running response and a cancel of what cannot be cancelled are refused, a client
that leaves does not stop one, and the server's shutdown cancels those still running."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import openai_client, start_fake_server

from treadle_frontend.server.responses_store import ResponseStore

RUNNING = ("queued", "in_progress")


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


@pytest.fixture
def slow(server: Any) -> Iterator[Any]:
    """The engine makes a token every 20 ms (a 200-token reply runs for seconds); the engine is idle after."""
    server.client.step_delay = 0.02
    try:
        yield server
    finally:
        server.client.step_delay = 0.002
        server.engine.hold = False
        _wait(lambda: not server.engine.running, "the engine is idle")


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _polled(client: openai.OpenAI, rid: str) -> Any:
    """The response once it has ended."""
    deadline = time.monotonic() + 10
    while (response := client.responses.retrieve(rid)).status in RUNNING:
        assert time.monotonic() < deadline, f"{rid} is still {response.status}"
        time.sleep(0.02)
    return response


def test_polled_to_the_unstreamed_reply(client: openai.OpenAI, server: Any) -> None:
    ask: Any = {"model": "tiny", "input": "Tell me a story", "temperature": 0, "max_output_tokens": 12}
    # the engine makes nothing yet: the create cannot wait for the reply
    server.engine.hold = True
    try:
        created = client.responses.create(**ask, background=True)
        assert created.status == "queued" and created.output == [] and created.background is True
        assert client.responses.retrieve(created.id).status in RUNNING
    finally:
        server.engine.hold = False
    done = _polled(client, created.id)
    direct = client.responses.create(**ask)
    assert done.status == direct.status == "incomplete" and done.incomplete_details is not None
    assert done.output_text == direct.output_text and done.output_text
    assert [o.type for o in done.output] == ["message"] and done.error is None and done.background is True
    assert done.usage is not None and direct.usage is not None
    assert done.usage.output_tokens == direct.usage.output_tokens == 12
    # cancelling an ended background response returns it unchanged
    assert client.responses.cancel(created.id).model_dump() == done.model_dump()
    assert client.responses.retrieve(created.id).model_dump() == done.model_dump()
    # an ended one is continued as any stored response
    follow = client.responses.create(
        model="tiny", input="More", previous_response_id=created.id, max_output_tokens=2
    )
    assert follow.status == "incomplete"


def test_cancel_in_flight_aborts_the_engine_request(client: openai.OpenAI, slow: Any) -> None:
    aborted = slow.engine.num_aborted
    created = client.responses.create(model="tiny", input="Go on", max_output_tokens=200, background=True)
    _wait(lambda: any(len(r.output) >= 3 for r in slow.engine.running.values()), "the reply is being made")
    assert client.responses.retrieve(created.id).status == "in_progress"
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.output == [] and cancelled.error is None
    # aborted in the engine before the cancel answered: nothing keeps generating
    assert not slow.engine.running and slow.engine.num_aborted == aborted + 1
    assert httpx.get(slow.url + "/load").json() == {"server_load": 0}
    # cancelling again (idempotent) and reading it back give the same cancelled response
    assert client.responses.cancel(created.id).model_dump() == cancelled.model_dump()
    assert client.responses.retrieve(created.id).model_dump() == cancelled.model_dump()


def test_what_cannot_be_cancelled(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.cancel("resp_unknown")
    # the store's 404, not a missing route's
    assert "no stored response with id 'resp_unknown'" in unknown.value.message
    answered = client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as synchronous:
        client.responses.cancel(answered.id)
    assert "background" in synchronous.value.message
    assert client.responses.retrieve(answered.id).status == "incomplete"


def test_background_needs_the_store(client: openai.OpenAI, server: Any) -> None:
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "background": True}
    r = httpx.post(server.url + "/v1/responses", json={**body, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background", r.text
    assert "store" in r.json()["error"]["message"]
    kept = httpx.post(server.url + "/v1/responses", json={**body, "store": True})
    assert kept.status_code == 200 and kept.json()["status"] == "queued", kept.text
    assert _polled(client, kept.json()["id"]).status == "incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_response_has_its_error(client: openai.OpenAI, server: Any, stream: bool) -> None:
    server.engine.reject = "grammar rejected by the engine (test)"
    try:
        ask: Any = {"model": "tiny", "input": "Hi", "max_output_tokens": 4, "background": True}
        if stream:
            events = list(client.responses.create(**ask, stream=True))
            assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
            assert [e.sequence_number for e in events] == [0, 1, 2]
            rid = events[0].response.id  # type: ignore[union-attr]
        else:
            rid = client.responses.create(**ask).id
        failed = _polled(client, rid)
    finally:
        server.engine.reject = None
    assert failed.status == "failed" and failed.output == []
    assert failed.error is not None and failed.error.code == "server_error"
    assert "grammar rejected by the engine (test)" in failed.error.message


def test_a_running_response_cannot_be_continued_yet(client: openai.OpenAI, slow: Any) -> None:
    slow.engine.hold = True
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=50, background=True)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="tiny", input="And?", previous_response_id=first.id, max_output_tokens=2
        )
    assert first.id in refused.value.message and "previous_response_id" in refused.value.message
    slow.engine.hold = False
    assert client.responses.cancel(first.id).status == "cancelled"


def test_delete_cancels_a_running_response(client: openai.OpenAI, slow: Any) -> None:
    aborted = slow.engine.num_aborted
    created = client.responses.create(model="tiny", input="Go on", max_output_tokens=200, background=True)
    _wait(lambda: bool(slow.engine.running), "the request reached the engine")
    client.responses.delete(created.id)
    assert not slow.engine.running and slow.engine.num_aborted == aborted + 1
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_streamed_and_resumed_after_a_sequence_number(client: openai.OpenAI, slow: Any) -> None:
    aborted = slow.engine.num_aborted
    ask: Any = {"model": "tiny", "input": "Stream it", "max_output_tokens": 60, "background": True}
    stream = client.responses.create(**ask, stream=True)
    events = iter(stream)
    head = [next(events) for _ in range(5)]
    # the client leaves: the response goes on
    stream.close()
    assert head[0].type == "response.created" and head[0].response.status == "queued"  # type: ignore[union-attr]
    assert [e.sequence_number for e in head] == list(range(5))
    rid = head[0].response.id  # type: ignore[union-attr]
    assert client.responses.retrieve(rid).status == "in_progress" and slow.engine.running
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=head[-1].sequence_number))
    assert [e.sequence_number for e in rest] == list(range(5, 5 + len(rest)))
    assert rest[-1].type == "response.incomplete" and slow.engine.num_aborted == aborted
    text = "".join(e.delta for e in [*head, *rest] if e.type == "response.output_text.delta")
    final = client.responses.retrieve(rid)
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens == 60
    assert final.model_dump() == rest[-1].response.model_dump()  # type: ignore[union-attr]
    # an ended response replays whole, or from any point
    again = list(client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in [*head, *rest]]
    assert list(client.responses.retrieve(rid, stream=True, starting_after=len(again) - 1)) == []


def test_a_cancelled_stream_ends(client: openai.OpenAI, slow: Any) -> None:
    ask: Any = {"model": "tiny", "input": "Go on", "max_output_tokens": 200, "background": True}
    stream = client.responses.create(**ask, stream=True)
    events = iter(stream)
    head = [next(events) for _ in range(5)]
    rid = head[0].response.id  # type: ignore[union-attr]
    assert client.responses.cancel(rid).status == "cancelled" and not slow.engine.running
    # the live stream ends, as does a replay: no event after the cancel
    rest = list(events)
    replay = list(client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in [*head, *rest]]
    assert {e.type for e in rest} <= {"response.output_text.delta"}


def test_only_a_streamed_background_response_streams_again(client: openai.OpenAI) -> None:
    created = client.responses.create(model="tiny", input="Hi", max_output_tokens=3, background=True)
    _polled(client, created.id)
    with pytest.raises(openai.BadRequestError) as refused:
        list(client.responses.retrieve(created.id, stream=True, starting_after=0))
    assert "stream" in refused.value.message


def test_shutdown_cancels_running_responses(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    srv, handle = start_fake_server(tokenizer)
    handle.client.step_delay = 0.02
    with srv:
        client = openai_client(handle.url)
        rid = client.responses.create(model="tiny", input="Go", max_output_tokens=200, background=True).id
        _wait(lambda: bool(handle.engine.running), "the request reached the engine")
    assert not handle.engine.running and handle.engine.num_aborted == 1
    assert any(f"Cancelled background response {rid}" in r.getMessage() for r in caplog.records)
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING or "destroyed" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def test_a_running_response_is_not_evicted() -> None:
    store = ResponseStore(1)
    running = {"id": "resp_bg", "status": "in_progress", "output": []}
    store.put(running, [])
    store.put({"id": "resp_a", "status": "completed", "output": []}, [])
    # past the capacity while one runs
    assert "resp_bg" in store and "resp_a" in store
    store.update({**running, "status": "completed"})
    assert "resp_bg" in store and "resp_a" not in store
