"""gpt-oss's harmony format read without a server: the reply split into reasoning, content and tool calls, fed
whole and in every split into two pieces (and many into three); which parser a gpt_oss model gets; the reasoning
a client sends back handed to the template as `thinking`; the analysis tokens counted for usage."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from treadle_frontend.server import ServerConfig
from treadle_frontend.server.harmony import HARMONY, Header
from treadle_frontend.server.reply import ReplyParser, keeps_special_tokens, parse_whole
from treadle_frontend.server.tool_calls import template_messages

ANALYSIS = "<|channel|>analysis<|message|>The user wants Paris' weather.<|end|>"
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>"
PARIS = [("get_weather", {"city": "Paris"})]
THOUGHT = "The user wants Paris' weather."
# (reasoning parser, tool parser, reply text, (reasoning, content, calls))
CASES = [
    (HARMONY, None, ANALYSIS + FINAL, (THOUGHT, "It is sunny in Paris.", [])),
    (HARMONY, None, ANALYSIS + FINAL.removesuffix("<|return|>"), (THOUGHT, "It is sunny in Paris.", [])),
    (HARMONY, "openai", ANALYSIS + CALL, (THOUGHT, None, PARIS)),
    (HARMONY, "openai", ANALYSIS + CALL + "<|call|>", (THOUGHT, None, PARIS)),
    # the recipient before the channel, a bare content type; a preamble on commentary is content
    (
        HARMONY,
        "openai",
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f"
        "<|channel|>commentary json<|message|>{}<|call|>",
        (None, "Checking.", [("f", {})]),
    ),
    (
        HARMONY,
        "openai",
        ' to=functions.f<|channel|>commentary<|message|>{"a": [1, "}"]}',
        (None, None, [("f", {"a": [1, "}"]})]),
    ),
    (HARMONY, None, ANALYSIS + CALL, (THOUGHT, None, [])),  # calls not read: dropped, never content
    (None, "openai", ANALYSIS + CALL, (None, None, PARIS)),  # reasoning not read: dropped
    (
        HARMONY,
        "openai",
        ANALYSIS + CALL + "<|call|>" + CALL.replace("Paris", "Lyon"),
        (THOUGHT, None, [*PARIS, ("get_weather", {"city": "Lyon"})]),
    ),
    # a built-in tool's call is neither content nor a call of the request's tools
    (HARMONY, "openai", "<|channel|>analysis to=python<|message|>print(1)<|call|>", (None, "", [])),
    (HARMONY, None, "No header at all <3", (None, "No header at all <3", [])),
    (HARMONY, None, '{"a": 1}', (None, '{"a": 1}', [])),  # a reply constrained from its first token
    (HARMONY, None, "to", (None, "to", [])),  # what might have opened a header, released at the end
    (HARMONY, None, ANALYSIS + "<|start|>assistant<|channel|>fin", (THOUGHT, None, [])),  # a header cut short
    (HARMONY, None, "<|channel|>analysis<|message|>cut by max_tokens", ("cut by max_tokens", None, [])),
    (
        HARMONY,
        None,
        "<|channel|>final<|message|>a <|constrain|>b<|message|>c",
        (None, "a bc", []),
    ),  # stray markers
    (HARMONY, None, "<|channel|>final<|message|>x < y <| z", (None, "x < y <| z", [])),
]


def _summary(reasoning: Any, content: Any, calls: list[Any]) -> tuple[Any, Any, list[Any]]:
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls]


def _fed(rp: str | None, tools: str | None, parts: list[str]) -> tuple[Any, Any, list[Any]]:
    parser = ReplyParser(rp, tools)
    pieces = [p for k, part in enumerate(parts) for p in parser.feed(part, final=k == len(parts) - 1)]
    reasoning, content = "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)
    calls = [c for p in pieces for c in p.calls]
    assert parser.num_calls == len(calls)
    return _summary(reasoning or None, content or (None if calls or reasoning else content), calls)


@pytest.mark.parametrize(("rp", "tools", "text", "expected"), CASES)
def test_whole_and_in_any_pieces(rp: str | None, tools: str | None, text: str, expected: Any) -> None:
    assert _summary(*parse_whole(text, rp, tools)) == expected
    for cut in range(len(text) + 1):
        assert _fed(rp, tools, [text[:cut], text[cut:]]) == expected, cut
        for cut2 in range(cut, len(text) + 1, 7):
            assert _fed(rp, tools, [text[:cut], text[cut:cut2], text[cut2:]]) == expected, (cut, cut2)


def test_a_call_streams_and_ends() -> None:
    """The call opens with its name once the header is read, its arguments come as written, and it is complete
    when they parse; a call cut short keeps what was written, incomplete."""
    parser = ReplyParser(HARMONY, "openai")
    pieces = [p for c in ANALYSIS + CALL for p in parser.feed(c)] + parser.feed("", final=True)
    deltas = [d for p in pieces for d in p.deltas]
    assert deltas[0].first and deltas[0].call.name == "get_weather" and deltas[0].arguments == ""
    assert "".join(d.arguments for d in deltas) == '{"city":"Paris"}' and len(deltas) > 10
    assert deltas[-1].done and deltas[-1].call.complete
    assert not any("<|" in p.reasoning + p.content for p in pieces)
    cut = ReplyParser(HARMONY, "openai")
    calls = [c for p in cut.feed(ANALYSIS + CALL[:-5], final=True) for c in p.calls]
    assert [(c.name, c.arguments, c.complete) for c in calls] == [("get_weather", '{"city":"Pa', False)]


def test_headers() -> None:
    read = Header.read
    assert read("<|channel|>commentary to=functions.f <|constrain|>json") == Header(
        "commentary", "functions.f"
    )
    assert read("assistant to=functions.f<|channel|>commentary json") == Header("commentary", "functions.f")
    assert read("assistant<|channel|>analysis") == Header("analysis", None)
    assert read("assistant") == Header(None, None)


def test_config_picks_harmony_for_gpt_oss() -> None:
    assert ServerConfig().for_model("gpt_oss").reasoning_parser == HARMONY
    assert ServerConfig().for_model("llama").reasoning_parser is None
    assert ServerConfig(reasoning_parser="qwen3").for_model("gpt_oss").reasoning_parser == "qwen3"  # as named
    tools = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="openai").for_model("gpt_oss")
    assert (tools.reasoning_parser, tools.reply_tool_parser(True)) == (HARMONY, "openai")
    with pytest.raises(ValueError, match="--tool-call-parser openai, not 'hermes'"):
        ServerConfig(tool_call_parser="hermes").for_model("gpt_oss")
    with pytest.raises(ValueError, match="whose tool calls only --tool-call-parser openai reads"):
        ServerConfig(reasoning_parser=HARMONY, tool_call_parser="hermes")
    with pytest.raises(ValueError, match="whose reasoning only --reasoning-parser openai_gptoss reads"):
        ServerConfig(reasoning_parser="qwen3", tool_call_parser="openai")
    assert keeps_special_tokens(HARMONY, None) and keeps_special_tokens(None, "openai")
    assert not keeps_special_tokens("qwen3", "hermes")


def test_model_type_is_read_from_config_json(tmp_path: Any) -> None:
    from treadle_frontend.engine_factory import model_type

    assert model_type(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"]})
    )
    assert model_type(tmp_path) == "gpt_oss"
    (tmp_path / "config.json").write_text("[1, 2]")
    assert model_type(tmp_path) is None


def test_reasoning_sent_back_is_thinking_for_the_template() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    turns = [
        {"role": "assistant", "content": "", "reasoning_content": "plan", "tool_calls": [call]},
        {"role": "assistant", "content": "Done.", "reasoning": "why"},
        # a tool-call turn with content: the template takes one or the other, so the content stays alone
        {"role": "assistant", "content": "Checking.", "reasoning_content": "plan", "tool_calls": [call]},
        {"role": "assistant", "content": "x", "reasoning_content": "r", "thinking": "kept"},
    ]
    out = template_messages(turns)
    assert [m.get("thinking") for m in out] == ["plan", "why", None, "kept"]
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_reasoning_tokens_are_the_analysis_messages() -> None:
    """Counted on token ids: every analysis message's tokens, header to terminator, and nothing else."""
    from treadle_frontend.server.harmony import reasoning_token_count

    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]

    class Words:
        """A tokenizer whose tokens are the markers and single words."""

        def __init__(self) -> None:
            self.vocab = {m: i for i, m in enumerate(markers)}

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

        def ids(self, text: str) -> list[int]:
            for m in markers:
                text = text.replace(m, f" {m} ")
            return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            words = {i: w for w, i in self.vocab.items()}
            return " ".join(words[i] for i in ids)

    tok = Words()
    analysis = "<|channel|>analysis<|message|>one two three<|end|>"
    second = "<|start|>assistant<|channel|>analysis<|message|>four<|end|>"
    reply = analysis + "<|start|>assistant<|channel|>commentary<|message|>pre<|end|>" + second + FINAL
    expected = len(tok.ids(analysis)) + len(tok.ids(second))
    assert reasoning_token_count(tok, tok.ids(reply)) == expected == 14
    assert reasoning_token_count(tok, tok.ids(FINAL)) == 0
    assert reasoning_token_count(tok, tok.ids(analysis[:-7])) == len(tok.ids(analysis)) - 1  # never closed


def test_pieces_keep_their_order() -> None:
    """Reasoning after content in one feed stays after it (a piece is reasoning, then content, then calls)."""
    text = "<|channel|>final<|message|>A<|end|><|start|>assistant<|channel|>analysis<|message|>B<|end|>"
    pieces = ReplyParser(HARMONY, None).feed(text, final=True)
    order = [("r", p.reasoning) if p.reasoning else ("c", p.content) for p in pieces]
    assert order == [("c", "A"), ("r", "B")]
    assert list(itertools.chain.from_iterable(p.deltas for p in pieces)) == []
