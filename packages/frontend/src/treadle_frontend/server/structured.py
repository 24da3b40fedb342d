"""A request's structured-output constraint, from any of the ways OpenAI and vLLM clients ask for one.

`response_format` (OpenAI: `json_object`, or `json_schema` with its `schema`), vLLM's `structured_outputs`
object (`json`, `regex`, `choice`, `grammar`, `json_object`) and vLLM's older `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` fields all become one StructuredOutputsParams; more than one of them is a
400, and so is a schema, regex or grammar that does not compile (the message names the field). The engine then
masks every step's logits to what the constraint allows (treadle_model_runner.runner.structured).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from treadle_frontend.server.errors import APIError
from treadle_frontend.server.harmony import CHANNEL, CONSTRAIN, END, FUNCTIONS, HARMONY, MESSAGE, START
from treadle_frontend.server.reply import THINK_ALIASES
from treadle_model_runner.structured_outputs import KINDS, StructuredOutputsParams

OPTIONS = (*KINDS, "disable_any_whitespace")
FINAL_HEADER = CHANNEL + "final" + MESSAGE  # harmony's final message opens with it
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs(
    body: Any, tokenizer: Any, reasoning_parser: str | None
) -> StructuredOutputsParams | None:
    """The constraint a chat or completions body asks for (compiled, so a bad one is a 400), or None."""
    asked: list[tuple[str, dict[str, Any]]] = []  # (the field as sent, StructuredOutputsParams fields)
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type") not in (None, "text"):
        schema = (fmt.get("json_schema") or {}).get("schema")
        asked.append(("response_format", format_fields(fmt.get("type"), schema, "response_format",
                                                       "response_format.json_schema.schema")))  # fmt: skip
    so = getattr(body, "structured_outputs", None)
    if so:
        unknown = sorted(k for k, v in so.items() if k not in OPTIONS and v not in (None, False))
        if unknown:
            raise APIError(400, f"structured_outputs: {', '.join(unknown)} not supported; use one of "
                                f"{', '.join(KINDS)}", param="structured_outputs")  # fmt: skip
        asked.append(("structured_outputs", {k: v for k, v in so.items() if k in OPTIONS}))
    for name, kind in GUIDED.items():
        if getattr(body, name, None) is not None:
            asked.append((name, {kind: getattr(body, name)}))
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"ask for one structured output, not {' and '.join(n for n, _ in asked)}",
                       param=asked[1][0])  # fmt: skip
    return compile_constraint(*asked[0], tokenizer, reasoning_parser)


def compile_constraint(
    name: str, fields: dict[str, Any], tokenizer: Any, reasoning_parser: str | None
) -> StructuredOutputsParams:
    """StructuredOutputsParams(**fields), compiled once here so a bad schema, regex or grammar is a 400 naming
    `name` (the field as sent), and holding off for the reasoning block where the server reads one."""
    if tokenizer is None:
        raise APIError(400, f"{name}: structured outputs need the model's tokenizer", param=name)
    try:
        params = StructuredOutputsParams(**fields)
        params.build()
    except (TypeError, ValueError) as e:  # "structured_outputs.<kind>: why" -> "<field as sent>: why"
        raise APIError(400, f"{name}: {str(e).split(': ', 1)[-1]}", param=name) from None
    return after_reasoning(params, reasoning_parser, tokenizer)


def forced_constraint(
    forced: tuple[dict[str, Any], str | None], tokenizer: Any, reasoning_parser: str | None
) -> StructuredOutputsParams:
    """A forced tool call's constraint (`forced`: forced_tools.forced_schema's (schema, name)): its JSON schema,
    without whitespace between tokens (a call's arguments do not need it, and a model could otherwise repeat it
    without end). Compiled here: a tool schema that cannot constrain decoding is a 400 naming `tools`. A harmony
    reply (gpt-oss) is a call message: its header is forced, then the arguments (harmony_call)."""
    schema, name = forced
    fields = {"json": json.dumps(schema), "disable_any_whitespace": True}
    params = compile_constraint("tools", fields, tokenizer, reasoning_parser)
    return harmony_call(params, name, tokenizer) if reasoning_parser == HARMONY else params


def harmony_call(
    params: StructuredOutputsParams, name: str | None, tokenizer: Any
) -> StructuredOutputsParams:
    """A forced call in the harmony format: the reply is an analysis message or none (`<|channel|>analysis
    <|message|>`, free but for the stop tokens, to `<|end|>`), then `<|start|>assistant` and a header forced token by
    token, then the constrained JSON and a stop token. A named call's header is the call's own, `<|channel|>commentary
    to=functions.NAME <|constrain|>json<|message|>`, and the JSON its arguments (then `<|call|>`). "required" leaves
    the name to the model, which one forced header cannot: its header is the final message's, `<|channel|>final
    <|message|>`, and the JSON the array of `{"name", "parameters"}` calls (forced_tools.py; then `<|return|>`), so
    the model still reasons first. A tokenizer without the markers: unchanged."""
    opening = _harmony_ids(tokenizer, CHANNEL + "analysis" + MESSAGE)
    closing = tuple(tokenizer.encode(END + START + "assistant", add_special_tokens=False))
    if opening is None or closing[:2] != tuple(tokenizer.convert_tokens_to_ids([END, START])):
        return params
    if name is None:
        header = _harmony_ids(tokenizer, FINAL_HEADER)
    else:
        header = _harmony_ids(tokenizer, f"{CHANNEL}commentary to={FUNCTIONS}{name} {CONSTRAIN}json{MESSAGE}")
    assert header is not None, "the markers were found above"
    return dataclasses.replace(params, reasoning="harmony", reasoning_end_ids=header, is_header_forced=True,
                               analysis_open_ids=opening, analysis_close_ids=closing)  # fmt: skip


def _harmony_ids(tokenizer: Any, header: str) -> tuple[int, ...] | None:
    """`header`'s token ids when the tokenizer writes its markers as single tokens (first `<|channel|>`, last
    `<|message|>`), else None (not a harmony tokenizer)."""
    vocab = tokenizer.get_vocab()
    channel, message = vocab.get(CHANNEL), vocab.get(MESSAGE)
    ids = tuple(tokenizer.encode(header, add_special_tokens=False))
    if channel is None or message is None or len(ids) < 3 or (ids[0], ids[-1]) != (channel, message):
        return None
    return ids


def after_reasoning(params: StructuredOutputsParams, reasoning_parser: str | None, tokenizer: Any) -> Any:
    """`params` holding off until a thinking model's reasoning block ends, when the server reads one and the
    tokenizer has the block's tags as tokens (else unchanged: the constraint holds from the first token). A
    harmony reply (gpt-oss) is constrained from its final message on: after the first `<|channel|>final<|message|>`
    (with or without `<|start|>assistant` before it), as the tokenizer writes it, so its analysis comes first; the
    grammar then ends with a stop token (`<|return|>`), and the reply parser reads the final message as content."""
    if reasoning_parser == HARMONY and tokenizer is not None:
        header = _harmony_ids(tokenizer, FINAL_HEADER)
        if header is None:
            return params
        return dataclasses.replace(params, reasoning="harmony", reasoning_end_ids=header)
    reasoning_parser = THINK_ALIASES.get(reasoning_parser or "", reasoning_parser)  # glm45 reads as qwen3
    if reasoning_parser not in ("qwen3", "deepseek_r1") or tokenizer is None:
        return params
    vocab = tokenizer.get_vocab()
    start, end = vocab.get("<think>"), vocab.get("</think>")
    if end is None or (reasoning_parser == "qwen3" and start is None):
        return params
    return dataclasses.replace(params, reasoning=reasoning_parser, think_start_id=start, think_end_id=end)


def format_fields(kind: Any, schema: Any, field: str, schema_field: str) -> dict[str, Any]:
    """OpenAI's format object (`response_format`, the Responses API's `text.format`) as constraint fields."""
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise APIError(400, f"{schema_field}: a JSON schema object is required", param=field)
        return {"json": schema}
    raise APIError(400, f"{field} {kind!r}: one of text, json_object, json_schema", param=field)
