"""The adapters held in host memory: loaded and checked once, the least recently used evicted, and those of admitted
requests held, so that a step never reads an adapter from disk; under tensor parallelism rank 0 decides for all.

Why holds. The host cache keeps up to `max_cpu_loras` adapters. Adding an adapter for a new request may evict
another, whose requests may still be waiting or running; their adapter must then come back from disk, and if its
directory is gone by then the load fails. Inside a step that failure has no request to blame: it is an exception
from `execute`, and the engine dies with every request in flight. So loading is moved out of the step, to the one
place that can fail a single request: admission. When the scheduler admits a request that names an adapter it
calls `hold(request_id, lora)` (ModelRunner.hold_lora): the adapter is loaded if it was evicted (a ValueError then
fails that request alone, with the file and the problem named) and held until the runner drops the request
(`release`, for the finished and preempted ids of a SchedulerOutput). A held adapter is never evicted, so every
adapter a step needs is in host memory (`get`).

Evictions happen only when an adapter is loaded (`add`, or `hold` of an evicted one), never on a release: the
least recently used adapters nobody holds leave until at most `max_cpu_loras` remain, the one just loaded always
staying. So the cache exceeds max_cpu_loras only by adapters that were held at the last load (the admission cap
keeps at most `max_loras` adapters among the running requests, so holds stay few), and a request waiting behind a
held adapter usually finds its own still loaded. Holds count admissions per request id: a request preempted in one
step can be admitted again before the runner has seen its preemption (async scheduling), and its two holds and two
releases pair up in any order.

Tensor parallelism: rank 0 decides, every rank follows. Each rank keeps its own part of every adapter, so each
reads the directory itself; but only rank 0's cache chooses what to load and evict. The other ranks' caches
(`Followers`, engine_core's tp_executor.py) never choose: they see rank 0's releases at other moments (under
async scheduling rank 0's step thread releases while its engine thread admits the next step; a worker sees both in
the order they were sent), so an LRU of their own would evict other adapters, and one a worker evicted could be
gone from disk when rank 0, which kept it, schedules it. Instead every change rank 0 makes is a `HostChange` (the
adapter it loaded, those it dropped) that the followers make verbatim, in the order rank 0 made them: all changes
are made by `add`, `hold` and `remove`, which run on the engine's one thread, and a release changes nothing. A load
has two halves: rank 0 reads the adapter, then every follower reads it and keeps it aside (`Followers.read`); only
when all could does any rank install it (`Followers.apply`). A follower that cannot read it (its directory went
away in between) makes the load fail on every rank: `hold` raises and that request alone fails, exactly as when
rank 0 itself cannot read it. So every rank holds the same adapters after every call, an adapter rank 0 finds cached
is cached everywhere, and a step never misses one on any rank. Nothing here runs inside a step, and no collective:
the followers hear of changes over the executor's pipes, between steps.

Threads. `add`, `hold` and `remove` run on the engine's thread (add_request, admission, the LoRA utilities) while
the runner's thread runs a step (`get`, `release`): every change happens under one lock, and disk reads outside it.
Tensors are stored in the model's dtype, in page-locked memory on CUDA, so putting one in a device slot is an
asynchronous copy (layer.py). `on_change` hears, under the lock, the ids each change installed or dropped on this
rank: their device slots are stale (manager.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from treadle_model_runner.lora.adapter import LoRAAdapter
from treadle_model_runner.lora.change import HostChange
from treadle_model_runner.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class Followers(Protocol):
    """The ranks whose host caches follow this one's decisions (tensor parallelism: the workers)."""

    def read(self, request: LoRARequest) -> None:
        """Each reads and checks `request`'s adapter and keeps it aside; ValueError (naming the rank and the
        problem) when one cannot, and then none keeps it."""

    def apply(self, change: HostChange) -> None:
        """Each makes `change`: installs what it read (if the change installs), drops what rank 0 dropped."""


class NoFollowers:
    """One rank: nobody to tell."""

    def read(self, request: LoRARequest) -> None:
        pass

    def apply(self, change: HostChange) -> None:
        pass


