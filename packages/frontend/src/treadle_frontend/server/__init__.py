"""The OpenAI- and Anthropic-compatible HTTP server (FastAPI), its config and its metrics.

``build_app`` is imported on first use (PEP 562): ``ServerConfig`` alone must not pull in FastAPI and pydantic, so
``treadle serve`` can validate its flags and spawn the engine before paying for the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadle_frontend.server.config import ServerConfig

if TYPE_CHECKING:
    from treadle_frontend.server.app import build_app

__all__ = ["ServerConfig", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from treadle_frontend.server.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
