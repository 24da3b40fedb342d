"""A conversation made ready for gpt-oss's chat template: one tool call per assistant message.

gpt-oss's template renders an assistant message's first tool call only (a harmony call is a message of its own, to
functions.NAME), and a tool result as from the last call rendered before it. So for a harmony model an assistant
message with several `tool_calls` becomes one message per call, the first keeping its content and reasoning, and
the tool results that follow it are placed each after its call (matched by `tool_call_id`; by position when none
match), so every result is rendered as from the function that returned it. Other messages pass unchanged.
"""

from __future__ import annotations

from typing import Any

from treadle_frontend.server.harmony import HARMONY

_TURN_ONLY = (
    "content",
    "thinking",
    "reasoning_content",
    "reasoning",
    "tool_calls",
)  # the first call's message's


def for_template(messages: list[dict[str, Any]], reasoning_parser: str | None) -> list[dict[str, Any]]:
    """The messages a chat template renders: one call per assistant message when the server reads harmony."""
    return one_call_per_message(messages) if reasoning_parser == HARMONY else messages


def one_call_per_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each multi-call assistant message split into one message per call, its results after
    each (template_messages' output, or any chat messages as dicts)."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        calls = m.get("tool_calls")
        i += 1
        if m.get("role") != "assistant" or not isinstance(calls, list) or len(calls) < 2:
            out.append(m)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        rest = {k: v for k, v in m.items() if k not in _TURN_ONLY}
        turns = [{**m, "tool_calls": calls[:1]}, *({**rest, "tool_calls": [c]} for c in calls[1:])]
        matched = _results_by_call(calls, results)
        for turn, mine in zip(turns, matched, strict=True):
            out += [turn, *mine]
        placed = {id(r) for mine in matched for r in mine}
        out += [r for r in results if id(r) not in placed]  # results naming no call: after the last, as sent
    return out


def _results_by_call(calls: list[Any], results: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each call's results: those whose tool_call_id is its id, or, when no result names a call, the i-th result
    for the i-th call (results past the calls stay unmatched)."""
    ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
    if any(r.get("tool_call_id") in ids for r in results if r.get("tool_call_id") is not None):
        return [[r for r in results if cid is not None and r.get("tool_call_id") == cid] for cid in ids]
    return [[results[k]] if k < len(results) else [] for k in range(len(calls))]
