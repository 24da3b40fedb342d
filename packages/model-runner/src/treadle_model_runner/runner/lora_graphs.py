"""CUDA graphs with LoRA enabled: each graph set captured twice, with and without the adapters' path (vLLM's
cudagraph_specialize_lora).

A graph replays exactly the kernels it captured, so one captured with the LoRA path runs it in every step, adding
zeros for base-model rows and keeping the norm + projection and activation + down_proj fusions off (lora/layer.py):
11 % of decode throughput on an H200 with no adapter in the batch. So with LoRA on, every set (decode, piecewise,
one-request prefill) is captured once with `TokenMask.has_adapters` forced true and once forced false, and a replay
picks the variant by the flag `LoRAManager.prepare_step` set for the step: whether any row runs an adapter.

Memory: both variants of a set are captured into one memory pool (they never run at the same time), the variant
with adapters first; the second reuses the pool's transient memory and adds its executables, its outputs and, for
piecewise graphs, the attention inputs and outputs each bucket keeps alive. The memory probe (graph_memory.py)
captures both variants too and estimates each; each capture logs its time and memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from treadle_model_runner.lora.layer import TokenMask
from treadle_model_runner.runner.cuda_graph import GraphSet

logger = logging.getLogger(__name__)


S = TypeVar("S", bound=GraphSet)


class LoRAVariants:
    """A graph set's two captures; the runner uses it as one set."""

    def __init__(self, with_adapters: GraphSet, without: GraphSet, mask: TokenMask) -> None:
        self.with_adapters, self.without, self.mask = with_adapters, without, mask
        self.sizes = with_adapters.sizes

    @property
    def variants(self) -> tuple[GraphSet, GraphSet]:
        return self.with_adapters, self.without

    @property
    def memory_bytes(self) -> int:
        return self.with_adapters.memory_bytes + self.without.memory_bytes

    @property
    def is_captured(self) -> bool:
        return self.with_adapters.is_captured and self.without.is_captured

    def padded_size(self, n: int) -> int | None:
        return self.with_adapters.padded_size(n)

    def has(self, size: int) -> bool:
        return self.with_adapters.has(size) and self.without.has(size)

    def replay(self, size: int) -> torch.Tensor:
        return (self.with_adapters if self.mask.has_adapters else self.without).replay(size)

    def release(self) -> None:
        self.with_adapters.release()
        self.without.release()


def variants_of(graphs: GraphSet) -> tuple[GraphSet, ...]:
    """The captures a set is made of: its two LoRA variants, or itself."""
    return graphs.variants if isinstance(graphs, LoRAVariants) else (graphs,)


def capture_set(
    mask: TokenMask | None, new: Callable[[str], S], capture: Callable[[S, Any], None]
) -> list[S]:
    """Capture a graph set: once (`mask` None: LoRA off), or once per LoRA variant into one pool. `new(kind)` makes
    an empty set (`kind` names the variant in the log), `capture(set, pool)` captures it. Returns the captures
    (with adapters first); empty when one failed (what the others took is released)."""
    if mask is None:
        graphs = new("")
        capture(graphs, None)
        return [graphs] if graphs.is_captured else []
    pool = torch.cuda.graph_pool_handle()
    captured: list[S] = []
    try:
        for has_adapters, kind in (
            (True, " (steps running a LoRA adapter)"),
            (False, " (steps without adapters)"),
        ):
            graphs = new(kind)
            captured.append(graphs)
            with mask.forcing(has_adapters):
                capture(graphs, pool)
            if not graphs.is_captured:
                raise _CaptureFailed
    except BaseException as exc:
        for done in captured:
            done.release()
        if isinstance(exc, _CaptureFailed):
            return []
        raise
    return captured


class _CaptureFailed(Exception):
    """One variant's capture failed (and logged why): the set runs eagerly."""


def as_one_set(captured: list[S], mask: TokenMask | None) -> GraphSet | None:
    """What `capture_set` returned as the set the runner replays (None: nothing captured)."""
    if not captured:
        return None
    if mask is None:
        return captured[0]
    with_adapters, without = captured
    extra = without.memory_bytes / (1 << 20)
    logger.info("LoRA: %s captured again without the adapters' path for steps of base-model rows only "
                "(%.0f MiB more)", type(without).__name__, extra)  # fmt: skip
    return LoRAVariants(with_adapters, without, mask)
