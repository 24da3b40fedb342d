"""Phi-4-mini's tool-call format (`--tool-call-parser phi4_mini_json`, vLLM's name): the literal word `functools`,
then, right after it, a JSON array of calls,

    functools[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "parameters": {}}]

each call's arguments under "arguments" or "parameters" (vLLM reads both). The word is plain text (Phi-4-mini's
`<|tool_call|>` tokens around it, where the model writes them, are decoded away), so it is only a tag when `[`
follows it at once: `functools` in a sentence, or followed by a space, stays text. The reading is call_granite.py's
under this layout: text before the tag is content (vLLM drops it; here nothing is lost), released as soon as it
cannot be the start of the tag; the array streams as it is written (each call's arguments as the model writes
them), items that cannot stream are read whole when the array closes, an array in which nothing is a call stays in
the content as written (tag included), and text after the `]` is content, a further `functools[` opening further
calls. A reply cut inside the array keeps the calls read, the last one incomplete.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

from treadle_frontend.server.call_granite import GraniteStream, Layout

TAG = "functools"
PHI4_MINI = Layout((TAG,), bare=False, gap=False)


def phi4_mini_stream() -> GraniteStream:
    """The streaming reader of `--tool-call-parser phi4_mini_json`."""
    return GraniteStream(PHI4_MINI)
