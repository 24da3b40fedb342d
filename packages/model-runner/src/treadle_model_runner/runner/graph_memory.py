"""How much device memory the decode CUDA graphs will take, measured before the KV cache is sized (GPU only).

Theory: the graphs share one private pool, sized by the largest batch's activations (captured first); every other
size adds its executable and whatever its attention backend allocates per captured size (FlashInfer: one
graph-mode wrapper with its own buffers). So capturing just the largest and the smallest size measures both
terms, and all sizes take about largest + (n - 1) x smallest. The probe runs over a one-block KV cache (decode
padding reads only the null block), then drops its graphs and returns the memory; the runner subtracts the
estimate from the KV budget, captures for real after the KV cache is allocated, and logs measured against
estimated.

Piecewise graphs (piecewise.py) are probed the same way, at their largest and smallest token bucket; besides
the shared pool and an executable per piece, each bucket keeps its attention inputs and outputs alive, which grow
with its token count: the estimate adds, per other bucket, the smallest bucket's pieces plus the largest bucket's
kept bytes per token times its tokens.

One-request prefill graphs (prefill_graphs.py) are whole forwards like the decode graphs, by token bucket: the
same largest + (n - 1) x smallest estimate over their largest and smallest bucket; verify graphs
(batch_graphs.py, speculative decoding) the same over their largest and smallest request count, and mixed graphs
(batch_graphs.py) over their largest and smallest token bucket; where mixed graphs are wanted the piecewise graphs
are not captured, nor probed.

With LoRA enabled every set is probed in both its variants (lora_graphs.py), each estimated as above. A draft
model's decode, piecewise and one-request prefill graphs (draft_model.py) are probed and estimated like the
target's.

Invariants: the probe leaves no graph and no cache behind; if it fails it estimates 0 with a warning (the real
capture then reports its own failure and the runner runs eagerly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from treadle_model_runner.kv_cache import allocate_kv_caches
from treadle_model_runner.runner.batch_graphs import (
    capture_mixed,
    capture_verify,
    mixed_sizes,
    verify_graphs_wanted,
    verify_sizes,
)
from treadle_model_runner.runner.cuda_graph import CudaGraphRunner, GraphSet, capture_sizes
from treadle_model_runner.runner.draft_graphs import pair_sizes
from treadle_model_runner.runner.graphs import (
    piecewise_sizes,
    prefill_graphs_wanted,
    prepare_decode_capture,
    prepare_piecewise_capture,
    prepare_prefill_capture,
)
from treadle_model_runner.runner.lora_graphs import capture_set
from treadle_model_runner.runner.piecewise import PiecewiseGraphs

if TYPE_CHECKING:
    from treadle_model_runner.runner.draft_graphs import DraftGraphs
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_MiB = 1 << 20


def estimate_graph_bytes(memory_by_size: dict[int, int], num_sizes: int) -> int:
    """All `num_sizes` graphs from a probe of the largest and the smallest size (size -> bytes it took)."""
    if not memory_by_size or num_sizes < 1:
        return 0
    largest, smallest = memory_by_size[max(memory_by_size)], memory_by_size[min(memory_by_size)]
    return largest + (num_sizes - 1) * smallest


def estimate_piecewise_bytes(
    memory_by_size: dict[int, int], held_by_size: dict[int, int], sizes: list[int]
) -> int:
    """All piecewise buckets `sizes` from a probe of the largest and the smallest (bucket -> bytes taken / kept)."""
    if not memory_by_size or not sizes:
        return 0
    largest, smallest = max(memory_by_size), min(memory_by_size)
    pieces = max(
        0, memory_by_size[smallest] - held_by_size[smallest]
    )  # executables: the same for each bucket
    held_per_token = held_by_size[largest] / largest
    return memory_by_size[largest] + sum(pieces + int(held_per_token * s) for s in sizes if s != largest)


@torch.inference_mode()
def probe_graph_bytes(runner: ModelRunner) -> int:
    """Capture the largest and the smallest size of every graph set the runner will capture (module docstring)
    over a one-block cache; the estimate for all of them."""
    sizes = capture_sizes(runner.max_num_seqs)
    layers = runner.kv_layers()  # a draft model's too
    runner.kv_caches = allocate_kv_caches(layers, 1, runner.cache_config.block_size, runner.kv_cache_dtype,
                                          runner.device, runner.attn_backend)  # fmt: skip
    buckets = piecewise_sizes(runner)
    prefill_buckets = buckets if prefill_graphs_wanted(runner) else []
    mask = runner.lora.mask if runner.lora is not None else None  # LoRA: both variants of each set
    decode: list[CudaGraphRunner] = []
    pieces: list[PiecewiseGraphs] = []
    prefill: list[CudaGraphRunner] = []
    verify: list[CudaGraphRunner] = []
    verify_counts = verify_sizes(runner) if verify_graphs_wanted(runner) else []
    mixed_buckets = mixed_sizes(runner)
    mixed: list[CudaGraphRunner] = []
    drafter = runner.drafter

    def whole(
        ends: list[int], name: str, make: Callable[[int], Callable[[], torch.Tensor]]
    ) -> list[CudaGraphRunner]:
        """A set of whole-forward graphs at the largest and the smallest of `ends` (both LoRA variants)."""
        if not ends:
            return []
        return capture_set(mask, lambda kind: CudaGraphRunner(_ends(ends), f"{name} (memory probe){kind}"),
                           lambda g, pool: g.capture(make, pool))  # fmt: skip

    try:
        decode = whole(sizes, "decode batch", lambda size: prepare_decode_capture(runner, size))
        if buckets and not mixed_buckets:
            pieces = capture_set(
                mask, lambda kind: PiecewiseGraphs(_ends(buckets), " (memory probe)" + kind),
                lambda g, pool: g.capture(lambda size, split: prepare_piecewise_capture(runner, size, split), pool),
            )  # fmt: skip
        prefill = whole(
            prefill_buckets, "one-request prefill", lambda size: prepare_prefill_capture(runner, size)
        )
        verify = whole(verify_counts, "verify batch", lambda size: capture_verify(runner, size))
        mixed = whole(mixed_buckets, "mixed batch", lambda size: capture_mixed(runner, size))
        if drafter is not None:
            drafter.capture(runner, _ends(buckets), bool(prefill_buckets), _ends(sizes), " (memory probe)")
    except Exception as exc:  # an estimate only: the real capture reports its own failure
        logger.warning("CUDA graph memory probe failed (%s); reserving nothing for the graphs", str(exc))
        decode = []
    finally:
        measured = [dict(g.memory_by_size) for g in decode]
        piece_bytes = sum(
            estimate_piecewise_bytes(g.memory_by_size, g.held_bytes_by_size, buckets) for g in pieces
        )
        prefill_bytes = sum(estimate_graph_bytes(g.memory_by_size, len(prefill_buckets)) for g in prefill)
        batch_bytes = sum(estimate_graph_bytes(g.memory_by_size, len(verify_counts)) for g in verify)
        batch_bytes += sum(estimate_graph_bytes(g.memory_by_size, len(mixed_buckets)) for g in mixed)
        draft_bytes = 0
        if drafter is not None:
            num_pairs = len(pair_sizes(runner, sizes))
            draft_bytes = _draft_bytes(drafter.sets, len(sizes), buckets, len(prefill_buckets), num_pairs)
            drafter.release_graphs()
        probes: list[GraphSet] = [*decode, *pieces, *prefill, *verify, *mixed]
        for graphs in probes:
            graphs.release()
        del decode, pieces, prefill, verify, mixed
        runner.kv_caches = []
        torch.cuda.synchronize(runner.device)
        torch.cuda.empty_cache()
    estimate = sum(estimate_graph_bytes(m, len(sizes)) for m in measured)
    probed = "; ".join(
        ", ".join(f"size {s} {b / _MiB:.0f} MiB" for s, b in sorted(m.items())) for m in measured
    )
    logger.info("CUDA graph memory: %.0f MiB expected for %d decode sizes%s (probe: %s), %.0f MiB for %d "
                "piecewise token buckets, %.0f MiB for %d one-request prefill buckets and %.0f MiB for %d verify "
                "and %d mixed batch sizes; %.0f MiB for a draft model's graphs", estimate / _MiB, len(sizes),
                " in two LoRA variants" if len(measured) == 2 else "", probed, piece_bytes / _MiB, len(buckets),
                prefill_bytes / _MiB, len(prefill_buckets), batch_bytes / _MiB, len(verify_counts),
                len(mixed_buckets), draft_bytes / _MiB)  # fmt: skip
    return estimate + piece_bytes + prefill_bytes + batch_bytes + draft_bytes


def _ends(sizes: list[int]) -> list[int]:
    """The largest and the smallest of `sizes` (what a probe captures), or none."""
    return sorted({sizes[0], sizes[-1]}) if sizes else []


def _draft_bytes(
    drafter: DraftGraphs, num_decode: int, buckets: list[int], num_prefill: int, num_pairs: int
) -> int:
    """All of a draft model's graphs from its probe's captures (draft_graphs.py: decode, piecewise, prefill,
    two-token passes)."""
    total = estimate_graph_bytes(drafter.graphs.memory_by_size, num_decode) if drafter.graphs else 0
    if drafter.pair_graphs is not None:
        total += estimate_graph_bytes(drafter.pair_graphs.memory_by_size, num_pairs)
    if drafter.piecewise is not None:
        pieces = drafter.piecewise
        total += estimate_piecewise_bytes(pieces.memory_by_size, pieces.held_bytes_by_size, buckets)
    if drafter.prefill_graphs is not None:
        total += estimate_graph_bytes(drafter.prefill_graphs.memory_by_size, num_prefill)
    return total
