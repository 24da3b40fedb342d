"""POST /v1/embeddings through the openai SDK on the real server (tiny dummy Llama): one unit-length vector of
hidden_size floats per input, in input order, whether the SDK asks for base64 (its default) or floats; token-id
inputs; `truncate_prompt_tokens` keeps the last tokens; usage counts the prompt tokens; the vectors equal the
offline `LLM.embed` of the same weights; `dimensions` and empty input are 400s; /score and /rerank rank by those
vectors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
from e2e_helpers import API_KEY, LLAMA, MAX_MODEL_LEN, MODEL_NAME, RealServer
from tiny_assets import build_tokenizer_dir

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
    cut = oai.embeddings.create(model=MODEL_NAME, input=IDS[2], encoding_format="float",
                                extra_body={"truncate_prompt_tokens": 7})  # fmt: skip
    tail = oai.embeddings.create(model=MODEL_NAME, input=IDS[2][-7:], encoding_format="float")
    assert cut.usage.prompt_tokens == 7 and cut.data[0].embedding == pytest.approx(
        tail.data[0].embedding, abs=1e-6
    )
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


def test_an_input_may_fill_the_context(oai: openai.OpenAI, real_server: RealServer) -> None:
    """An embedding runs the prompt only: max_model_len tokens fit (the prefill's sampled token is dropped), one
    more is a 400 in vLLM's words, and truncate_prompt_tokens -1 keeps max_model_len tokens."""
    full = [(7 * i) % 390 + 5 for i in range(MAX_MODEL_LEN)]
    out = oai.embeddings.create(model=MODEL_NAME, input=full, encoding_format="float")
    assert out.usage.prompt_tokens == MAX_MODEL_LEN and len(out.data[0].embedding) == LLAMA["hidden_size"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(real_server.url + "/v1/embeddings", json={"model": MODEL_NAME, "input": [3, *full]},
                   headers=headers, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "in the input for embedding generation" in r.json()["error"]["message"]
    cut = oai.embeddings.create(model=MODEL_NAME, input=[3, *full], encoding_format="float",
                                extra_body={"truncate_prompt_tokens": -1})  # fmt: skip
    assert cut.usage.prompt_tokens == MAX_MODEL_LEN
    assert cut.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-5)


def test_score_and_rerank(real_server: RealServer, tmp_path: Path) -> None:
    """/score and /rerank (vLLM's, for an embedding model): the dot products of the /v1/embeddings vectors; rerank
    orders the documents best first and keeps top_n; the offline LLM.score gives the same scores."""
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(path: str, body: dict[str, object]) -> dict:
        r = httpx.post(
            real_server.url + path, json={"model": MODEL_NAME, **body}, headers=headers, timeout=60
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    query, docs = (
        "where is the capital",
        ["Paris is in France", "the capital city", "bananas are yellow", "x"],
    )
    vectors = [d["embedding"] for d in post("/v1/embeddings", {"input": [query, *docs]})["data"]]
    want = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    for path in ("/score", "/v1/score"):
        got = post(path, {"text_1": query, "text_2": docs})
        assert [d["index"] for d in got["data"]] == [0, 1, 2, 3]
        assert [d["score"] for d in got["data"]] == pytest.approx(want, abs=1e-5)
    pairwise = post("/score", {"text_1": [query, docs[0]], "text_2": [docs[1], docs[0]]})["data"]
    assert pairwise[1]["score"] == pytest.approx(1.0, abs=1e-5)  # a text with itself
    best_first = sorted(range(len(docs)), key=lambda i: -want[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        got = post(path, {"query": query, "documents": docs, "top_n": 3})
        assert [r["index"] for r in got["results"]] == best_first[:3]
        assert [r["document"]["text"] for r in got["results"]] == [docs[i] for i in best_first[:3]]
        assert [r["relevance_score"] for r in got["results"]] == pytest.approx(
            [want[i] for i in best_first[:3]]
        )
    model = build_tokenizer_dir(tmp_path)  # the server's model: this tokenizer, dummy weights (seed 0)
    (model / "config.json").write_text(json.dumps(LLAMA))
    llm = LLM(str(model), load_format="dummy", max_model_len=512, kv_cache_space=0.01)
    try:
        offline = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert offline == pytest.approx(want, abs=1e-5)
    r = httpx.post(real_server.url + "/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]},
                   headers=headers, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "as many as text_2" in r.json()["error"]["message"]
