"""A Lark grammar through the server, as vLLM clients send one (the openai SDK's extra_body `guided_grammar` or
`structured_outputs.grammar`): it reaches the engine as the request's grammar, and a construct that cannot be
converted is a 400 naming the field. (That the engine's masks then hold a reply to the grammar is
tests/test_e2e_formats_and_tools.py's, on the real engine.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import openai_client, start_fake_server

LARK = 'start: "Paris" | "Lyon" | CITY\nCITY: /[A-Z][a-z]{2,8}/\n'


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    with srv:
        yield handle


def test_a_lark_grammar_reaches_the_engine_and_a_bad_one_is_a_400(server: Any) -> None:
    client = openai_client(server.url)
    sent: list[Any] = []
    add = server.engine.add
    server.engine.add = lambda req: (sent.append(req.sampling_params.structured_outputs), add(req))
    try:
        for extra in ({"guided_grammar": LARK}, {"structured_outputs": {"grammar": LARK}}):
            reply = client.completions.create(model="tiny", prompt="City:", max_tokens=3, extra_body=extra)
            assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.engine.add = add
    assert [(p.kind, p.grammar) for p in sent] == [("grammar", LARK)] * 2
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "City?"}],
            extra_body={"guided_grammar": "start: CITY\nCITY: /(?<=x)[A-Z][a-z]+/\n"},
        )
    assert e.value.param == "guided_grammar", e.value.body
    assert "guided_grammar: Lark grammar line 2 (CITY): a lookbehind (?<=...)" in e.value.message
