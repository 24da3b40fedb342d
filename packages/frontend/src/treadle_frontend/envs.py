"""Environment variables read by treadle_frontend, declared once, typed, read when needed.

A malformed value raises ``ValueError`` naming the variable, the value and the accepted forms. No other module of
treadle_frontend reads ``os.environ``.
"""

from __future__ import annotations

import os

__all__ = ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING"]

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def TREADLE_ALLOW_RUNTIME_LORA_UPDATING() -> bool:
    """Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING):
    anyone holding the API key may then load any adapter directory the server can read. Off unless set."""
    name = "TREADLE_ALLOW_RUNTIME_LORA_UPDATING"
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean; give 1 / true or 0 / false")
