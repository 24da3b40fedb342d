"""Full CUDA graphs for a step that prefills one request: a short prompt, a chunk of a long one, or the tail the
prefix cache leaves to compute (the batch-1 latency case).

A step with several requests that is not decode-only runs piecewise graphs around eager attention
(piecewise.py): its attention launches depend on the batch's query lengths. With exactly one request they need
not, on a backend that declares ``supports_prefill_graphs``: its launches must read the step only from the
persistent device metadata, so that a launch captured for one request of ``B`` query tokens serves any one
request of up to ``B`` tokens (Triton's unified kernel finds each program's query tile through
``query_start_loc`` on the device and skips tiles past the request's tokens; rotary and the KV write run over
all ``B`` rows, the padding rows with position 0 and slot -1). Such a step then launches nothing from Python:
at batch 1 an eager or piecewise prefill of the 16 tokens left after the prefix cache took 8-19 ms of host
time for ~4.5 ms of GPU work (Llama-3.1-8B on an H200, benchmarks/results/gpu-latency-norm-h200-890ddaa).

Capture: per token bucket (the piecewise buckets), the step buffers are filled with a harmless batch (one token
at position 0 over the null block, the rest padding with slot -1) and the forward is captured with the metadata
of one request of ``B`` tokens over those buffers (``capture_metadata``), into one memory pool, largest bucket
first. Replay: prepare_inputs writes the real request of ``T`` tokens into the same buffers (its ``B - T``
padding tokens with slot -1); the host integers of the capture stay baked into the launches.
``TREADLE_PREFILL_GRAPHS=0`` turns them off (such steps run piecewise again).
"""

from __future__ import annotations

import torch

from treadle_kernels.attention import AttentionMetadata
from treadle_model_runner.runner.device_inputs import StepBuffers, compute_on_device
from treadle_model_runner.runner.input_batch import InputBatch

__all__ = ["capture_metadata"]


def capture_metadata(batch: InputBatch, buffers: StepBuffers, size: int) -> list[AttentionMetadata]:
    """Fill the step buffers with a harmless batch (one request of one token at position 0 over the null block,
    ``size - 1`` padding tokens with slot -1) and return, per KV-cache group, the metadata a prefill graph of
    ``size`` tokens captures: one request of ``size`` query tokens over those buffers."""
    tables = [table.commit(1) for table in batch.block_tables]
    compute_on_device(buffers, batch.block_tables, 0, 0, size, 1)
    return [
        AttentionMetadata(
            num_actual_tokens=size,
            max_query_len=size,
            max_seq_len=size,
            query_start_loc=buffers.query_start_loc[:2],
            query_start_loc_cpu=torch.tensor([0, size], dtype=torch.int32),
            seq_lens=buffers.seq_lens[:1],
            seq_lens_cpu=torch.tensor([size], dtype=torch.int32),
            block_table=table,
            slot_mapping=slots[:size],
        )
        for table, slots in zip(tables, buffers.slot_mappings, strict=True)
    ]
