"""Kernel warm-up at start-up: run the batch shapes that pick distinct Triton kernel variants once, so no
request pays a JIT compile later (a first prefix-cache hit used to stall ~1.5 s compiling a split-KV prefill).

Each shape is one real step through `ModelRunner.execute` (inputs, forward, sampler) of dummy requests whose
blocks are all the null block 0: their K/V writes land in that scratch block, which only padding reads. The
dummy requests are dropped right after. Shapes (query lengths, context lengths) cover what the unified
attention kernel distinguishes: a long prefill (64-row tiles), a short chunk on cached context (the split-KV
prefill path), a mixed batch of decodes and a prefill (the double launch with its filtered reduction), two
prefills of different lengths. Decode-only batches are compiled by CUDA-graph capture (or the first decode).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from treadle_model_runner.sampling_params import SamplingParams
from treadle_model_runner.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# (query lengths, context lengths) per warm-up step
SHAPES: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((128,), (0,)),
    ((16,), (112,)),
    ((1, 1, 37), (20, 20, 0)),
    ((5, 300), (0, 0)),
)


def fits(runner: ModelRunner, queries: tuple[int, ...], contexts: tuple[int, ...]) -> bool:
    return (
        len(queries) <= runner.max_num_seqs
        and sum(queries) <= runner.max_num_batched_tokens
        and max(q + c for q, c in zip(queries, contexts, strict=True))
        < runner.max_model_len  # + the sampled one
    )


def warm_up_kernels(runner: ModelRunner) -> None:
    start = time.perf_counter()
    block_size = runner.cache_config.block_size
    num_groups = len(runner.batch.block_tables)
    params = SamplingParams(temperature=1.0, max_tokens=1)
    ran = 0
    for step, (queries, contexts) in enumerate(SHAPES):
        if not fits(runner, queries, contexts):
            continue
        new, scheduled = [], {}
        for i, (q, c) in enumerate(zip(queries, contexts, strict=True)):
            req_id = f"__warmup_{step}_{i}"
            num_blocks = -(-(q + c) // block_size)
            blocks = tuple([0] * num_blocks for _ in range(num_groups))
            new.append(NewRequestData(req_id, [0] * (q + c), params, blocks, c))
            scheduled[req_id] = q
        runner.execute(SchedulerOutput(new, CachedRequestData(), scheduled, sum(queries)))
        runner.execute(SchedulerOutput([], CachedRequestData(), {}, 0, finished_req_ids=set(scheduled)))
        ran += 1
    logger.info("kernel warm-up: %d batch shapes in %.1f s", ran, time.perf_counter() - start)
