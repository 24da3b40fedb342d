"""A forced tool call's reply (constrained JSON: a named function's arguments, or "required"'s array of calls)
read by ForcedToolCalls: fed whole or in any pieces it gives the same calls, and each call streams as written; on
/v1/chat/completions (openai SDK, fake engine) a reply cut by max_tokens is tool_calls, never its JSON as content."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from frontend_helpers import WEATHER, openai_client, start_fake_server, streamed_tool_calls

from treadle_frontend.server.forced_tools import ForcedToolCalls
from treadle_frontend.server.tool_calls import Piece

NAMED = '{"city":"Paris","days":[1,2]}'
REQUIRED = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{}}]'
OTHER_ORDER = (  # the second item names its function last: read whole
    '[{"name":"f","parameters":{"a":1}},{"parameters":{"b":2},"name":"g"},{"name":"h","parameters":{}}]'
)


def _feed(name: str | None, text: str, cuts: list[int]) -> tuple[list[Piece], ForcedToolCalls]:
    forced, pieces = ForcedToolCalls(name), []
    bounds = [0, *cuts, len(text)]
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        pieces += forced.feed(text[a:b], final=k == len(bounds) - 2)
    return pieces, forced


def _calls(pieces: list[Piece]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for p in pieces for c in p.calls]


@pytest.mark.parametrize(
    ("name", "text", "calls"),
    [
        ("get_weather", NAMED, [("get_weather", {"city": "Paris", "days": [1, 2]})]),
        (None, REQUIRED, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        (None, OTHER_ORDER, [("f", {"a": 1}), ("g", {"b": 2}), ("h", {})]),  # g read whole, h after it
    ],
)
def test_any_pieces_give_the_same_calls(name: str | None, text: str, calls: list[Any]) -> None:
    rng = random.Random(len(text))
    splits = [[i] for i in range(len(text) + 1)]
    splits += [sorted(rng.sample(range(len(text)), 5)) for _ in range(30)]
    for cuts in splits:
        pieces, forced = _feed(name, text, cuts)
        assert _calls(pieces) == calls and forced.num_calls == len(calls), cuts
        assert not "".join(p.content for p in pieces), cuts  # the JSON is never content
        deltas = [d for p in pieces for d in p.deltas]
        for index in range(len(calls)):
            own = [d for d in deltas if d.index == index]
            assert own[0].first and own[-1].done
            assert "".join(d.arguments for d in own) == own[0].call.arguments


def test_arguments_stream_as_written() -> None:
    pieces, _ = _feed(None, REQUIRED, list(range(len(REQUIRED))))
    first = [d for p in pieces for d in p.deltas if d.index == 0]
    assert first[0].first and first[0].call.name == "get_weather" and first[0].arguments == "{"
    assert len(first) == len('{"city":"Paris"}') + 1  # every character as it came, then the close
    named, _ = _feed("f", NAMED, list(range(len(NAMED))))
    assert len([d for p in named for d in p.deltas]) == len(NAMED) + 1


def test_a_reply_cut_short() -> None:
    # cut inside the second call's name: only the first is a call
    pieces, forced = _feed(None, REQUIRED[:70], [30])
    assert _calls(pieces) == [("get_weather", {"city": "Paris"})] and forced.num_calls == 1
    assert [c.complete for p in pieces for c in p.calls] == [True]
    pieces, _ = _feed(None, REQUIRED[:40], [30])  # inside the first call's arguments: kept, incomplete
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [
        ("get_weather", REQUIRED[36:40], False)
    ]
    pieces, _ = _feed("f", NAMED[:12], [5])  # a named call's arguments cut short are kept as written
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", NAMED[:12], False)]
    pieces, _ = _feed("f", NAMED, [5])
    assert [c.complete for p in pieces for c in p.calls] == [True]
    pieces, forced = _feed("f", "", [])  # nothing written (max_tokens spent on reasoning): no call
    assert forced.num_calls == 0 and not [c for p in pieces for c in p.calls]


def test_calls_only_never_gives_text() -> None:
    """The routes' forced replies (`calls_only`): cut anywhere, a reply is calls or nothing, never its JSON as
    text; a named call is made even when nothing was written (max_tokens spent on reasoning)."""
    forced = ForcedToolCalls("f", calls_only=True)
    pieces = forced.feed("", final=True)
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", "", False)]
    for cut in range(len(REQUIRED)):
        forced = ForcedToolCalls(None, calls_only=True)
        pieces = forced.feed(REQUIRED[:cut], final=True)
        assert not "".join(p.content for p in pieces), cut
        whole_names = [n for n in ("get_weather", "get_time") if f'"name":"{n}"' in REQUIRED[:cut]]
        assert [c.name for p in pieces for c in p.calls] == whole_names, cut


CUT_REPLIES = {  # tool_choice, the reply the engine writes
    "named": ({"type": "function", "function": {"name": "get_weather"}}, '{"city":"Paris"}'),
    "required": ("required", '[{"name":"get_weather","parameters":{"city":"Paris"}}]'),
}


def _cuts(tokenizer: Any, handle: Any, case: str, reply: str) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """Scripts the fake engine to write `reply`; per cut (1 token .. all): the text written and the calls a cut
    reply must give: the named call with the text as its arguments; "required"'s call once its name is written
    whole, its arguments the text after `"parameters":` ("" before it)."""
    ids = tokenizer.encode(reply, add_special_tokens=False)
    handle.engine.script = ids
    arguments = '{"city":"Paris"}'
    cuts = []
    for cut in range(1, len(ids) + 1):
        written = tokenizer.decode(ids[:cut])
        if case == "named":
            want = [("get_weather", written)]
        else:
            after = written.partition('"parameters":')[2]
            want = [("get_weather", arguments[: len(after)])] if '"name":"get_weather"' in written else []
        cuts.append((cut, written, want))
    return cuts


@pytest.mark.parametrize("case", list(CUT_REPLIES))
def test_a_forced_chat_call_cut_by_max_tokens(tokenizer: Any, case: str) -> None:
    """Cut at every token, whole and streamed: finish_reason length, no content, and tool_calls holding the
    arguments written so far (vLLM returns a cut named call's partial arguments): the named call always;
    "required"'s once its name is written whole, its arguments the text after `"parameters":` ("" before it)."""
    tool_choice, reply = CUT_REPLIES[case]
    srv, handle = start_fake_server(tokenizer)  # a forced call needs no tool-call flags
    with srv:
        client = openai_client(handle.url)
        for cut, written, want in _cuts(tokenizer, handle, case, reply):
            kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                      tools=[WEATHER], tool_choice=tool_choice, max_tokens=cut)  # fmt: skip
            whole = client.chat.completions.create(**kw).choices[0]
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls, _ = streamed_tool_calls(chunks)
            got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
            assert (whole.finish_reason, whole.message.content, got) == ("length", None, want), written
            finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
            content = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
            assert (finish, content, list(calls.values())) == (["length"], "", want), written


