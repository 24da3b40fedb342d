"""The LoRA host cache's holds (lora/host_cache.py), with a counting loader instead of adapter files: held adapters
are never evicted, holds pair with releases in any order, a failed reload at admission names the request and holds
nothing, and an in-place reload reads the directory again."""

from __future__ import annotations

import pytest

from treadle_model_runner.lora.adapter import LoRAAdapter
from treadle_model_runner.lora.host_cache import HostCache
from treadle_model_runner.lora.request import LoRARequest

REQ = {i: LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in range(1, 6)}


class Loader:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.missing: set[str] = set()  # paths whose load fails

    def __call__(self, request: LoRARequest) -> LoRAAdapter:
        if request.lora_path in self.missing:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {request.lora_path} is not a directory")
        self.loads.append(request.lora_path)
        return LoRAAdapter(request.lora_int_id, request.lora_name, 4, 1.0, {})


def test_held_adapters_stay_and_the_rest_is_least_recently_used() -> None:
    loader = Loader()
    cache = HostCache(2, loader)
    cache.add(REQ[1])
    cache.hold("r1", REQ[1])
    for i in (2, 3, 4):  # later arrivals push out everything but the held adapter
        cache.add(REQ[i])
    assert cache.ids() == [1, 4] and loader.loads.count("/adapters/a1") == 1
    cache.hold("r2", REQ[2])  # evicted: read again at admission
    assert loader.loads.count("/adapters/a2") == 2 and cache.ids() == [1, 2]  # 4 made room
    cache.add(REQ[5])  # both held: the cache holds one more for now
    assert cache.ids() == [1, 2, 5]
    cache.release(["r1", "unknown"])
    assert cache.ids() == [1, 2, 5]  # a release changes nothing: only a load evicts (host_cache.py)
    cache.add(REQ[3])  # 1 is no longer held: it leaves, then the least recently used of the rest
    assert cache.ids() == [2, 3]
    assert cache.get(2).lora_id == 2
    with pytest.raises(AssertionError, match="scheduled but not in host memory"):
        cache.get(1)


def test_holds_pair_with_releases_in_any_order() -> None:
    """Preempted and admitted again before the runner saw the preemption: two holds, then two releases."""
    cache = HostCache(1, Loader())
    cache.hold("r", REQ[1])
    cache.hold("r", REQ[1])
    cache.release(["r"])
    cache.add(REQ[2])
    assert 1 in cache.ids()  # still held once
    cache.release(["r"])
    cache.add(REQ[3])
    assert cache.ids() == [3]


def test_a_failed_reload_names_the_request_and_holds_nothing() -> None:
    loader = Loader()
    cache = HostCache(1, loader)
    cache.add(REQ[1])
    cache.add(REQ[2])  # 1 evicted
    loader.missing.add("/adapters/a1")
    with pytest.raises(
        ValueError, match=r"'a1' could not be loaded again for request 'r'.*/adapters/a1 is not a"
    ):
        cache.hold("r", REQ[1])
    assert cache.holds == {}


def test_in_place_reload_reads_the_new_directory() -> None:
    loader = Loader()
    cache = HostCache(2, loader)
    cache.add(REQ[1])
    moved = LoRARequest("a1", 1, "/adapters/a1-v2")
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'a1'"):
        cache.add(moved)
    cache.add(moved, replace=True)
    assert loader.loads == ["/adapters/a1", "/adapters/a1-v2"]
    cache.add(REQ[2])
    cache.add(REQ[3])  # 1 evicted; a request still naming the old path reloads the new one
    cache.hold("r", REQ[1])
    assert loader.loads[-1] == "/adapters/a1-v2"
