"""The adapters held in host memory: loaded and checked once, the least recently used evicted, and those of admitted
requests held, so that a step never reads an adapter from disk.

Why holds. The host cache keeps up to `max_cpu_loras` adapters. Adding an adapter for a new request may evict
another, whose requests may still be waiting or running; their adapter must then come back from disk, and if its
directory is gone by then the load fails. Inside a step that failure has no request to blame: it is an exception
from `execute`, and the engine dies with every request in flight. So loading is moved out of the step, to the one
place that can fail a single request: admission. When the scheduler admits a request that names an adapter it
calls `hold(request_id, lora)` (ModelRunner.hold_lora): the adapter is loaded if it was evicted (a ValueError then
fails that request alone, with the file and the problem named) and held until the runner drops the request
(`release`, for the finished and preempted ids of a SchedulerOutput). A held adapter is never evicted, so every
adapter a step needs is in host memory (`get`). The admission cap keeps at most `max_loras` adapters among the
running requests, so holds stay few; the cache exceeds `max_cpu_loras` only while more adapters than that are
held (briefly: a release arrives with the next step), and shrinks back as they are released; the adapter just
loaded is never the one evicted, so a request waiting behind a held adapter usually finds its own still loaded.

Holds count admissions per request id: a request preempted in one step can be admitted again before the runner
has seen its preemption (async scheduling), and its two holds and two releases pair up in any order.

Threads. `add` and `hold` run on the engine's thread (add_request, admission, the add_lora utility) while the
runner's thread runs a step (`get`, `release`): every change happens under one lock, and disk reads outside it.
Tensors are stored in the model's dtype, in page-locked memory on CUDA, so putting one in a device slot is an
asynchronous copy (layer.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from treadle_model_runner.lora.adapter import LoRAAdapter
from treadle_model_runner.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class HostCache:
    def __init__(self, capacity: int, load: Callable[[LoRARequest], LoRAAdapter]) -> None:
        """`capacity`: adapters kept when none is held (max_cpu_loras); `load`: reads and checks one (adapter.py),
        ValueError when it cannot run."""
        self.capacity = capacity
        self.load = load
        self.lock = threading.RLock()  # the manager also holds it while it fills device slots
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self.known: dict[int, LoRARequest] = {}  # adapter id -> the request it was last loaded from
        self.holds: dict[str, tuple[int, int]] = {}  # request id -> (adapter id, admissions not yet released)

    def add(self, request: LoRARequest, replace: bool = False) -> LoRAAdapter:
        """Load and check `request`'s adapter (a cache hit only refreshes it). `replace`: read it again from
        `request.lora_path` and take the place of the adapter with its id (in-place reload)."""
        lora_id = request.lora_int_id
        with self.lock:
            known = self.known.get(lora_id)
            if known is not None and known.lora_path != request.lora_path and not replace:
                raise ValueError(
                    f"lora_int_id {lora_id} already names adapter {known.lora_name!r} at {known.lora_path}; "
                    f"give {request.lora_name!r} ({request.lora_path}) an id of its own"
                )
            # not known: removed while requests held it, so what is cached may be another directory's
            adapter = None if replace or known is None else self.adapters.get(lora_id)
            if adapter is not None:
                self.adapters.move_to_end(lora_id)
                self.known[lora_id] = request
                return adapter
        adapter = self.load(request)  # the disk read, outside the lock
        with self.lock:
            self.adapters[lora_id] = adapter
            self.adapters.move_to_end(lora_id)
            self.known[lora_id] = request
            self._evict(keep=lora_id)  # the adapter just read stays, even if the others are all held
        return adapter

    def hold(self, request_id: str, request: LoRARequest) -> None:
        """Keep the adapter of the admitted request `request_id` in host memory until `release(request_id)`,
        loading it again if it was evicted; ValueError (nothing held) when that load fails."""
        lora_id = request.lora_int_id
        with self.lock:
            _, count = self.holds.get(request_id, (lora_id, 0))
            self.holds[request_id] = (lora_id, count + 1)  # first: the load below cannot evict it
            cached = lora_id in self.adapters
            if cached:
                self.adapters.move_to_end(lora_id)
            source = self.known.get(lora_id, request)  # an in-place reload's path, if there was one
        if cached:
            return
        try:
            self.add(source)
        except ValueError as exc:
            self.release([request_id])
            raise ValueError(
                f"LoRA adapter {request.lora_name!r} could not be loaded again for request {request_id!r} (it left "
                f"host memory while the request waited; --max-cpu-loras keeps more): {exc}"
            ) from None

    def release(self, request_ids: Iterable[str]) -> None:
        """End one hold of each request id that has one (finished or preempted requests); others are ignored."""
        with self.lock:
            for request_id in request_ids:
                held = self.holds.get(request_id)
                if held is None:
                    continue
                lora_id, count = held
                if count > 1:
                    self.holds[request_id] = (lora_id, count - 1)
                else:
                    del self.holds[request_id]
            self._evict()

    def get(self, lora_id: int) -> LoRAAdapter:
        """A held adapter, for a step: it is in host memory by the invariant above."""
        with self.lock:
            adapter = self.adapters.get(lora_id)
            assert adapter is not None, (
                f"LoRA adapter {lora_id} is scheduled but not in host memory: requests must be held "
                "(ModelRunner.hold_lora) from admission until they finish"
            )
            self.adapters.move_to_end(lora_id)
            return adapter

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter; False if it was not loaded. Requests still holding it keep it until they finish."""
        with self.lock:
            self.known.pop(lora_id, None)
            if lora_id not in self.adapters:
                return False
            if lora_id not in self.held_ids():
                del self.adapters[lora_id]
            return True

    def ids(self) -> list[int]:
        with self.lock:
            return list(self.adapters)

    def held_ids(self) -> set[int]:
        return {lora_id for lora_id, _ in self.holds.values()}

    def _evict(self, keep: int = 0) -> None:
        """Drop the least recently used adapters nobody holds (except `keep`) until at most `capacity` remain."""
        if len(self.adapters) <= self.capacity:
            return
        held = self.held_ids() | {keep}
        for lora_id in [i for i in self.adapters if i not in held]:
            if len(self.adapters) <= self.capacity:
                return
            del self.adapters[lora_id]
            logger.debug("LoRA adapter %d left host memory (least recently used)", lora_id)
