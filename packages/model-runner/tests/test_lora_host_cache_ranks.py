"""The LoRA host cache under tensor parallelism (lora/host_cache.py): rank 0's cache decides, two followers make its
changes verbatim, in process, with counting loaders instead of adapter files (engine-core's
test_lora_parallel_cache.py runs the same through real worker processes).

A random sequence of adds, holds, releases (delivered late, as rank 0's step thread does under async scheduling),
step reads, removals, and adapter directories deleted and restored (for every rank, or only for the followers,
between rank 0's read and theirs): after every call each follower holds exactly rank 0's adapters, rank 0's equal
an independent model of its policy (least recently used, held ones kept, evictions only on a load), every held
adapter is in host memory on every rank, and a call fails exactly when some rank could not read the adapter.
"""

from __future__ import annotations

import random

import pytest

from treadle_model_runner.lora.adapter import LoRAAdapter
from treadle_model_runner.lora.change import HostChange
from treadle_model_runner.lora.host_cache import HostCache
from treadle_model_runner.lora.request import LoRARequest

REQ = {i: LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in range(1, 6)}


class Disk:
    def __init__(self) -> None:
        self.gone: set[str] = set()  # paths no rank can read
        self.gone_for_followers: set[str] = set()  # paths that went after rank 0 read them, before the others


def _loader(disk: Disk, follower: bool) -> object:
    def load(request: LoRARequest) -> LoRAAdapter:
        if request.lora_path in disk.gone or (follower and request.lora_path in disk.gone_for_followers):
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {request.lora_path} is not a directory")
        return LoRAAdapter(request.lora_int_id, request.lora_name, 4, 1.0, {})

    return load


class InProcessFollowers:
    """Followers as tp_executor.py's are: every follower reads, all or none installs, changes arrive in order."""

    def __init__(self, caches: list[HostCache]) -> None:
        self.caches = caches

    def read(self, request: LoRARequest) -> None:
        errors = []
        for rank, cache in enumerate(self.caches, start=1):
            try:
                cache.stage(request)
            except ValueError as exc:
                errors.append(f"rank {rank}: {exc}")
        if errors:
            self.apply(HostChange())
            raise ValueError(errors[0])

    def apply(self, change: HostChange) -> None:
        for cache in self.caches:
            cache.apply(change)


class Policy:
    """Rank 0's decisions, written independently: LRU order, held adapters stay, evictions only when one is loaded,
    and an adapter removed while held is read again by the next add."""

    def __init__(self, capacity: int, disk: Disk) -> None:
        self.capacity, self.disk = capacity, disk
        self.ids: list[int] = []  # least recently used first
        self.holds: dict[str, list[int]] = {}  # request id -> its adapter, once per hold not yet released
        self.forgotten: set[int] = set()  # removed while held: still cached, but an add reads it again

    def held(self) -> set[int]:
        return {i for ids in self.holds.values() for i in ids}

    def touch(self, lora_id: int) -> None:
        self.ids.remove(lora_id)
        self.ids.append(lora_id)

    def add(self, lora_id: int) -> bool:
        if lora_id in self.ids and lora_id not in self.forgotten:
            self.touch(lora_id)
            return True
        path = REQ[lora_id].lora_path
        if path in self.disk.gone or path in self.disk.gone_for_followers:
            return False
        self.forgotten.discard(lora_id)
        if lora_id in self.ids:
            self.ids.remove(lora_id)
        self.ids.append(lora_id)
        keep = self.held() | {lora_id}
        for i in [i for i in self.ids if i not in keep]:
            if len(self.ids) <= self.capacity:
                break
            self.ids.remove(i)
            self.forgotten.discard(i)
        return True

    def hold(self, rid: str, lora_id: int) -> bool:
        self.holds.setdefault(rid, []).append(lora_id)
        if lora_id in self.ids:
            self.touch(lora_id)
            return True
        if self.add(lora_id):
            return True
        self.release(rid)
        return False

    def release(self, rid: str) -> None:
        if self.holds.get(rid):
            self.holds[rid].pop()
            if not self.holds[rid]:
                del self.holds[rid]

    def remove(self, lora_id: int) -> None:
        if lora_id in self.ids and lora_id in self.held():
            self.forgotten.add(lora_id)
        elif lora_id in self.ids:
            self.ids.remove(lora_id)


