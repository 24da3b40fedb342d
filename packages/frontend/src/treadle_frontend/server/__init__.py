"""The OpenAI- and Anthropic-compatible HTTP server (FastAPI), its config and its metrics."""

from __future__ import annotations

from treadle_frontend.server.app import build_app
from treadle_frontend.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app"]
