"""Environment variables read by treadle_frontend, declared once, typed, read when needed.

A malformed value raises ``ValueError`` naming the variable, the value and the accepted forms. No other module of
treadle_frontend reads ``os.environ``.
"""

from __future__ import annotations

import os

__all__ = ["TREADLE_ALLOW_RUNTIME_LORA_UPDATING", "TREADLE_RESPONSES_STORE_SIZE"]

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


def TREADLE_RESPONSES_STORE_SIZE() -> int:
    """How many /v1/responses responses the server keeps for previous_response_id and GET /v1/responses/{id}
    (server/responses_store.py): the newest, in memory; 0 keeps none. Default 1024."""
    name = "TREADLE_RESPONSES_STORE_SIZE"
    raw = os.environ.get(name, "1024").strip()
    if not raw.isdigit():
        raise ValueError(f"environment variable {name}={raw!r} is not a count; give an integer >= 0")
    return int(raw)
