"""The runner's adapters: loaded in host memory (host_cache.py), placed in device slots, chosen per token each step.

Three levels, as in vLLM:
- host cache: up to `max_cpu_loras` loaded and checked adapters, least recently used evicted, those of admitted
  requests held (host_cache.py says why: a step never reads disk, so a failed load fails one request, at admission);
- device slots: `max_loras` per LoRA layer (layer.py). A step's adapters are put in slots before it runs; a slot
  whose adapter the step does not use is reused. The scheduler never puts more than max_loras distinct adapters in
  one step, so every step fits.

Per step (`prepare_step`, before the step's other inputs are staged): row r of the persistent batch runs adapter
`batch.lora_ids[r]` (0 = base model); its slot, repeated over the row's scheduled tokens (numpy, per request not per
token), is uploaded as token -> slot, and the device turns it into the one-hot token mask every LoRA layer reads:
mask[t, s] = (slot[t] == s), padding rows zero.

Under tensor parallelism each rank's runner has a manager of its own. Rank 0's is given the add / hold / remove
calls and decides what its host cache loads and evicts; the other ranks' make the same changes (`read`, `apply`:
host_cache.py says why rank 0 decides for all, engine_core's tp_executor.py carries them). Each rank reads the
adapter, checks it against the checkpoint's shapes, and keeps only its part in host memory and slots (layer.py says
which part). A slot is forgotten when its adapter is installed again (an in-place reload, or a reload after
eviction) or leaves host memory, so every adapter in a slot has the weights host memory has.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora.adapter import LoRAAdapter, LoRAWeights, load_adapter
from treadle_model_runner.lora.change import HostChange
from treadle_model_runner.lora.host_cache import Followers, HostCache
from treadle_model_runner.lora.layer import LoRATarget, TokenMask, attach_lora
from treadle_model_runner.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.model_name = type(model).__name__
        self.mask = TokenMask(torch.zeros(max_num_tokens, config.max_loras, dtype=dtype, device=device))
        self.targets: dict[str, LoRATarget] = attach_lora(
            model, config.max_loras, config.max_lora_rank, self.mask
        )
        if not self.targets:
            raise ValueError(
                f"{self.model_name} has no LoRA-capable projections; start it without enable_lora"
            )
        self.shapes = {name: (t.in_features, t.out_features) for name, t in self.targets.items()}
        self.dtype = dtype
        self.pin = device.type == "cuda"  # host tensors page-locked: slot copies run asynchronously
        self.cache = HostCache(config.num_cpu_loras, self._load, self._forget_slots)
        self.slot_ids = [0] * config.max_loras  # slot -> adapter id in it (0: empty)
        self.staged_slots = torch.zeros(max_num_tokens, dtype=torch.int64, pin_memory=self.pin)
        self.token_slots = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.is_slot = torch.zeros(max_num_tokens, config.max_loras, dtype=torch.bool, device=device)
        self.slot_range = torch.arange(config.max_loras, device=device)
        layers = {id(t.slots) for t in self.targets.values()}
        logger.info("LoRA: %d projections take adapters, %d slots of rank <= %d, %d adapters cached on the host",
                    len(layers), config.max_loras, config.max_lora_rank, config.num_cpu_loras)  # fmt: skip

    # ---- adapters ---------------------------------------------------------------------------------
    def add(self, request: LoRARequest, replace: bool = False) -> None:
        """Load and check `request`'s adapter into host memory (a cache hit only refreshes it); ValueError for an
        adapter this model cannot run (adapter.py). `replace`: read it again and let the next step put the new
        weights in its slot (vLLM's load_inplace)."""
        self.cache.add(request, replace)

    def hold(self, request_id: str, request: LoRARequest) -> None:
        """Keep an admitted request's adapter in host memory until it finishes (host_cache.py)."""
        self.cache.hold(request_id, request)

    def release(self, request_ids: Iterable[str]) -> None:
        self.cache.release(request_ids)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter; False if it was not loaded. Requests holding it keep it."""
        return self.cache.remove(lora_id)

    def list_loras(self) -> list[int]:
        return self.cache.ids()

    # ---- tensor parallelism: rank 0 leads, the other ranks follow (host_cache.py) ---------------------
    def lead(self, followers: Followers) -> None:
        """Rank 0: every load this manager's cache decides is read by `followers` too, and every change made there."""
        self.cache.followers = followers

    def read(self, request: LoRARequest) -> None:
        """Another rank: read and check an adapter rank 0 is loading, kept aside until `apply` (ValueError when this
        rank cannot read it)."""
        self.cache.stage(request)

    def apply(self, change: HostChange) -> None:
        """Another rank: make a change rank 0 made to its host memory."""
        self.cache.apply(change)

    def _forget_slots(self, lora_ids: set[int]) -> None:
        """The slots of these adapters no longer match host memory: the next step that runs one fills a slot again."""
        with self.cache.lock:
            self.slot_ids = [0 if i in lora_ids else i for i in self.slot_ids]

    def _load(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter (against the checkpoint's shapes); keep this rank's part of its tensors, in the
        model's dtype, page-locked on CUDA."""
        adapter = load_adapter(request, self.shapes, self.config.max_lora_rank, self.model_name)

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.dtype).contiguous()
            return t.pin_memory() if self.pin else t

        modules = {}
        for name, weights in adapter.modules.items():
            part = self.targets[name].rank_part(weights)  # under tensor parallelism: this rank's (layer.py)
            modules[name] = LoRAWeights(host(part.lora_a), host(part.lora_b))
        return dataclasses.replace(adapter, modules=modules)

    # ---- one step ---------------------------------------------------------------------------------
    def prepare_step(self, lora_ids: np.ndarray, num_scheduled: np.ndarray, padded: int) -> None:
        """Put the step's adapters in slots and write the token mask for `padded` tokens. `lora_ids` [R]: each
        row's adapter id (0 = none); every one is held in host memory (hold)."""
        num_tokens = int(num_scheduled.sum())
        step_ids = np.unique(lora_ids[lora_ids > 0])
        self.mask.has_adapters = bool(step_ids.size)
        if not step_ids.size:  # the LoRA layers read nothing this step (layer.py)
            return
        assert step_ids.size <= self.config.max_loras, (
            f"{step_ids.size} adapters in one step, more than max_loras ({self.config.max_loras}): the scheduler "
            "must keep to it"
        )
        row_slots = np.full(lora_ids.shape, -1, dtype=np.int64)
        wanted = set(step_ids.tolist())
        with self.cache.lock:
            for lora_id in wanted:
                row_slots[lora_ids == lora_id] = self._slot_of(lora_id, wanted)
        staged = self.staged_slots.numpy()
        staged[:num_tokens] = np.repeat(row_slots, num_scheduled)
        slots = self.token_slots[:num_tokens]
        slots.copy_(self.staged_slots[:num_tokens], non_blocking=True)
        torch.eq(slots[:, None], self.slot_range, out=self.is_slot[:num_tokens])
        self.mask.buffer[:num_tokens].copy_(self.is_slot[:num_tokens])
        self.mask.buffer[num_tokens:padded].zero_()

    def _slot_of(self, lora_id: int, wanted: set[int]) -> int:
        """The slot holding `lora_id`, copying it (from host memory) into one no adapter of this step uses if need
        be. The copies are asynchronous, on the stream the step then runs on."""
        if lora_id in self.slot_ids:
            return self.slot_ids.index(lora_id)
        slot = next(s for s, held in enumerate(self.slot_ids) if held not in wanted)
        adapter = self.cache.get(lora_id)
        for name, target in self.targets.items():
            target.slots.set_slot(slot, target.shard, adapter.modules.get(name))
        self.slot_ids[slot] = lora_id
        logger.debug("LoRA adapter %s (id %d) now in slot %d", adapter.name, lora_id, slot)
        return slot
