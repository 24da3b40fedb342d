"""The OpenAI routes through the real openai SDK with strict response validation (fake engine)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(fake_server: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=fake_server.url + "/v1", api_key="sekret", _strict_response_validation=True, max_retries=0
    )


@pytest.fixture(scope="module")
def lax_client(fake_server: Any) -> openai.OpenAI:
    # The SDK parses streamed legacy-completion chunks with its `Completion` model, whose finish_reason is a
    # non-null Literal; OpenAI itself streams `finish_reason: null` until the last chunk (as we do, per
    # API.md), so strict validation cannot apply to that one stream. Chunks are checked by hand instead.
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="sekret", max_retries=0)


def test_completion_basic_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert (
        r.usage is not None
        and r.usage.completion_tokens == 5
        and r.usage.total_tokens == r.usage.prompt_tokens + 5
    )


def test_completion_stream_equals_non_stream(client: openai.OpenAI, lax_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt="The capital", max_tokens=12, seed=11, temperature=0.8)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(lax_client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_completion_logprobs_echo(client: openai.OpenAI, lax_client: openai.OpenAI) -> None:
    # The first prompt token has no logprob: null, as OpenAI and vLLM send it (lm-eval skips the context
    # part). The SDK types token_logprobs as list[float], so this one response is checked by hand.
    r = lax_client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=1, logprobs=2, echo=True, temperature=0
    )
    lp = r.choices[0].logprobs
    assert (
        lp is not None
        and lp.tokens is not None
        and lp.token_logprobs is not None
        and lp.top_logprobs is not None
    )
    n_prompt = r.usage.prompt_tokens if r.usage else 0
    assert len(lp.tokens) == n_prompt + 1 and lp.token_logprobs[0] is None
    assert r.choices[0].text.startswith("Hello world")
    assert lp.text_offset == sorted(lp.text_offset)
    masked = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=3, temperature=0)
    tops = masked.choices[0].logprobs.top_logprobs  # type: ignore[union-attr]
    assert tops is not None and any(-9999.0 in t.values() for t in tops)  # -inf reaches JSON as -9999.0
    r0 = client.completions.create(model="tiny", prompt="Hello world", max_tokens=0, echo=True)
    assert r0.choices[0].text == "Hello world" and r0.usage is not None and r0.usage.completion_tokens == 0


def test_completion_multiple_prompts_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    r2 = client.completions.create(model="tiny", prompt=[[5, 6, 7]], max_tokens=3)
    assert len(r2.choices) == 1


def test_seed_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, seed=5, temperature=1.0
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_basic_logprobs_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=3,
    )
    assert r.object == "chat.completion" and [c.index for c in r.choices] == [0, 1]
    c = r.choices[0]
    assert c.message.role == "assistant" and c.logprobs is not None and c.logprobs.content is not None
    first = c.logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.bytes is not None
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_chat_stream_format(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=9, seed=4
    )
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == full
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    )


def test_stop_string_across_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=16, temperature=0
    )
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content or ""
    ids = tokenizer.encode(text, add_special_tokens=False)
    # a stop string that starts inside one token and ends inside a later one
    first_tok = tokenizer.decode(ids[:1])
    start = max(1, len(first_tok) - 1) if len(first_tok) > 1 else 1
    stop = text[start : start + 3]
    assert len(stop) == 3
    r2 = client.chat.completions.create(stop=[stop], **kw)
    assert r2.choices[0].message.content == text[: text.find(stop)]
    assert r2.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stop=stop, stream=True, **kw)
        if c.choices
    )
    assert streamed == text[: text.find(stop)]
    inc = client.chat.completions.create(stop=[stop], extra_body={"include_stop_str_in_output": True}, **kw)
    assert inc.choices[0].message.content == text[: text.find(stop) + 3]


def client_tokenizer_strs(fake_server: Any, ids: list[int]) -> list[str]:
    """The tokenizer's own token strings (vLLM's token_strs: convert_ids_to_tokens)."""
    tokens = fake_server.llm.input_processor.tokenizer.convert_ids_to_tokens(ids)
    assert "".join(tokens).replace("Ġ", " ") == "Hello world"  # byte-level pieces of the text
    return list(tokens)


def test_models_and_utility_routes(client: openai.OpenAI, fake_server: Any) -> None:
    import httpx

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    tok = httpx.post(fake_server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256 and tok["token_strs"] is None
    strs = httpx.post(
        fake_server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}
    )
    assert strs.json()["token_strs"] == client_tokenizer_strs(fake_server, tok["tokens"])
    de = httpx.post(fake_server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert de["prompt"] == "Hello world"
    chat_tok = httpx.post(
        fake_server.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}
    ).json()
    assert chat_tok["count"] > 3
    assert httpx.get(fake_server.url + "/health").status_code == 200
    assert "version" in httpx.get(fake_server.url + "/version").json()
    assert httpx.get(fake_server.url + "/load").json() == {"server_load": 0}
    metrics = httpx.get(fake_server.url + "/metrics").text
    for name in (
        "treadle:num_requests_running",
        "treadle:generation_tokens_total",
        "treadle:prompt_tokens_total",
        "treadle:time_to_first_token_seconds_bucket",
        "treadle:e2e_request_latency_seconds_count",
        "treadle:request_success_total",
        "treadle:kv_cache_usage_perc",
        "treadle:num_preemptions_total",
        "treadle:prefix_cache_queries_total",
        "treadle:prefix_cache_hits_total",
        "treadle:inter_token_latency_seconds_bucket",
        "treadle:num_requests_waiting",
    ):
        assert name in metrics, name
    assert 'model_name="tiny"' in metrics


def test_streamed_n2_and_multi_prompt(client: openai.OpenAI, lax_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="tiny",
        messages=[{"role": "user", "content": "hey"}],
        max_tokens=6,
        n=2,
        seed=9,
        logprobs=True,
        top_logprobs=2,
    )
    full = client.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    num_lp = {0: 0, 1: 0}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                num_lp[c.index] += len(c.logprobs.content)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {0: "length", 1: "length"} and num_lp == {0: 6, 1: 6}
    ckw: dict[str, Any] = dict(model="tiny", prompt=["one", "two"], n=2, max_tokens=4, seed=2)
    batch = client.completions.create(**ckw)
    streamed = {i: "" for i in range(4)}
    for chunk in lax_client.completions.create(stream=True, **ckw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_prompt_logprobs_are_returned(fake_server: Any) -> None:
    """vLLM's prompt_logprobs extra: per choice in completions (streamed: once, in the choice's first chunk
    that has them), top level in chat; position 0 is None, every other position holds the prompt's own token."""
    url, headers = fake_server.url, {"Authorization": "Bearer sekret"}
    body = {"model": "tiny", "prompt": [7, 8, 9, 10], "max_tokens": 2, "prompt_logprobs": 3, "n": 2}
    data = httpx.post(url + "/v1/completions", json=body, headers=headers).json()
    for choice in data["choices"]:
        plps = choice["prompt_logprobs"]
        assert len(plps) == 4 and plps[0] is None
        for token, pos in zip([8, 9, 10], plps[1:], strict=True):
            assert str(token) in pos and 1 <= len(pos) <= 4
            assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in pos.values())
            assert all(e["logprob"] >= -9999.0 for e in pos.values())  # -inf clamped
    chunks = httpx.post(url + "/v1/completions", json={**body, "stream": True}, headers=headers).text
    events = [json.loads(line[6:]) for line in chunks.splitlines() if line.startswith("data: {")]
    sent = [c["choices"][0]["index"] for c in events if "prompt_logprobs" in c["choices"][0]]
    assert sorted(sent) == [0, 1]
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "prompt_logprobs": 1,
    }
    data = httpx.post(url + "/v1/chat/completions", json=chat, headers=headers).json()
    assert (
        len(data["prompt_logprobs"]) == data["usage"]["prompt_tokens"] and data["prompt_logprobs"][0] is None
    )
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "stream": True}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats(fake_server: Any, route: str) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far; the last usage chunk
    has the totals. Without it the chunks carry usage null."""
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 5, "stream": True}
    body.update(
        {"prompt": [7, 8, 9]}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    for continuous in (True, False):
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": continuous}
        r = httpx.post(fake_server.url + route, json=body, headers={"Authorization": "Bearer sekret"})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        content, final = [c for c in chunks if c["choices"]], chunks[-1]
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
        if not continuous:
            assert all(c["usage"] is None for c in content)
            continue
        seen = [c["usage"]["completion_tokens"] for c in content]
        assert seen == sorted(seen) and seen[-1] == 5 and seen[0] <= 1
        assert all(c["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for c in content)


def test_generation_config_max_new_tokens_is_the_default(fake_server: Any) -> None:
    """generation_config.json's max_new_tokens is max_tokens when a chat request leaves it unset (vLLM)."""
    from treadle_frontend.tokenizer import GenerationDefaults

    ip = fake_server.llm.input_processor
    saved, ip.defaults = ip.defaults, GenerationDefaults(max_new_tokens=3)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        headers = {"Authorization": "Bearer sekret"}
        unset = httpx.post(fake_server.url + "/v1/chat/completions", json=body, headers=headers).json()
        given = httpx.post(
            fake_server.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, headers=headers
        )
    finally:
        ip.defaults = saved
    assert unset["usage"]["completion_tokens"] == 3 and unset["choices"][0]["finish_reason"] == "length"
    assert given.json()["usage"]["completion_tokens"] == 5
