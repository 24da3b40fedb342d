"""Helpers shared by the frontend tests: input processors, fake engines and a fake-engine server."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeAsyncClient, FakeEngine, FakeSyncClient, fake_request


def make_processor(tokenizer: Any, max_model_len: int = 256, **kwargs: Any) -> Any:
    from treadle_frontend.input_processor import InputProcessor, ModelInfo
    from treadle_frontend.tokenizer import resolve_chat_template

    info = ModelInfo(name="tiny", path=None, max_model_len=max_model_len, vocab_size=len(tokenizer))
    return InputProcessor(tokenizer, info, chat_template=resolve_chat_template(tokenizer, None), **kwargs)


def make_engine(tokenizer: Any, **kwargs: Any) -> FakeEngine:
    specials = set(tokenizer.all_special_ids)
    return FakeEngine(len(tokenizer), specials, tokenizer.eos_token_id, **kwargs)


class FakeServer:
    def __init__(
        self, url: str, engine: FakeEngine, client: FakeAsyncClient, llm: Any, api_key: str | None
    ) -> None:
        self.url, self.engine, self.client, self.llm, self.api_key = url, engine, client, llm, api_key


def start_fake_server(
    tokenizer: Any,
    api_key: str | None = None,
    server_options: dict[str, Any] | None = None,
    **engine_kwargs: Any,
) -> Any:
    from server_harness import ThreadedServer

    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.server import ServerConfig, build_app

    engine = make_engine(tokenizer, **engine_kwargs)
    client = FakeAsyncClient(engine)
    llm = AsyncLLM(client, make_processor(tokenizer), request_factory=fake_request)
    config = ServerConfig(
        host="127.0.0.1",
        api_key=api_key,
        served_model_name="tiny",
        stats_log_interval_s=0.5,
        **(server_options or {}),
    )
    app = build_app(llm, config)
    server = ThreadedServer(app)
    return server, FakeServer(server.url, engine, client, llm, api_key)


__all__ = [
    "FakeAsyncClient",
    "FakeEngine",
    "FakeServer",
    "FakeSyncClient",
    "fake_request",
    "make_engine",
    "make_processor",
    "start_fake_server",
]


def openai_client(url: str, api_key: str = "x") -> Any:
    """The real openai SDK on a test server's /v1, validating every response strictly, with no retries."""
    import openai

    return openai.OpenAI(
        base_url=url + "/v1", api_key=api_key, _strict_response_validation=True, max_retries=0
    )


def streamed_tool_calls(chunks: Any) -> tuple[dict[int, tuple[str, str]], int]:
    """Chat chunks' tool-call deltas put together as OpenAI's clients do: ({index: (name, arguments)}, how many
    deltas carried argument text). A call's first delta must carry its id, type and name, later ones neither."""
    calls: dict[int, tuple[str, str]] = {}
    pieces = 0
    for chunk in chunks:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                assert tc.function is not None
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = (tc.function.name, "")
                else:
                    assert tc.id is None and tc.function.name is None, tc
                name, args = calls[tc.index]
                calls[tc.index] = (name, args + (tc.function.arguments or ""))
                pieces += bool(tc.function.arguments)
    return calls, pieces


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_reply(
    parser: str, parts: list[str], schemas: Any = None
) -> tuple[str | None, list[tuple[str, Any]]]:
    """A reply fed in `parts` through `--tool-call-parser` `parser`'s stream: (content, or None where calls stand
    alone; [(name, arguments as an object)])."""
    from treadle_frontend.server.reply import tool_stream

    stream = tool_stream(parser, schemas)
    pieces = [p for part in parts for p in stream.feed(part)] + stream.finish()
    content, calls = "".join(p.content for p in pieces), [c for p in pieces for c in p.calls]
    return content or (None if calls else content), [(c.name, json.loads(c.arguments)) for c in calls]


def check_in_any_pieces(
    parser: str, text: str, expected: tuple[Any, Any], step: int, schemas: Any = None
) -> None:
    """The reply gives `expected` fed whole, in every split into two pieces, and in every `step`-th three."""
    assert tool_reply(parser, [text], schemas) == expected
    for cut in range(len(text) + 1):
        assert tool_reply(parser, [text[:cut], text[cut:]], schemas) == expected, cut
        for cut2 in range(cut, len(text) + 1, step):
            assert tool_reply(parser, [text[:cut], text[cut:cut2], text[cut2:]], schemas) == expected, (
                cut,
                cut2,
            )


def check_in_random_pieces(parser: str, text: str, expected: tuple[Any, Any], seeds: int = 40) -> None:
    """The reply gives `expected` fed a character at a time and, for each seed, cut at up to 16 random points (some
    pieces empty); every call's deltas are one first, one last, and between them its arguments, in order."""
    from treadle_frontend.server.reply import tool_stream

    splits = [list(range(len(text) + 1))]
    for seed in range(seeds):
        rng = random.Random(seed)
        splits.append(sorted(rng.choices(range(len(text) + 1), k=rng.randint(1, 16))))
    for cuts in splits:
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert tool_reply(parser, parts) == expected, parts
        stream = tool_stream(parser)
        deltas = [d for part in parts for p in stream.feed(part) for d in p.deltas]
        deltas += [d for p in stream.finish() for d in p.deltas]
        for index in {d.index for d in deltas}:
            own = [d for d in deltas if d.index == index]
            assert own[0].first and own[-1].done and not any(d.first or d.done for d in own[1:-1]), own
            assert "".join(d.arguments for d in own) == own[0].call.arguments, own
