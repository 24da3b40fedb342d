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
from treadle_model_runner.structured_outputs import KINDS, StructuredOutputsParams

OPTIONS = (*KINDS, "disable_any_whitespace")
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
    schema: dict[str, Any], tokenizer: Any, reasoning_parser: str | None
) -> StructuredOutputsParams:
    """A forced tool call's constraint: its JSON schema, without whitespace between tokens (a call's arguments
    do not need it, and a model could otherwise repeat it without end). Compiled here: a tool schema that cannot
    constrain decoding is a 400 naming `tools`."""
    fields = {"json": json.dumps(schema), "disable_any_whitespace": True}
    return compile_constraint("tools", fields, tokenizer, reasoning_parser)


def after_reasoning(params: StructuredOutputsParams, reasoning_parser: str | None, tokenizer: Any) -> Any:
    """`params` holding off until a thinking model's reasoning block ends, when the server reads one and the
    tokenizer has the block's tags as tokens (else unchanged: the constraint holds from the first token)."""
    if reasoning_parser not in ("qwen3", "deepseek_r1") or tokenizer is None:
        # none, or gpt-oss's harmony format, whose reasoning no single token ends: held from the first token
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
