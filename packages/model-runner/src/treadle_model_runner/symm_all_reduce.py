"""Small all-reduces through symmetric memory, for tensor parallelism on CUDA (parallel.all_reduce uses it).

A decode step all-reduces a few KiB per layer twice (Llama-3.1-8B at batch 1: 8 KiB, 65 times a step), where
NCCL's all-reduce costs its latency, not its bandwidth. Here every rank owns a buffer its peers can read over
NVLink (torch's symmetric memory): a rank copies its partial sum into its buffer, and one kernel
(`torch.ops.symm_mem.one_shot_all_reduce_out`) waits until every rank has copied, adds all ranks' buffers, writes
the sum back into the input, and waits again until every rank has read (so the buffer can be reused at once).
Tensors above `max_bytes`, or of another dtype, layout or size, keep NCCL.

Start-up (`SmallAllReduce.create`, every rank at the same point, outside any CUDA-graph capture): the buffer is
allocated and exchanged, then one all-reduce is checked against NCCL's sum; all ranks use the kernel only if every
rank's check passed, else all keep NCCL and the log says why. TREADLE_TP_ONE_SHOT_MAX_BYTES=0 turns it off.

Measured on two H200s (torch 2.11; benchmarks/results/gpu-tp-shutdown-oneshot-h200x2-a5f7c41): 64 all-reduces
back to back in a CUDA graph, 7.1 us each against NCCL's 21.4 at 8 KiB, 20.3 against 37.7 at 2 MiB. Llama-3.1-8B at
-tp 2: batch 1 gains 0.6-1.2 % (3.08-3.10 against 3.10-3.16 ms per token; at batch 1 the weight reads set the pace,
and inside the model NCCL's kernel takes 7.2 us against this one's 6.7); 1000 x 1024/1024 gains 5 % with the 2 MiB
default over a 512 KiB limit (16,623 / 16,631 against 15,809 / 15,824 output tok/s, alternating on one machine).
More than two ranks is unmeasured (each rank then reads every peer's buffer).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float32)  # those torch's one-shot kernel sums


class SmallAllReduce:
    """One rank's symmetric buffer for all-reduces of up to `max_bytes` of `dtype`."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int) -> None:
        self.buffer = buffer
        self.group_name = group_name
        self.max_bytes = max_bytes

    @classmethod
    def create(
        cls, group: Any, dtype: torch.dtype, device: torch.device, max_bytes: int, first_group: bool = True
    ) -> SmallAllReduce | None:
        """The buffer, exchanged and checked on every rank of `group`; None (NCCL for everything) when off, not
        supported, or any rank's check failed. A collective: every rank must call it together. `first_group`:
        whether this is the first tensor-parallel group of this process (see `_why_not`)."""
        if device.type != "cuda":
            return None
        why_not = _why_not(dtype, max_bytes, first_group) or _no_peer_access(
            device, dist.get_world_size(group)
        )
        if not _all_ranks_agree(not why_not, group, device):
            if max_bytes > 0:
                logger.info(
                    "tensor parallel: NCCL for every all-reduce (%s)", why_not or "so says another rank"
                )
            return None
        small: SmallAllReduce | None = None
        try:
            small = cls._exchange(group, dtype, device, max_bytes)
            why_not = small._check(group)
        except Exception as exc:  # e.g. no peer access between the devices, or a torch without the kernel
            why_not = f"{type(exc).__name__}: {exc}"
        if not _all_ranks_agree(not why_not, group, device):
            logger.warning("tensor parallel: one-shot all-reduce not used (%s); NCCL for every all-reduce",
                           why_not or "another rank's check failed")  # fmt: skip
            return None
        logger.info("tensor parallel: all-reduces of up to %d KiB run as one symmetric-memory kernel; NCCL above",
                    max_bytes >> 10)  # fmt: skip
        return small

    @classmethod
    def _exchange(
        cls, group: Any, dtype: torch.dtype, device: torch.device, max_bytes: int
    ) -> SmallAllReduce:
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # required by older torch, a deprecated no-op in newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(group.group_name)
        itemsize = torch.tensor([], dtype=dtype).element_size()
        buffer = symm_mem.empty(max_bytes // itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group.group_name)
        return cls(buffer, group.group_name, max_bytes)

    def _check(self, group: Any) -> str:
        """'' when one all-reduce through the kernel equals NCCL's; else what differed."""
        device = self.buffer.device
        gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank(group))
        x = torch.randn(3, 1024, generator=gen, device=device).to(
            self.buffer.dtype
        )  # different on every rank
        expected = x.clone()
        dist.all_reduce(expected, group=group)
        if not self.try_all_reduce(x):
            return "the check's tensor was not eligible"
        if not torch.allclose(x.float(), expected.float(), rtol=1e-2, atol=1e-2):
            return f"its sum differs from NCCL's by up to {(x.float() - expected.float()).abs().max().item():.3g}"
        return ""

    def try_all_reduce(self, x: torch.Tensor) -> bool:
        """Sum `x` over the ranks in place; False (nothing done) when `x` is not eligible: the caller uses NCCL."""
        nbytes = x.numel() * x.element_size()
        if x.dtype != self.buffer.dtype or nbytes > self.max_bytes or nbytes % 16 or not x.is_contiguous():
            return False
        flat = x.view(-1)
        staged = self.buffer[: flat.numel()]
        staged.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        return True


def _why_not(dtype: torch.dtype, max_bytes: int, first_group: bool) -> str:
    if max_bytes <= 0:
        return "TREADLE_TP_ONE_SHOT_MAX_BYTES=0"
    if dtype not in _DTYPES:
        return f"the one-shot kernel does not sum {dtype}"
    if not first_group:
        # seen on two H200s (torch 2.11): a second group in one process (one offline LLM after another) hung in
        # the symmetric-memory exchange; our reading, not verified: torch keeps that state by group name, and the
        # new group takes the destroyed first group's name
        return "this process had a tensor-parallel group before"
    return ""


def _no_peer_access(device: torch.device, size: int) -> str:
    """'' when this rank's GPU can read every other rank's directly (ranks hold cuda:0..size-1, tp_executor)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        blocked = [p for p in range(size) if p != index and not torch.cuda.can_device_access_peer(index, p)]
    except RuntimeError as exc:
        return f"peer access could not be checked ({exc})"
    return f"cuda:{index} cannot read cuda:{blocked[0]} directly (no peer access)" if blocked else ""


def _all_ranks_agree(ok: bool, group: Any, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
