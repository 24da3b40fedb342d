"""Runs the FastAPI app under uvicorn in a background thread on a free localhost port (tests only)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    """A free localhost port: the system's pick, or the first free one of TREADLE_TEST_PORTS ("18600-18699") when
    that is set, for machines where test servers keep to a range."""
    span = os.environ.get("TREADLE_TEST_PORTS")
    low, _, high = (span or "0-0").partition("-")
    for port in range(int(low), int(high or low) + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in TREADLE_TEST_PORTS={span}")


class ThreadedServer:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/version", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("test server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
