"""Admission under the LoRA adapter cap: at most `max_loras` distinct adapters among the running requests.

Theory. The runner holds max_loras adapter slots, so no step may use more adapters than that. The scheduler keeps
the stronger invariant that the *running* requests use at most max_loras distinct adapters (every step schedules
a subset of them, so every step fits, whatever its budget leaves out). Only admission can break it, so only
admission checks it: a waiting request whose adapter is not running while max_loras adapters are is skipped
(it keeps its place at the head of the queue) and requests behind it may still be admitted, which keeps batches
full of the running adapters' requests, as vLLM does.

Fairness. Skipping alone could starve a request: if requests of the running adapters keep arriving, its adapter
never gets a slot. So a skipped request puts up a barrier: requests that arrived after it was first skipped are
not admitted past it. The requests already running then finish, their adapters leave, and it gets its slot.
Arrival is counted per request added (`on_added`), so the rule does not depend on clocks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from treadle_engine_core.request import Request

_NO_BARRIER = 1 << 62


class Verdict(enum.Enum):
    ADMIT = 0  # may be admitted (budget and blocks permitting)
    SKIP = 1  # its adapter does not fit this step: leave it at the head of the queue, look behind it
    STOP = 2  # arrived after a skipped request was first skipped: admit nothing more this step


class LoRAAdmission:
    def __init__(self, max_loras: int) -> None:
        assert max_loras >= 1, f"max_loras must be >= 1 for LoRA admission, got {max_loras}"
        self.max_loras = max_loras
        self.num_added = 0  # requests added so far: the arrival counter
        self.arrival: dict[str, int] = {}  # live request id -> its arrival number
        self.first_skipped: dict[str, int] = {}  # request id -> num_added when it was first skipped
        self.active: set[int] = set()  # this step: adapters of the running requests (and those just admitted)
        self.barrier = _NO_BARRIER  # this step: requests arriving at or after this number wait

    def on_added(self, request: Request) -> None:
        self.arrival[request.request_id] = self.num_added
        self.num_added += 1

    def on_freed(self, request_id: str) -> None:
        self.arrival.pop(request_id, None)
        self.first_skipped.pop(request_id, None)

    def start_step(self, running: Iterable[Request]) -> None:
        self.active = {r.lora_id for r in running if r.lora_id}
        self.barrier = _NO_BARRIER

    def verdict(self, request: Request) -> Verdict:
        lora_id = request.lora_id
        if lora_id and lora_id not in self.active and len(self.active) >= self.max_loras:
            first = self.first_skipped.setdefault(request.request_id, self.num_added)
            self.barrier = min(self.barrier, first)
            return Verdict.SKIP
        if self.arrival.get(request.request_id, -1) >= self.barrier:
            return Verdict.STOP
        return Verdict.ADMIT

    def admitted(self, request: Request) -> None:
        self.first_skipped.pop(request.request_id, None)
        if request.lora_id:
            self.active.add(request.lora_id)
