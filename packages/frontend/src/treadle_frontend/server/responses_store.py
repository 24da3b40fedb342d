"""Stored responses of /v1/responses: what `previous_response_id`, GET and DELETE /v1/responses/{id} read.

OpenAI stores a response unless `store` is false, and a request naming `previous_response_id` continues that
response's conversation: its input items, then its output items (messages, reasoning, function calls), then the new
input; the previous `instructions` are not carried over. This server keeps the newest TREADLE_RESPONSES_STORE_SIZE
responses (default 1024; 0 keeps none) in memory for the life of the process, a response read or continued counting
as new; an evicted, deleted or unknown id is a 404 on GET / DELETE and a 400 naming `previous_response_id` on a
create. GET /v1/responses/{id}/input_items lists the items a response answered (the continued conversation's
included), newest first unless `order` is asc, `limit` (1-100, default 20) a page, `after` / `before` an item id;
each kept input item has an id (one is made where the request gave none) and its text as content parts.

A background response (responses_background.py) is kept from its creation, `queued`, and replaced as it runs
(`update`); one still running is never evicted, nor the one just stored or updated (the store may then hold more
than its size until they end), and a request continuing it is a 400 until it has ended.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from treadle_frontend.server.common import new_id
from treadle_frontend.server.errors import APIError

__all__ = ["RUNNING", "ResponseStore"]

RUNNING = ("queued", "in_progress")  # the statuses of a background response that has not ended


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # id -> (the response object, the input items it answered)
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Keep a response (finished, or a background one queued) with the input items it answered (its output items
        follow them)."""
        if self.capacity <= 0:
            return
        self._kept[response["id"]] = (copy.deepcopy(response), [_listed(item) for item in input_items])
        self._kept.move_to_end(response["id"])
        self._evict(response["id"])

    def update(self, response: dict[str, Any]) -> None:
        """A kept response's new state (a background response as it runs and ends); nothing when it is no longer
        kept (deleted meanwhile)."""
        entry = self._kept.get(response["id"])
        if entry is not None:
            self._kept[response["id"]] = (copy.deepcopy(response), entry[1])
            self._evict(response["id"])

    def __contains__(self, rid: object) -> bool:
        return rid in self._kept

    def _evict(self, keep: str) -> None:
        """Drops the least recently used responses past the capacity, but neither those still running nor `keep`
        (the one just stored)."""
        while len(self._kept) > self.capacity:
            kept = ((rid, r) for rid, (r, _) in self._kept.items() if rid != keep)
            oldest = next((rid for rid, r in kept if r["status"] not in RUNNING), None)
            if oldest is None:
                return
            del self._kept[oldest]

    def get(self, rid: str) -> dict[str, Any]:
        """The stored response object; 404 when it is not kept."""
        return copy.deepcopy(self._entry(rid, 404, None)[0])

    def conversation(self, rid: str) -> list[dict[str, Any]]:
        """The items a continuation of `rid` starts from; 400 naming previous_response_id when it is not kept."""
        response, inputs = self._entry(rid, 400, "previous_response_id")
        if response["status"] in RUNNING:
            raise APIError(400, f"previous_response_id: response {rid!r} is still {response['status']} (a background "
                           f"response); continue it once it has ended (poll GET /v1/responses/{rid}) or cancel it",
                           param="previous_response_id")  # fmt: skip
        return copy.deepcopy([*inputs, *response["output"]])

    def delete(self, rid: str) -> dict[str, Any]:
        self._entry(rid, 404, None)
        del self._kept[rid]
        return {"id": rid, "object": "response", "deleted": True}

    def input_items(
        self,
        rid: str,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """A page of the input items `rid` answered (module docstring), as OpenAI's list object."""
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be from 1 to 100, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be asc or desc, got {order!r}", param="order")
        items = list(self._entry(rid, 404, None)[1])
        if order == "desc":
            items.reverse()
        ids = [item["id"] for item in items]
        for name, cursor in (("after", after), ("before", before)):
            if cursor is not None and cursor not in ids:
                raise APIError(400, f"{name}: no input item {cursor!r} in response {rid!r}", param=name)
        start = ids.index(after) + 1 if after is not None else 0
        end = ids.index(before) if before is not None else len(items)
        page = items[start:end][:limit]
        return {"object": "list", "data": copy.deepcopy(page), "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < end}  # fmt: skip

    def _entry(self, rid: str, status: int, param: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        entry = self._kept.get(rid)
        if entry is None:
            kept = f"the newest {self.capacity} are kept" if self.capacity > 0 else "none are kept"
            raise APIError(status, f"no stored response with id {rid!r} ({kept}: TREADLE_RESPONSES_STORE_SIZE)",
                           param=param, code="not_found" if status == 404 else None)  # fmt: skip
        self._kept.move_to_end(rid)
        return entry


_ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as kept and listed: with an id, a message's text as one content part (input_text, or an
    assistant's output_text)."""
    kept = copy.deepcopy(item)
    kind = kept.setdefault("type", "message")
    if "id" not in kept:
        kept["id"] = new_id(_ID_PREFIXES.get(kind, "item_"))
    if kind == "message" and isinstance(kept.get("content"), str):
        part = "output_text" if kept.get("role") == "assistant" else "input_text"
        kept["content"] = [{"type": part, "text": kept["content"]}]
    return kept
