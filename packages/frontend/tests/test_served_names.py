"""Several served model names (`--served-model-name a b`, as vLLM takes them): /v1/models lists each, a request
may name any of them, and every response carries the first. Driven through the real openai and anthropic SDKs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import start_fake_server

from treadle_frontend.server import ServerConfig


@pytest.fixture(scope="module")
def named_server(tokenizer: Any) -> Iterator[Any]:
    server, handle = start_fake_server(tokenizer, server_options={"more_model_names": ("team/alias", "tiny")})
    with server:
        yield handle


def test_models_lists_every_name_once(named_server: Any) -> None:
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="x", _strict_response_validation=True)
    assert [m.id for m in client.models.list().data] == ["tiny", "team/alias"]


def test_models_retrieve_each_name(named_server: Any) -> None:
    """OpenAI's GET /v1/models/{model} (the SDK's models.retrieve), a name with a slash too; unknown: 404."""
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="x", _strict_response_validation=True)
    for name in ("tiny", "team/alias"):
        card = client.models.retrieve(name)
        assert card.id == name and card.object == "model" and (card.model_extra or {})["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert "does not exist" in str(err.value)


def test_a_request_may_name_any_and_responses_carry_the_first(named_server: Any) -> None:
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="x", _strict_response_validation=True)
    done = client.completions.create(model="team/alias", prompt="Hello", max_tokens=3)
    assert done.model == "tiny" and done.usage is not None and done.usage.completion_tokens == 3
    chat = client.chat.completions.create(
        model="team/alias", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    assert {chunk.model for chunk in chat} == {"tiny"}
    msg = anthropic.Anthropic(base_url=named_server.url, api_key="x").messages.create(
        model="team/alias", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    assert msg.model == "tiny"
    with pytest.raises(openai.NotFoundError, match="serves `tiny`, `team/alias`"):
        client.completions.create(model="other", prompt="Hello", max_tokens=1)


def test_config_checks_the_names() -> None:
    with pytest.raises(ValueError, match="needs served_model_name"):
        ServerConfig(more_model_names=("b",))
    with pytest.raises(ValueError, match="must not be empty"):
        ServerConfig(served_model_name="a", more_model_names=("",))
