"""HostChange: one change rank 0 made to its LoRA host cache, which every other tensor-parallel rank makes verbatim
(host_cache.py says why rank 0 decides for all). It crosses the process boundary (msgspec encodes it), so this
module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from treadle_model_runner.lora.request import LoRARequest


@dataclass(frozen=True)
class HostChange:
    installed: LoRARequest | None = None  # read by every rank, now in host memory (replacing any with its id)
    dropped: tuple[int, ...] = ()  # adapter ids that left host memory (least recently used, or removed)

    @property
    def changed_ids(self) -> set[int]:
        """The adapters whose device slots no longer match host memory."""
        installed = {self.installed.lora_int_id} if self.installed is not None else set()
        return installed | set(self.dropped)
