"""CORS as vLLM serves it: any origin by default (a browser page may call the API, preflight included); with
`allowed_origins` set, only those origins get the header."""

from __future__ import annotations

from typing import Any

import httpx
from frontend_helpers import start_fake_server

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_any_origin_by_default(fake_server: Any) -> None:
    r = httpx.options(
        fake_server.url + "/v1/chat/completions", headers={"Origin": "http://page.example", **PREFLIGHT}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.get(fake_server.url + "/health", headers={"Origin": "http://page.example"})
    assert r.headers["access-control-allow-origin"] == "*"


def test_only_the_allowed_origins(tokenizer: Any) -> None:
    server, handle = start_fake_server(tokenizer, server_options={"allowed_origins": ("http://ok.example",)})
    with server:
        ok = httpx.options(
            handle.url + "/v1/completions", headers={"Origin": "http://ok.example", **PREFLIGHT}
        )
        other = httpx.options(
            handle.url + "/v1/completions", headers={"Origin": "http://evil.example", **PREFLIGHT}
        )
    assert ok.headers["access-control-allow-origin"] == "http://ok.example"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
