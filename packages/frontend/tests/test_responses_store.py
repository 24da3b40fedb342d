"""Stored responses (server/responses_store.py) through the real openai SDK: a response is kept unless `store` is
false, read back and deleted by id (unknown ids are 404s), continued by `previous_response_id` (the prompt holds the
earlier turns and the earlier reply, streamed or not; the previous instructions are not carried over), its input
items listed and paged, and evicted past TREADLE_RESPONSES_STORE_SIZE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import openai_client, start_fake_server


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


@pytest.fixture
def prompts(server: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prompts the engine receives from now on, decoded."""
    seen: list[str] = []
    add = server.engine.add

    def recording(req: Any) -> None:
        seen.append(tokenizer.decode(req.prompt_token_ids))
        add(req)

    monkeypatch.setattr(server.engine, "add", recording)
    return seen


def _reply(server: Any, tokenizer: Any, text: str) -> None:
    server.engine.script = tokenizer.encode(text, add_special_tokens=False)


def test_kept_read_back_and_deleted(client: openai.OpenAI, server: Any) -> None:
    done = client.responses.create(model="tiny", input="Hello", max_output_tokens=4)
    again = client.responses.retrieve(done.id)
    assert again.model_dump() == done.model_dump()
    deleted = httpx.delete(f"{server.url}/v1/responses/{done.id}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": done.id,
        "object": "response",
        "deleted": True,
    }
    for call in (lambda: client.responses.retrieve(done.id), lambda: client.responses.delete(done.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    unkept = client.responses.create(model="tiny", input="Hello", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_the_conversation(
    client: openai.OpenAI, server: Any, tokenizer: Any, prompts: list[str], stream: bool
) -> None:
    _reply(server, tokenizer, "Paris is the capital.")
    try:
        if stream:
            events = list(client.responses.create(model="tiny", instructions="Be brief.",
                                                  input="Capital of France?", stream=True))  # fmt: skip
            first_id = events[-1].response.id  # type: ignore[union-attr]
        else:
            first_id = client.responses.create(
                model="tiny", instructions="Be brief.", input="Capital of France?"
            ).id
        _reply(server, tokenizer, "About two million.")
        second = client.responses.create(
            model="tiny", input="And its population?", previous_response_id=first_id
        )
        _reply(server, tokenizer, "Yes.")
        third = client.responses.create(model="tiny", input=[{"role": "user", "content": "Sure?"}],
                                        previous_response_id=second.id)  # fmt: skip
    finally:
        server.engine.script = None
    assert second.output_text == "About two million." and third.output_text == "Yes."
    first_prompt, second_prompt, third_prompt = prompts[-3:]
    assert (
        "Be brief." in first_prompt and "Be brief." not in second_prompt
    )  # instructions are not carried over
    turns = ["Capital of France?", "Paris is the capital.", "And its population?"]
    assert all(t in second_prompt for t in turns) and "Sure?" not in second_prompt
    positions = [third_prompt.index(t) for t in [*turns, "About two million.", "Sure?"]]
    assert positions == sorted(positions)


def test_an_unknown_previous_response_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_none")
    assert "no stored response with id 'resp_none'" in str(err.value)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_the_newest_are_kept(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_RESPONSES_STORE_SIZE", "2")
    srv, handle = start_fake_server(tokenizer)
    with srv:
        client = openai_client(handle.url)
        ids = [client.responses.create(model="tiny", input="Hi", max_output_tokens=2).id for _ in range(3)]
        client.responses.retrieve(ids[1])  # read: now the newest
        ids.append(client.responses.create(model="tiny", input="Hi", max_output_tokens=2).id)
        kept = []
        for rid in ids:
            with contextlib.suppress(openai.NotFoundError):
                kept.append(client.responses.retrieve(rid).id)
    assert kept == [ids[1], ids[3]]


def test_input_items_list_the_conversation_answered(
    client: openai.OpenAI, server: Any, tokenizer: Any
) -> None:
    """A continued response's input items: the earlier turn, the earlier reply and the new turn, newest first by
    default, paged by limit / after, each with an id and its text as content parts."""
    _reply(server, tokenizer, "Paris is the capital.")
    try:
        first = client.responses.create(model="tiny", input="Capital of France?")
        second = client.responses.create(
            model="tiny", input="And its population?", previous_response_id=first.id
        )
    finally:
        server.engine.script = None

    def texts(page: Any) -> list[str]:
        return [item.content[0].text for item in page.data]

    newest = client.responses.input_items.list(second.id)
    assert texts(newest) == ["And its population?", "Paris is the capital.", "Capital of France?"]
    assert [i.role for i in newest.data] == ["user", "assistant", "user"] and all(i.id for i in newest.data)
    assert newest.data[1].id == first.output[0].id  # the earlier reply, as it was returned
    head = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert texts(head) == ["Capital of France?", "Paris is the capital."] and head.has_more
    rest = client.responses.input_items.list(second.id, order="asc", limit=2, after=head.data[-1].id)
    assert texts(rest) == ["And its population?"] and not rest.has_more
    bad = httpx.get(f"{server.url}/v1/responses/{second.id}/input_items", params={"limit": 101})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_none")
