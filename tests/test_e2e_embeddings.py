"""POST /v1/embeddings through the openai SDK on the real server (tiny dummy Llama): one unit-length vector of
hidden_size floats per input, in input order, whether the SDK asks for base64 (its default) or floats; token-id
inputs; usage counts the prompt tokens; the vectors equal the offline `LLM.embed` of the same weights; `dimensions`
and empty input are 400s."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
from e2e_helpers import API_KEY, LLAMA, MODEL_NAME, RealServer

from treadle import LLM

IDS = [[5, 9, 13, 2, 40, 7], [3, 3, 3], list(range(20, 60))]


def test_embeddings_through_the_sdk(oai: openai.OpenAI, oai_lax: openai.OpenAI, tmp_path: Path) -> None:
    texts = ["The capital of France is", "hello", "a much longer input, of several words and a comma"]
    # the SDK asks for base64 and decodes it after validating (a strict client would see the base64 string)
    default = oai_lax.embeddings.create(model=MODEL_NAME, input=texts)
    floats = oai.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == LLAMA["hidden_size"]
        assert math.isclose(math.fsum(x * x for x in a.embedding), 1.0, rel_tol=1e-5)
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert default.data[0].embedding != pytest.approx(default.data[1].embedding, abs=1e-3)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3

    by_ids = oai.embeddings.create(model=MODEL_NAME, input=IDS, encoding_format="float")
    assert by_ids.usage.prompt_tokens == sum(len(ids) for ids in IDS)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))  # the server's weights: dummy, seed 0
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=512, kv_cache_space=0.01)
    try:
        offline = llm.embed([{"prompt_token_ids": ids} for ids in IDS], use_tqdm=False)
    finally:
        llm.shutdown()
    for served, local in zip(by_ids.data, offline, strict=True):
        assert served.embedding == pytest.approx(local.outputs.embedding, abs=1e-5)


def test_embedding_errors(real_server: RealServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in (
        ({"model": MODEL_NAME, "input": "hi", "dimensions": 8}, "dimensions"),
        ({"model": MODEL_NAME, "input": []}, "input"),
        ({"model": MODEL_NAME, "input": [""]}, "input"),
    ):
        r = httpx.post(real_server.url + "/v1/embeddings", json=body, headers=headers, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
