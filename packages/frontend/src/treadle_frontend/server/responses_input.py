"""The input of a /v1/responses request as chat turns for the template (`to_chat_messages`), and as the items a
stored response keeps (`input_items`).

`input` is a string (one user turn) or a list of items: messages (`{"role", "content"}` with a string or text parts),
`function_call` / `function_call_output` items (an assistant turn's tool_calls and a tool turn, responses_tools.py)
and `reasoning` items (the reasoning_content of the assistant turn right after them); `instructions` become a
leading system turn.
"""

from __future__ import annotations

from typing import Any

from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import ResponsesRequest
from treadle_frontend.server.responses_tools import call_turns
from treadle_frontend.server.tool_calls import template_messages


def to_chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = (
        [{"role": "system", "content": body.instructions}] if body.instructions else []
    )
    if isinstance(body.input, str):
        return [*msgs, {"role": "user", "content": body.input}]
    if not body.input:
        raise APIError(400, "input: at least one input item is required", param="input")
    thought: str | None = None  # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "reasoning":
            thought = _reasoning_text(item)
            continue
        if kind in ("function_call", "function_call_output"):
            for turn in call_turns(body.input, i):
                last = msgs[-1] if msgs else {}
                if turn.get("tool_calls") and last.get("tool_calls") and last.get("content") is None:
                    last["tool_calls"] += turn["tool_calls"]  # calls in a row: one assistant turn
                    turn = last
                else:
                    msgs.append(turn)
                if turn["role"] == "assistant" and thought:
                    turn["reasoning_content"], thought = thought, None
            continue
        if kind != "message" or not isinstance(item.get("role"), str):
            raise APIError(400, f"input[{i}]: only message, reasoning, function_call and function_call_output "
                                "items are supported here", param="input")  # fmt: skip
        turn = {"role": item["role"], "content": _text(item.get("content"), i)}
        if item["role"] == "assistant" and thought:
            turn["reasoning_content"] = thought
        thought = None  # reasoning belongs to the assistant turn right after it
        msgs.append(turn)
    if all(m["role"] == "system" for m in msgs):
        raise APIError(
            400,
            "input: no turn to answer (reasoning items go with the assistant turn after them)",
            param="input",
        )
    return template_messages(msgs)


def _reasoning_text(item: dict[str, Any]) -> str | None:
    """A reasoning item's text (its reasoning_text parts, else its summary's), as chat completions' reasoning_content:
    handed to the chat template with the assistant turn it precedes (tool_calls.template_messages), which renders it
    where the template does (gpt-oss's: before a tool call; Qwen3's: in turns after the last user message)."""
    for key in ("content", "summary"):
        parts = [p for p in item.get(key) or [] if isinstance(p, dict)]
        texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
        if texts:
            return "\n".join(texts)
    return None


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content or []):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            raise APIError(400, f"input[{i}].content[{j}]: only text parts are supported", param="input")
        parts.append(str(part.get("text", "")))
    return "\n".join(parts)


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items (a string is one user message; with previous_response_id, the stored conversation
    first, as `handle` puts it)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return [dict(item) for item in body.input or []]
