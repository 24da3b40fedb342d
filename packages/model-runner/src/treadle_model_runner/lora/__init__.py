"""LoRA adapters (PEFT format) served on top of a loaded model: many adapters, one batch.

`LoRARequest` names an adapter; `LoRAManager` (the runner's) loads, caches and places adapters and builds each
step's token -> adapter mask; `lora/layer.py` holds the math; under tensor parallelism rank 0's host cache decides
for every rank (`lora/host_cache.py`, its changes sent as `lora/change.py`'s HostChange). Heavy modules (torch)
load on first use.
"""

from __future__ import annotations

from treadle_model_runner.lora.request import LoRARequest

__all__ = ["LoRARequest"]
