"""Python's cyclic garbage collector in a long-running engine.

A process that has imported torch and transformers and loaded a model holds some 400k objects the collector
tracks, and a full collection walks all of them. Measured on the 2-core CPU machine (a tiny Llama, 256 requests
x 64 tokens asking 5 logprobs each, which keep ~7 objects a token alive): one full collection took 0.31 s of a
1.38 s run. `freeze_startup_heap()` collects once and moves every object alive then to the permanent generation
(`gc.freeze`), so later collections walk only what requests keep alive (the same run: 1.02 s, its two full
collections 0.14 s; benchmarks/results/cpu-logprobs-host-139995f.json: 12.1-12.6k -> 17.8-18.4k output tok/s with
frontend Logprobs as NamedTuples); vLLM does the same after its start-up. On an H200 the Llama-3.1-8B and
Qwen3-0.6B runs measured did not change beyond their spread (results/gpu-gc-freeze-h200-139995f). Objects alive
at the freeze are never collected by the cyclic collector (reference counting still frees them).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_heap(where: str) -> None:
    """Collect, then freeze every object alive now; logs how many were frozen, with `where`."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info(
        "%s: %d start-up objects frozen out of the garbage collector's scans (%.2f s)",
        where,
        gc.get_freeze_count(),
        time.perf_counter() - start,
    )
