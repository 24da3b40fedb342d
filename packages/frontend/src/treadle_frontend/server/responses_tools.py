"""Function tools on /v1/responses, and the output items of a reply (a message, function calls).

Request side: `tools` (`{"type": "function", name, description, parameters}`) reach the chat template as chat
tools; input items `function_call` (a call the model made) and `function_call_output` (its result) become an
assistant turn's `tool_calls` and a `tool` turn; a `reasoning` item sent back becomes the `reasoning_content` of
the assistant turn after it (the template decides where it shows: gpt-oss's before a tool call). Reply side: calls are read from the reply by the server's tool
parser (`--enable-auto-tool-choice`, tool_choice auto) or forced by constrained decoding (`tool_choice`
"required" or `{"type": "function", "name"}`, no flag needed), as on chat completions. Each call is a
`function_call` output item; text is a `message` item before them, and a reasoning block (`--reasoning-parser`)
a `reasoning` item first. `ItemStream` writes the streamed events of those items, opening the reasoning and the
message items on their first text and each call's item on its first delta; the call's arguments stream as the
model writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treadle_frontend.server.common import new_id
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.harmony import HARMONY, reasoning_token_count
from treadle_frontend.server.reply import END
from treadle_frontend.server.tool_calls import CallDelta, ToolCall


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}]: only function tools (type function, with a name) are served here",
                           param="tools")  # fmt: skip
        fn = {"name": tool["name"], "description": tool.get("description") or "",
              "parameters": tool.get("parameters") or {"type": "object"}}  # fmt: skip
        out.append({"type": "function", "function": fn})
    return out


def forced_choice(tool_choice: Any) -> Any:
    """tool_choice as chat completions spell it, when it forces a call (else None); 400 for anything but none,
    auto, required or a function ({"type": "function", "name": ...})."""
    if tool_choice == "required":
        return "required"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        return {"type": "function", "function": {"name": tool_choice.get("name")}}
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    raise APIError(400, f"tool_choice {tool_choice!r}: one of none, auto, required or a function "
                        '({"type": "function", "name": ...})', param="tool_choice")  # fmt: skip


def call_turns(items: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """Input item i, a function_call or its output, as chat turns (calls in a row join one assistant turn)."""
    item = items[i]
    if item.get("type") == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        return [{"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text}]
    if not isinstance(item.get("name"), str):
        raise APIError(400, f"input[{i}]: a function_call needs its name", param="input")
    fn = {"name": item["name"], "arguments": item.get("arguments") or "{}"}
    return [{"role": "assistant", "content": None,
             "tool_calls": [{"id": str(item.get("call_id", "")), "type": "function", "function": fn}]}]  # fmt: skip


def call_item(call: ToolCall, item_id: str) -> dict[str, Any]:
    """A function_call output item; "incomplete" when the reply ended inside the call."""
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": "completed" if call.complete else "incomplete"}  # fmt: skip


def part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message(mid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [part(text)]
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(rid: str, text: str | None, status: str) -> dict[str, Any]:
    """A thinking model's reasoning block (`--reasoning-parser`) as a `reasoning` output item."""
    content = [] if text is None else [reasoning_part(text)]
    return {"id": rid, "type": "reasoning", "summary": [], "content": content, "status": status}


def reasoning_tokens(
    tokenizer: Any, token_ids: list[int], has_reasoning: bool, reasoning_parser: str | None = None
) -> int:
    """Output tokens up to the end of the reasoning block: the fewest whose text holds `</think>` (all of them
    when the block never closed; 0 without a block or a tokenizer); a harmony reply's: those of its analysis
    messages."""
    if not has_reasoning or tokenizer is None or not token_ids:
        return 0
    if reasoning_parser == HARMONY:
        return reasoning_token_count(tokenizer, token_ids)

    def closed(k: int) -> bool:
        return END in tokenizer.decode(token_ids[:k], skip_special_tokens=False)

    if not closed(len(token_ids)):
        return len(token_ids)
    lo, hi = 1, len(token_ids)  # the text of the first hi tokens holds the tag, so does every longer prefix
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if closed(mid) else (mid + 1, hi)
    return lo


