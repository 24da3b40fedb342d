"""End-to-end fixtures: a real `treadle serve` (API-server process + engine process) on a tiny random Llama.

The model directory is built here: a byte-level BPE tokenizer trained on the spot (packages/frontend/tests/
tiny_assets.py), a 2-layer Llama config.json, and `--load-format dummy` (random weights, nothing downloaded).
One server is shared by the whole session; the engine-kill test runs last and stops it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packages" / "frontend" / "tests"))

from e2e_helpers import API_KEY, LLAMA, RealServer, start_server  # noqa: E402
from tiny_assets import build_tokenizer_dir  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The engine-kill test stops the shared server: run it after every other test, whatever the file order."""
    items.sort(key=lambda item: item.name.startswith("test_zz_engine_killed"))


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    model = build_tokenizer_dir(tmp_path_factory.mktemp("tiny_llama"))
    (model / "config.json").write_text(json.dumps(LLAMA))
    extra = [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        # above vLLM's default of 20 (test_max_logprobs_reaches_the_engine), below the 30 test_server_errors refuses
        "--max-logprobs",
        "25",
    ]  # tools change nothing for other requests
    server = start_server(model, tmp_path_factory.mktemp("logs") / "server.log", extra)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oai(real_server: RealServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=real_server.url + "/v1",
        api_key=API_KEY,
        _strict_response_validation=True,
        max_retries=0,
        timeout=60,
    )


@pytest.fixture(scope="module")
def oai_lax(real_server: RealServer) -> openai.OpenAI:
    """Without the SDK's strict validation (which checks a response before the SDK's own post-processing)."""
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
