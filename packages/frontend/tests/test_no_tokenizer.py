"""A model directory without tokenizer files (a dummy-weight config dir): token-id prompts work, text is a 400."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_engine import FakeAsyncClient, FakeEngine, fake_request
from server_harness import ThreadedServer

VOCAB = 512


def _server(path: Path) -> ThreadedServer:
    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.input_processor import InputProcessor, ModelInfo
    from treadle_frontend.server import ServerConfig, build_app
    from treadle_frontend.tokenizer import NoTokenizer, load_tokenizer, resolve_chat_template

    tok = load_tokenizer(path)
    assert isinstance(tok, NoTokenizer)
    info = ModelInfo(name="dummy", path=path, max_model_len=256, vocab_size=VOCAB)
    processor = InputProcessor(tok, info, chat_template=resolve_chat_template(tok, None))
    client = FakeAsyncClient(FakeEngine(VOCAB, set(), eos_id=2))
    llm = AsyncLLM(client, processor, request_factory=fake_request)
    return ThreadedServer(build_app(llm, ServerConfig(host="127.0.0.1", served_model_name="dummy")))


def test_config_dir_serves_token_ids_only(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB}))
    with _server(tmp_path) as server:
        url = server.url + "/v1/completions"
        body: dict[str, Any] = {"model": "dummy", "prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True}
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == 6 and out["usage"]["prompt_tokens"] == 4
        assert re.fullmatch(r"(<\d+>){6}", out["choices"][0]["text"]), out["choices"][0]["text"]
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url, json=stream, timeout=30) as s:
            chunks = [json.loads(ln[5:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert len(texts) == 6 and all(re.fullmatch(r"<\d+>", t) for t in texts), texts  # a chunk per token
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        r = httpx.post(url, json={**body, "prompt": "hello"}, timeout=30)
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
        chat = {"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=30).status_code == 400


def test_broken_tokenizer_still_an_error(tmp_path: Path) -> None:
    from treadle_frontend.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)
