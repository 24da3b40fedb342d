"""A forced harmony tool call, token by token (StructuredOutputsParams.is_header_forced): an optional analysis
message, then the call's header, then the grammar (the arguments) and a stop token:

    [analysis_open_ids  body  analysis_close_ids]  reasoning_end_ids  grammar  stop

The analysis message opens with analysis_open_ids (gpt-oss's `<|channel|>analysis<|message|>`); its body is free
but for the stop tokens (the reply must reach the call) up to the first analysis_close_ids[0] (`<|end|>`), after
which the rest of analysis_close_ids (`<|start|>assistant`) and the header (`<|channel|>commentary
to=functions.NAME <|constrain|>json<|message|>`) are forced one token a step. Without analysis ids the header is
forced from the reply's first token. `stage` reads where a reply stands from its outputs alone, so a preempted
request, or one walking its drafts, needs no other state.
"""

from __future__ import annotations

from dataclasses import dataclass

from treadle_model_runner.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True, slots=True)
class Stage:
    allowed: tuple[int, ...] = ()  # the only tokens allowed next (empty: none forced)
    is_free: bool = False  # inside the analysis body: any token but a stop token
    start: int | None = None  # where the grammar starts in the outputs, once the header is written


def stage(params: StructuredOutputsParams, out: list[int]) -> Stage:
    """Where a forced call's reply stands after `out`. A reply off this shape (which the masks never allow) is
    Stage(): unconstrained from then on."""
    header = params.reasoning_end_ids
    assert header is not None, "a forced header carries its ids"
    opening, closing = params.analysis_open_ids or (), params.analysis_close_ids or ()
    if tuple(out[: len(header)]) == header:
        return Stage(start=len(header))
    n = len(out)
    if n < max(len(header), len(opening)):
        written = tuple(out)
        allowed = {seq[n] for seq in (header, opening) if n < len(seq) and seq[:n] == written}
        if allowed:
            return Stage(allowed=tuple(sorted(allowed)))
    if not opening or tuple(out[: len(opening)]) != opening:
        return Stage()
    try:
        end = out.index(closing[0], len(opening))
    except ValueError:
        return Stage(is_free=True)
    forced = closing[1:] + header
    rest = tuple(out[end + 1 : end + 1 + len(forced)])
    if rest == forced:
        return Stage(start=end + 1 + len(forced))
    return Stage(allowed=(forced[len(rest)],)) if rest == forced[: len(rest)] else Stage()