@pytest.mark.parametrize("case", list(CUT_REPLIES))
def test_a_forced_responses_call_cut_by_max_output_tokens(tokenizer: Any, case: str) -> None:
    """/v1/responses, as chat above: cut at every token, whole and streamed, the response is incomplete
    (max_output_tokens) and its output the function_call items with the arguments written so far, never the JSON
    as message text."""
    tool_choice, reply = CUT_REPLIES[case]
    if case == "named":
        tool_choice = {"type": "function", "name": "get_weather"}
    tool = {"type": "function", **WEATHER["function"]}
    srv, handle = start_fake_server(tokenizer)
    with srv:
        client = openai_client(handle.url)
        for cut, written, want in _cuts(tokenizer, handle, case, reply):
            kw: dict[str, Any] = dict(model="tiny", input="Weather?", tools=[tool], tool_choice=tool_choice,
                                      max_output_tokens=cut)  # fmt: skip
            whole = client.responses.create(**kw)
            events = list(client.responses.create(stream=True, **kw))
            final = events[-1].response
            for response in (whole, final):
                text = "".join(p.text for i in response.output if i.type == "message" for p in i.content)
                got = [(i.name, i.arguments) for i in response.output if i.type == "function_call"]
                assert (response.status, text, got) == ("incomplete", "", want), written