class ItemStream:
    """The output items' events, in order; `items` collects each item once it is done."""

    def __init__(self, event: Callable[..., str]) -> None:
        self.event = event
        self.items: list[dict[str, Any]] = []
        self._mid: str | None = None  # the open message item
        self._text = ""
        self._rid: str | None = None  # the open reasoning item
        self._call: tuple[str, int] | None = None  # the open function_call item: (id, output index)
        self._reasoning = ""

    def reasoning(self, text: str) -> list[str]:
        if not text:
            return []
        events = []
        if self._rid is None:
            self._rid, self._reasoning = new_id("rs_"), ""
            index = len(self.items)
            events += [self.event("response.output_item.added", output_index=index,
                                  item=reasoning_item(self._rid, None, "in_progress")),
                       self.event("response.content_part.added", part=reasoning_part(""),
                                  **self._where(self._rid))]  # fmt: skip
        self._reasoning += text
        return [*events, self.event("response.reasoning_text.delta", delta=text, **self._where(self._rid))]

    def close_reasoning(self, status: str = "completed") -> list[str]:
        """Finish the open reasoning item (if any): the reply went on to text or calls, or ended."""
        if self._rid is None:
            return []
        where, text = self._where(self._rid), self._reasoning
        item = reasoning_item(self._rid, text, status)
        self._rid = None
        self.items.append(item)
        return [self.event("response.reasoning_text.done", text=text, **where),
                self.event("response.content_part.done", part=reasoning_part(text), **where),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]  # fmt: skip

    def text(self, text: str) -> list[str]:
        if not text:
            return []
        events = self.close_reasoning()
        if self._mid is None:
            self._mid, self._text = new_id("msg_"), ""
            index = len(self.items)
            events += [self.event("response.output_item.added", output_index=index,
                                  item=message(self._mid, None, "in_progress")),
                       self.event("response.content_part.added", part=part(""), **self._where(self._mid))]  # fmt: skip
        self._text += text
        return [*events, self.event("response.output_text.delta", delta=text, logprobs=[],
                                    **self._where(self._mid))]  # fmt: skip

    def call(self, delta: CallDelta) -> list[str]:
        """A call's delta: its first adds a function_call item (empty arguments, in progress), its argument text
        goes out as `function_call_arguments.delta` events, its last completes the item."""
        events = []
        if delta.first:
            events += [*self.close_reasoning(), *self.close("completed")]
            self._call = (new_id("fc_"), len(self.items))
        assert self._call is not None
        item_id, index = self._call
        where = {"item_id": item_id, "output_index": index}
        if delta.first:
            opened = {**call_item(delta.call, item_id), "arguments": "", "status": "in_progress"}
            events.append(self.event("response.output_item.added", output_index=index, item=opened))
        if delta.arguments:
            events.append(
                self.event("response.function_call_arguments.delta", delta=delta.arguments, **where)
            )
        if delta.done:
            item = call_item(delta.call, item_id)
            self.items.append(item)
            self._call = None
            events += [self.event("response.function_call_arguments.done", arguments=delta.call.arguments, **where),
                       self.event("response.output_item.done", output_index=index, item=item)]  # fmt: skip
        return events

    def finish(self, status: str) -> list[str]:
        """Close the open item; a reply with no item at all still gets an (empty) message item."""
        if self._rid is not None:  # the reply ended inside its reasoning block
            return self.close_reasoning(status)
        if self._mid is None and not self.items:
            self._mid, self._text = new_id("msg_"), ""
            opening = [self.event("response.output_item.added", output_index=0,
                                  item=message(self._mid, None, "in_progress")),
                       self.event("response.content_part.added", part=part(""), **self._where(self._mid))]  # fmt: skip
            return [*opening, *self.close(status)]
        return self.close(status)

    def close(self, status: str) -> list[str]:
        """Finish the open message item (if any)."""
        if self._mid is None:
            return []
        where, text = self._where(self._mid), self._text
        item = message(self._mid, text, status)
        self._mid = None
        self.items.append(item)
        return [self.event("response.output_text.done", text=text, logprobs=[], **where),
                self.event("response.content_part.done", part=part(text), **where),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]  # fmt: skip

    def _where(self, item_id: str) -> dict[str, Any]:
        """The open item's place (an open item is always the next one in `items`)."""
        return {"item_id": item_id, "output_index": len(self.items), "content_index": 0}
