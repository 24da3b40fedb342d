"""A tensor-parallel engine that shuts down frees rank 0's runner (weights, KV cache) at once.

Rank 0's runner lives in the engine's own process, so an application that builds a second engine after the first
(a test suite, a notebook) sizes the second's KV cache from the memory the first left. Nothing may keep the first
alive: the thread watching the worker processes once held the executor while it slept through its grace period
after the workers left, and on a GPU the next engine then found rank 0's whole KV cache still allocated.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from lora_tp_engine import Driver, build_model, engine_config

from treadle_engine_core.core import EngineCore


def test_shutdown_frees_rank_0s_runner_and_kv_cache_at_once(tmp_path: Path) -> None:
    engine = EngineCore(engine_config(build_model(tmp_path), max_cpu_loras=2))
    driver = Driver(engine)
    driver.add("r", [2, 3, 4, 5], None, max_tokens=4)
    driver.run()
    assert len(driver.outcomes["r"].tokens) == 4
    runner = engine.executor.runner  # type: ignore[attr-defined]
    watched = [weakref.ref(runner)] + [weakref.ref(cache) for cache in runner.kv_caches]
    del runner
    engine.shutdown()
    del driver, engine
    gc.collect()
    assert [ref() is None for ref in watched] == [True] * len(watched)
