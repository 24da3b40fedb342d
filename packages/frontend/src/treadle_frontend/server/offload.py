"""Reply building too big for the event loop: whole-vocabulary logprobs, built and serialised in a worker thread.

With `--max-logprobs -1` a request may ask for every token's logprob at every position (chat's `top_logprobs: -1`,
completions' `logprobs` up to the vocabulary, `prompt_logprobs: -1`): one position of a 49k-token vocabulary is 49k
entries, ~0.2 s of Python to build and ~0.06 s to serialise. Done on the event loop, that stalls every other
client of the server for as long. So a route counts the entries a chunk (or a whole reply) holds
(`logprob_entries`), and when they reach `HEAVY_ENTRIES` it builds that chunk with `off_loop`, in a worker thread,
awaiting the result: the stream's chunks keep their order (the generator waits for each), and the loop serves
other requests meanwhile. Smaller chunks are built inline, as before (a thread hop costs more than they do).

The worker still shares the GIL with the loop. Python code gives it up every few milliseconds, but one
`json.dumps` call holds it to the end, so `json_text` writes a big value in slices: json.dumps of about
`SLICE` entries at a time, joined. Its text is exactly json.dumps' (the routes' options: no ASCII escaping, no
NaN, compact separators), so the wire format does not change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response

T = TypeVar("T")

# logprob entries from which a chunk or a reply is built off the loop (~10 ms of building)
HEAVY_ENTRIES = 4096
# JSON units (scalars and container items) serialised per json.dumps call: well under a millisecond
SLICE = 512
_ALL_WEIGHED = 64  # containers of up to this many items have each item weighed


def logprob_entries(num_positions: int, num_top: int | None, vocab_size: int) -> int:
    """How many logprob entries `num_positions` positions of `num_top` alternatives build (-1: the whole
    vocabulary; None: no logprobs); each position holds its chosen token too."""
    if num_top is None or num_positions <= 0:
        return 0
    return num_positions * (vocab_size if num_top < 0 else num_top + 1)


def is_heavy(num_entries: int) -> bool:
    return num_entries >= HEAVY_ENTRIES


async def off_loop(heavy: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`: in a worker thread when `heavy` (the caller awaits it), else here."""
    if not heavy:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _units(value: Any, budget: int) -> int:
    """The scalars and container items in `value`, counted until they pass `budget`."""
    stack, used = [value], 0
    while stack and used <= budget:
        v = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            used += len(v)
            if used <= budget:
                stack.extend(x for x in v if isinstance(x, (dict, list)))
        else:
            used += 1
    return used


def _write(value: Any, out: list[str]) -> None:
    """Appends `value`'s JSON to `out` in pieces of about SLICE units. Every item of a small container is weighed
    (a record's fields differ); the items of a longer one are assumed alike and three are weighed (first, middle,
    last): a big item elsewhere only makes its slice's json.dumps call longer."""
    is_dict = isinstance(value, dict)
    if not (is_dict or isinstance(value, list)):
        out.append(_dumps(value))
        return
    items: list[Any] = list(value.items()) if is_dict else value
    n = len(items)
    weighed = range(n) if n <= _ALL_WEIGHED else (0, n // 2, n - 1)
    per_item = max((_units(items[i][1] if is_dict else items[i], SLICE) for i in weighed), default=1)
    if per_item * n <= SLICE:
        out.append(_dumps(value))
        return
    pieces: list[str] = []
    if per_item > SLICE:  # big items: each written in slices of its own
        for item in items:
            sub: list[str] = []
            _write(item[1] if is_dict else item, sub)
            key = _dumps({item[0]: None})[1:-6] + ":" if is_dict else ""  # the key as json.dumps writes it
            pieces.append(key + "".join(sub))
    else:
        step = max(1, SLICE // per_item)
        for start in range(0, n, step):
            batch = items[start : start + step]
            pieces.append(_dumps(dict(batch) if is_dict else batch)[1:-1])
    out.append(("{" if is_dict else "[") + ",".join(pieces) + ("}" if is_dict else "]"))


def json_text(value: Any) -> str:
    """json.dumps(value) as the routes write it, serialised a slice at a time."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def sse_text(data: dict[str, Any]) -> str:
    """streams.sse's event, serialised by `json_text`."""
    return f"data: {json_text(data)}\n\n"


def json_reply(heavy: bool, content: dict[str, Any]) -> Response:
    """A JSON response of `content`: JSONResponse's body, serialised by `json_text` when `heavy`."""
    if not heavy:
        return JSONResponse(content)
    return Response(json_text(content).encode("utf-8"), media_type="application/json")
