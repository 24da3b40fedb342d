"""Tensor parallelism: which slice of the model this process holds, and the collectives that join the slices.

One process per device, `size` of them, ranks 0..size-1 (engine_core's TensorParallelExecutor starts them).
Rank r holds heads [r * H / size, (r + 1) * H / size) of every attention layer (query and key/value heads alike;
fewer key/value heads than ranks are replicated), the same slice of every MLP's and expert's intermediate columns,
and rows [r * V / size, ...) of the embedding and of the lm_head (layers/vocab.py). So:
    q/k/v, gate/up  column-parallel: each rank computes its own heads / columns, no communication;
    o_proj, down    row-parallel: each rank multiplies its slice of the input, `all_reduce` sums the partials;
    embedding       vocabulary-parallel: each rank looks up the ids it holds, `all_reduce` sums the rows;
    lm_head         vocabulary-parallel: `all_gather` joins the logits, so every rank samples the same tokens
                    (all ranks run the same sampler with the same seeds on identical logits);
norms and the residual stream are replicated. With size 1 (no group) both collectives are no-ops.
Expert parallelism (`building_expert_parallel`, ModelConfig.enable_expert_parallel) changes only the routed experts:
rank r holds whole experts [r * E / size, (r + 1) * E / size) instead of a slice of every one; the MoE block's
all-reduce sums the ranks' experts as it summed their columns.
On CUDA, small all-reduces (decode steps) run as one symmetric-memory kernel once the runner has called
`prepare_small_all_reduce` (symm_all_reduce.py); larger ones, and every one on CPU (gloo), go through the group.

    init_tensor_parallel(rank, size, init_method, device)   # once per process, before the ModelRunner is built
    get_tp().rank, get_tp().size, get_tp().shard(full, what)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from treadle_model_runner import envs
from treadle_model_runner.symm_all_reduce import SmallAllReduce

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # the process group (None when size is 1)

    def shard(self, full: int, what: str) -> int:
        """This rank's share of `full` (heads, columns); ValueError naming `what` when it does not divide."""
        if full % self.size:
            raise ValueError(
                f"{what} ({full}) is not divisible by tensor_parallel_size ({self.size}); "
                f"use a tensor_parallel_size that divides it"
            )
        return full // self.size


_tp = TensorParallel()
_small: SmallAllReduce | None = None  # small all-reduces on CUDA (symm_all_reduce.py)
_groups_started = 0  # tensor-parallel groups this process has joined
_expert_parallel = False  # inside `building_expert_parallel`: MoE layers built now hold whole experts


@contextlib.contextmanager
def building_expert_parallel(enabled: bool = True) -> Iterator[None]:
    """Within the block (when `enabled`), MoE layers built under a group of more than one rank hold whole experts, a
    contiguous range of E / size of them per rank (expert parallelism, models/sparse_moe.py), instead of a slice of
    every expert's intermediate columns. The ModelRunner builds its model inside it with
    ModelConfig.enable_expert_parallel."""
    global _expert_parallel
    previous, _expert_parallel = _expert_parallel, enabled
    try:
        yield
    finally:
        _expert_parallel = previous


def is_expert_parallel() -> bool:
    """Whether MoE layers built now hold whole experts (inside `building_expert_parallel`, more than one rank)."""
    return _expert_parallel and _tp.size > 1


def get_tp() -> TensorParallel:
    return _tp


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallel:
    """Join the group of `size` processes (NCCL on CUDA, gloo on CPU); blocks until every rank has joined."""
    global _tp, _groups_started
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of size {size}")
    if size == 1:
        _tp = TensorParallel()
        return _tp
    if dist.is_initialized():  # torch's own error would be "initialize the default process group twice"
        raise RuntimeError(
            "this process already has a torch.distributed process group (one an earlier tensor-parallel engine "
            "left behind, as a warning then said, or the caller's own); tensor parallelism starts its own group: "
            "start this engine in a new process"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=size, device_id=device,
                                timeout=timedelta(minutes=10))  # fmt: skip
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(minutes=10))  # fmt: skip
    _tp = TensorParallel(rank, size, dist.group.WORLD)
    _groups_started += 1
    logger.info("tensor parallel: rank %d of %d on %s (%s)", rank, size, device, dist.get_backend())
    return _tp


def prepare_small_all_reduce(dtype: torch.dtype, device: torch.device) -> None:
    """Set up the one-shot kernel for all-reduces of `dtype` (the model's) on every rank: a collective, called by
    each rank's runner once its model is loaded. A no-op without a group, off CUDA, or with the kernel turned off."""
    global _small
    if _tp.size > 1:
        limit = envs.TREADLE_TP_ONE_SHOT_MAX_BYTES()
        _small = SmallAllReduce.create(_tp.group, dtype, device, limit, first_group=_groups_started == 1)


def destroy_tensor_parallel(timeout_s: float = 20.0) -> None:
    """Leave the group. Free the CUDA graphs holding its collectives first (ModelRunner.release_graphs): NCCL's
    teardown waits for them. Every rank should call it at about the same time (an NCCL communicator's shutdown may
    wait for the other ranks), so it runs on a side thread, given up with a warning after `timeout_s`."""
    global _tp, _small
    _tp = TensorParallel()
    _small = None
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="treadle-tp-destroy", daemon=True).start()
    if not done.wait(timeout_s):
        logger.warning(
            "tensor parallel: the process group did not shut down within %.0f s; left behind", timeout_s
        )


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if _tp.size > 1 and not (_small is not None and _small.try_all_reduce(x)):
        dist.all_reduce(x, group=_tp.group)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on every rank -> [..., size * n], rank r's slice at columns [r * n, (r + 1) * n)."""
    if _tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x.contiguous(), group=_tp.group)
    return torch.cat(parts, dim=-1)


def max_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    """The element-wise largest of every rank's `t`, in place (a load-time reduction); returns it."""
    if _tp.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_tp.group)
    return t


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (each rank's KV-cache capacity -> the one all can hold)."""
    if _tp.size == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_tp.group)
    return int(t.item())
