"""Tool calls in Kimi-K2's format (`--tool-call-parser kimi_k2`): DeepSeek-V3.1's section in Moonshot's markers,
each call named `functions.NAME:INDEX`, which stays its id. The parser alone, fed whole and in every split into two
pieces (and many into three); and the chat route through the openai SDK with a tokenizer where the markers are
special tokens (a fake engine writes the reply), streamed and not: the calls, and the model's ids."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from frontend_helpers import WEATHER, check_in_any_pieces, openai_client
from tagged_calls import KIMI_ARGS, chat, no_marker_leaks, script, serving, split

from treadle_frontend.server.call_deepseek import KIMI_K2
from treadle_frontend.server.reply import tool_stream

BEGIN, END = KIMI_K2.calls_begin, KIMI_K2.calls_end
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
LEAD = "Let me check both."
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
IDS = ["functions.get_weather:0", "functions.get_time:1"]


def call(call_id: str, args: str) -> list[str]:
    return [KIMI_K2.call_begin, f"{call_id}{KIMI_ARGS}{args}", KIMI_K2.call_end]


def two_calls(begin: list[str]) -> list[str]:
    return [
        f"{LEAD}\n",
        *begin,
        *call(IDS[0], '{"city": "Paris"}'),
        "\n",
        *call(IDS[1], '{"zone": "CET"}'),
        END,
    ]


CASES = [
    ("".join(two_calls([BEGIN])), LEAD, TWO_CALLS),
    # no `functions.` prefix; arguments over lines, a brace inside a string; text after the section
    ("".join([BEGIN, *call("f:3", '{\n "a": "}"\n}'), END, " done"]), "done", [("f", {"a": "}"})]),
    # arguments that are no object: the section stays content, as written
    ("".join([LEAD, BEGIN, *call(IDS[0], "city=Paris"), END]), "".join([LEAD, BEGIN, *call(IDS[0], "city=Paris"), END]),
     []),
    # a name without its index is no call either
    ("".join([BEGIN, *call("functions.f", "{}"), END]), "".join([BEGIN, *call("functions.f", "{}"), END]), []),
]  # fmt: skip


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("kimi_k2", text, (content, calls), step=41)


def test_calls_keep_the_models_ids_and_stream_their_arguments() -> None:
    stream = tool_stream("kimi_k2")
    text = "".join(two_calls([BEGIN]))
    deltas = [d for p in [p for c in text for p in stream.feed(c)] + stream.finish() for d in p.deltas]
    names = ["get_weather", "get_time"]
    assert [(d.call.name, d.call.id) for d in deltas if d.first] == list(zip(names, IDS, strict=True))
    assert "".join(d.arguments for d in deltas if d.index == 0) == '{"city": "Paris"}'
    assert len([d for d in deltas if d.index == 0]) >= len('{"city": "Paris"}')  # a character at a time


@pytest.fixture(scope="module")
def kimi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, "kimi_k2")


@pytest.mark.parametrize(("split_marker", "stream"), [(False, False), (True, True)])
def test_two_calls_after_text(kimi_server: Any, split_marker: bool, stream: bool) -> None:
    begin = split(BEGIN) if split_marker else [BEGIN]
    kimi_server.engine.script = script(kimi_server.tokenizer, two_calls(begin))
    reply = chat(kimi_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:
        assert no_marker_leaks(reply["deltas"], LEAD) and reply["pieces"] > 4


@pytest.mark.parametrize("stream", [False, True])
def test_the_reply_carries_the_models_call_ids(kimi_server: Any, stream: bool) -> None:
    kimi_server.engine.script = script(kimi_server.tokenizer, two_calls([BEGIN]))
    body: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                tools=[WEATHER, CLOCK], max_tokens=200)  # fmt: skip
    client = openai_client(kimi_server.url)
    if not stream:
        message = client.chat.completions.create(**body).choices[0].message
        assert [c.id for c in message.tool_calls or []] == IDS
        return
    chunks = client.chat.completions.create(stream=True, **body)
    ids = [tc.id for chunk in chunks for ch in chunk.choices for tc in ch.delta.tool_calls or [] if tc.id]
    assert ids == IDS
