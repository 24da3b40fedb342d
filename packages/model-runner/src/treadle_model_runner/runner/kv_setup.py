"""Sizing the paged KV cache and making a runner ready to step: `initialize_kv_cache(runner)`, run once after the
model is loaded.

Order matters on a GPU. The attention kernels start compiling on a thread pool first (precompile.py). A profiling
forward pass of the largest step measures the peak activation memory (profile.py), then, once no compile thread
can touch the device, a probe captures sample graphs to measure what the CUDA graphs will keep (graph_memory.py).
The cache gets `gpu_memory_utilization x total` less what is in use, that peak and that reserve; on a CPU it is
`kv_cache_space` GiB, capped at what max_num_seqs requests of max_model_len could use. Tensor-parallel ranks take
the smallest count among them. Then the prefill kernels warm up and the graphs are captured for real.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from treadle_model_runner.kv_cache import (
    allocate_kv_caches,
    bytes_per_block,
    cpu_num_blocks,
    gpu_num_blocks,
    kv_cache_groups,
    make_kv_cache_config,
    max_useful_blocks,
)
from treadle_model_runner.kv_cache_spec import KVCacheConfig
from treadle_model_runner.parallel import min_over_ranks
from treadle_model_runner.runner.device_inputs import StepBuffers
from treadle_model_runner.runner.graph_memory import probe_graph_bytes
from treadle_model_runner.runner.graphs import capture_graphs, graphs_wanted
from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.precompile import start_compile_ahead
from treadle_model_runner.runner.profile import profile_peak_activation_bytes
from treadle_model_runner.runner.warmup import warm_up_kernels

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner


def initialize_kv_cache(runner: ModelRunner) -> KVCacheConfig:
    """Size the paged KV cache from memory, allocate it, and capture CUDA graphs."""
    layers = runner.kv_layers()  # the target's, then a draft model's (runner/draft_model.py)
    groups = kv_cache_groups(layers)
    block_size = runner.cache_config.block_size
    runner.layer_to_group = [0] * len(layers)
    for g, group in enumerate(groups):
        for i in group.layer_indices:
            runner.layer_to_group[i] = g
    runner.batch = InputBatch(
        runner.max_num_seqs, runner._max_model_len, block_size, len(groups), runner.device
    )
    runner.buffers = StepBuffers(
        max(runner.max_num_batched_tokens, runner.max_num_seqs),
        runner.max_num_seqs,
        len(groups),
        runner.device,
    )
    runner.builders = [runner.attn_backend.get_builder_cls()(block_size, runner.device) for _ in groups]
    block_bytes = bytes_per_block(layers, block_size, runner.kv_cache_dtype, runner.attn_backend)
    compiling = start_compile_ahead(runner)  # GPU: the passes below then find their kernels compiled
    override = runner.cache_config.num_gpu_blocks_override
    if override is not None:
        num_blocks = override
    elif runner.device.type == "cuda":
        peak = profile_peak_activation_bytes(runner, block_bytes)
        if compiling is not None:
            compiling.wait()  # the probe captures graphs: no compile thread may touch the device then
        runner.graph_bytes_reserved = probe_graph_bytes(runner) if graphs_wanted(runner) else 0
        free, total = torch.cuda.mem_get_info(runner.device)
        num_blocks = gpu_num_blocks(runner.cache_config.gpu_memory_utilization, total, total - free,
                                    peak + runner.graph_bytes_reserved, block_bytes)  # fmt: skip
    else:
        useful = max_useful_blocks(len(groups), runner.max_num_seqs, runner._max_model_len, block_size)
        num_blocks = cpu_num_blocks(runner.cache_config.kv_cache_space, block_bytes, useful)
    num_blocks = min_over_ranks(num_blocks)  # tensor parallel: every rank holds the same blocks
    runner.kv_caches = allocate_kv_caches(layers, num_blocks, block_size, runner.kv_cache_dtype, runner.device,
                                        runner.attn_backend)  # fmt: skip
    runner.kv_cache_config = make_kv_cache_config(layers, num_blocks, block_size, block_bytes)
    if compiling is not None:
        compiling.wait()
    if runner.device.type == "cuda":
        warm_up_kernels(runner)  # compile the prefill kernel variants now, not on a user's request
    capture_graphs(runner)
    if compiling is not None:
        compiling.report()
    return runner.kv_cache_config