class HostCache:
    def __init__(
        self,
        capacity: int,
        load: Callable[[LoRARequest], LoRAAdapter],
        on_change: Callable[[set[int]], None] = lambda ids: None,
    ) -> None:
        """`capacity`: adapters kept when none is held (max_cpu_loras); `load`: reads and checks one (adapter.py),
        ValueError when it cannot run; `on_change`: the ids a change installed or dropped here."""
        self.capacity = capacity
        self.load = load
        self.on_change = on_change
        self.followers: Followers = NoFollowers()  # the ranks that make this one's changes too
        self.lock = threading.RLock()  # the manager also holds it while it fills device slots
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self.known: dict[int, LoRARequest] = {}  # adapter id -> the request it was last loaded from
        self.holds: dict[str, tuple[int, int]] = {}  # request id -> (adapter id, admissions not yet released)
        self.staged: tuple[LoRARequest, LoRAAdapter] | None = None  # a follower's: read, not yet applied

    # ---- rank 0 (and the only rank): decisions ----------------------------------------------------
    def add(self, request: LoRARequest, replace: bool = False) -> None:
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
            if not replace and known is not None and lora_id in self.adapters:
                self.adapters.move_to_end(lora_id)
                self.known[lora_id] = request
                return
        # the disk read, outside the lock: here first, so an adapter this rank cannot run goes nowhere
        adapter = self.load(request)
        self.followers.read(request)  # every other rank reads it too, or none keeps it (ValueError)
        with self.lock:
            self.adapters[lora_id] = adapter
            self.adapters.move_to_end(lora_id)
            self.known[lora_id] = request
            change = HostChange(request, self._evict(keep=lora_id))
            self.on_change(change.changed_ids)
        self.followers.apply(change)

    def hold(self, request_id: str, request: LoRARequest) -> None:
        """Keep the adapter of the admitted request `request_id` in host memory until `release(request_id)`,
        loading it again if it was evicted; ValueError (nothing held) when that load fails on any rank."""
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
        """End one hold of each request id that has one (finished or preempted requests); others are ignored.
        Nothing leaves host memory here: the next load evicts what is no longer held."""
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

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter; False if it was not loaded. Requests still holding it keep it until a load evicts
        it once they are done."""
        with self.lock:
            self.known.pop(lora_id, None)
            if lora_id not in self.adapters:
                return False
            if lora_id in self.held_ids():
                return True
            del self.adapters[lora_id]
            change = HostChange(dropped=(lora_id,))
            self.on_change(change.changed_ids)
        self.followers.apply(change)
        return True

    # ---- the other ranks: rank 0's decisions, verbatim -------------------------------------------
    def stage(self, request: LoRARequest) -> None:
        """A follower's half of a load: read and check `request`'s adapter, kept aside until `apply` (ValueError
        when it cannot be read: rank 0 then installs it nowhere)."""
        self.staged = None
        self.staged = (request, self.load(request))

    def apply(self, change: HostChange) -> None:
        """Make a change rank 0 made: install the adapter `stage` read, drop those rank 0 dropped. A change that
        installs nothing also discards what was staged (the load failed on another rank)."""
        staged, self.staged = self.staged, None
        with self.lock:
            if change.installed is not None:
                assert staged is not None and staged[0] == change.installed, (
                    f"rank 0 installs LoRA adapter {change.installed} but this rank read {staged and staged[0]}: "
                    "every install must follow its read"
                )
                self.adapters[change.installed.lora_int_id] = staged[1]
            for lora_id in change.dropped:
                del self.adapters[lora_id]
            self.on_change(change.changed_ids)

    # ---- every rank ---------------------------------------------------------------------------------
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

    def ids(self) -> list[int]:
        with self.lock:
            return list(self.adapters)

    def held_ids(self) -> set[int]:
        return {lora_id for lora_id, _ in self.holds.values()}

    def _evict(self, keep: int) -> tuple[int, ...]:
        """Drop the least recently used adapters nobody holds (except `keep`) until at most `capacity` remain;
        the ids dropped."""
        dropped: list[int] = []
        held = self.held_ids() | {keep}
        for lora_id in [i for i in self.adapters if i not in held]:
            if len(self.adapters) <= self.capacity:
                break
            del self.adapters[lora_id]
            dropped.append(lora_id)
            logger.debug("LoRA adapter %d left host memory (least recently used)", lora_id)
        return tuple(dropped)
