"""Stored responses of /v1/responses: what `previous_response_id`, GET and DELETE /v1/responses/{id} read.

OpenAI stores a response unless `store` is false, and a request naming `previous_response_id` continues that
response's conversation: its input items, then its output items (messages, reasoning, function calls), then the new
input; the previous `instructions` are not carried over. This server keeps the newest TREADLE_RESPONSES_STORE_SIZE
responses (default 1024; 0 keeps none) in memory for the life of the process, a response read or continued counting
as new; an evicted, deleted or unknown id is a 404 on GET / DELETE and a 400 naming `previous_response_id` on a
create.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from treadle_frontend.server.errors import APIError

__all__ = ["ResponseStore"]


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # id -> (the response object, the conversation: input items then output items)
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Keep a finished response with the input items it answered (its output items follow them)."""
        if self.capacity <= 0:
            return
        conversation = copy.deepcopy([*input_items, *response["output"]])
        self._kept[response["id"]] = (copy.deepcopy(response), conversation)
        self._kept.move_to_end(response["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, rid: str) -> dict[str, Any]:
        """The stored response object; 404 when it is not kept."""
        return copy.deepcopy(self._entry(rid, 404, None)[0])

    def conversation(self, rid: str) -> list[dict[str, Any]]:
        """The items a continuation of `rid` starts from; 400 naming previous_response_id when it is not kept."""
        return copy.deepcopy(self._entry(rid, 400, "previous_response_id")[1])

    def delete(self, rid: str) -> dict[str, Any]:
        self._entry(rid, 404, None)
        del self._kept[rid]
        return {"id": rid, "object": "response", "deleted": True}

    def _entry(self, rid: str, status: int, param: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        entry = self._kept.get(rid)
        if entry is None:
            kept = f"the newest {self.capacity} are kept" if self.capacity > 0 else "none are kept"
            raise APIError(status, f"no stored response with id {rid!r} ({kept}: TREADLE_RESPONSES_STORE_SIZE)",
                           param=param, code="not_found" if status == 404 else None)  # fmt: skip
        self._kept.move_to_end(rid)
        return entry
