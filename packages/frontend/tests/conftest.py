"""Shared fixtures: a tiny tokenizer (built once per session), input processors and fake engines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeSyncClient, fake_request
from frontend_helpers import make_engine, make_processor, start_fake_server
from tiny_assets import build_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from treadle_frontend.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def processor(tokenizer: Any) -> Any:
    return make_processor(tokenizer)


@pytest.fixture
def llm(tokenizer: Any) -> Any:
    from treadle_frontend.llm import LLM

    return LLM.from_client(FakeSyncClient(make_engine(tokenizer)), make_processor(tokenizer), fake_request)


@pytest.fixture(scope="module")
def fake_server(tokenizer: Any) -> Any:
    server, handle = start_fake_server(tokenizer, api_key="sekret")
    with server:
        yield handle