@pytest.mark.parametrize("seed", range(12))
def test_followers_hold_what_rank_0_decides_after_every_call(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([1, 2, 3])
    disk = Disk()
    followers = [HostCache(capacity, _loader(disk, follower=True)) for _ in range(2)]  # type: ignore[arg-type]
    rank0 = HostCache(capacity, _loader(disk, follower=False))  # type: ignore[arg-type]
    rank0.followers = InProcessFollowers(followers)
    policy = Policy(capacity, disk)
    releases: list[str] = []  # sent with a step, not yet seen by rank 0's step thread
    running: dict[str, int] = {}  # request id -> adapter, admitted and not yet finished
    num_failed = 0
    for n in range(400):
        op, lora_id = rng.random(), rng.randrange(1, 6)
        path = REQ[lora_id].lora_path
        disk.gone_for_followers.clear()  # a follower reads right after rank 0: only this call's deletion counts
        if rng.random() < 0.1:
            disk.gone_for_followers.add(path)
        ok = True
        if op < 0.3:
            rid = f"r{n}"
            try:
                rank0.hold(rid, REQ[lora_id])
                running[rid] = lora_id
            except ValueError:
                ok = False
            assert ok == policy.hold(rid, lora_id)
        elif op < 0.45 and running:
            rid = rng.choice(sorted(running))  # finishes (or is preempted): its release travels with a step
            del running[rid]
            releases.append(rid)
        elif op < 0.6 and releases:
            k = rng.randint(1, len(releases))  # rank 0's step thread catches up on some of them
            rank0.release(releases[:k])
            for rid in releases[:k]:
                policy.release(rid)
            del releases[:k]
        elif op < 0.75:
            try:
                rank0.add(REQ[lora_id])
            except ValueError:
                ok = False
            assert ok == policy.add(lora_id)
        elif op < 0.8:
            rank0.remove(lora_id)
            policy.remove(lora_id)
        elif op < 0.87 and running:
            held = running[rng.choice(sorted(running))]  # a step reads a running request's adapter
            rank0.get(held)
            policy.touch(held)
        elif op < 0.95:
            disk.gone ^= {path}  # its directory goes, or comes back
        num_failed += not ok
        assert rank0.ids() == policy.ids, n
        held = rank0.held_ids()
        for rank, follower in enumerate(followers, start=1):
            assert sorted(follower.ids()) == sorted(rank0.ids()), (n, rank)
            assert held <= set(follower.ids()), (n, rank)
            assert follower.staged is None, (n, rank)
            for i in held:
                assert follower.get(i).lora_id == i
    assert num_failed > 0  # some loads failed, on rank 0 or on a follower only


def test_a_follower_that_cannot_read_fails_the_hold_everywhere() -> None:
    disk = Disk()
    follower = HostCache(1, _loader(disk, follower=True))  # type: ignore[arg-type]
    rank0 = HostCache(1, _loader(disk, follower=False))  # type: ignore[arg-type]
    rank0.followers = InProcessFollowers([follower])
    rank0.add(REQ[1])
    rank0.add(REQ[2])  # 1 evicted on both
    assert rank0.ids() == follower.ids() == [2]
    disk.gone_for_followers.add(REQ[1].lora_path)
    with pytest.raises(ValueError, match=r"loaded again for request 'r'.*rank 1: .*a1 is not a dir"):
        rank0.hold("r", REQ[1])
    assert rank0.ids() == follower.ids() == [2] and rank0.holds == {} and follower.staged is None
