"""LoRARequest: which adapter a request runs with (vLLM's `LoRARequest(lora_name, lora_int_id, lora_path)`).

The integer id is the adapter's identity everywhere below the frontend: the scheduler counts distinct ids per step
(at most max_loras), the prefix cache keys blocks by it, and the runner caches loaded weights under it. So one id
must always mean one adapter directory; 0 is reserved for the base model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # the name clients use (the server's `model` field)
    lora_int_id: int  # unique per adapter, >= 1 (0 = no adapter)
    lora_path: str = ""  # the PEFT directory: adapter_config.json + adapter_model.safetensors
    base_model_name: str | None = None  # the served model it adapts (shown as `parent` by /v1/models)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(
                f"lora_int_id must be an integer >= 1 (0 stands for the base model), got {self.lora_int_id!r}"
            )
        if not self.lora_path:
            raise ValueError(
                f"LoRA adapter {self.lora_name!r} has no lora_path; pass the PEFT adapter directory"
            )
