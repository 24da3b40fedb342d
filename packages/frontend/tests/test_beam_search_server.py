"""`use_beam_search` on /v1/completions and /v1/chat/completions through the openai SDK, against the server on a
real engine (its own process, as `treadle serve` runs it) over the tiny Llama of beam_model.py: the n choices are
the offline LLM.beam_search's sequences on the same weights, best first, with vLLM's reply shapes (text without
a final EOS, token_ids keeping it only with include_stop_str_in_output, finish_reason stop / length, usage counting
the returned tokens); streamed, completions send the whole response as one event and chat each choice's text in
one chunk; what beam search cannot honour is a 400 naming the field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from beam_model import EOS, PROMPTS, build_model_dir, hf_model, make_eos_likely
from frontend_helpers import openai_client
from server_harness import ThreadedServer

BEAM = {"use_beam_search": True, "return_token_ids": True}
MESSAGES = [{"role": "user", "content": "The capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, Any]]:
    from treadle_frontend import LLM
    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.engine_factory import EngineArgs, start_async_mp
    from treadle_frontend.server import ServerConfig, build_app

    path = tmp_path_factory.mktemp("beam_server")
    build_model_dir(path)
    options: dict[str, Any] = {"kv_cache_space": 0.05, "dtype": "float32"}
    client, processor = start_async_mp(EngineArgs.from_kwargs(str(path), **options))
    llm = AsyncLLM(client, processor)
    offline = LLM(str(path), **options)
    try:
        config = ServerConfig(host="127.0.0.1", served_model_name="tiny", disable_log_stats=True)
        with ThreadedServer(build_app(llm, config)) as server:
            yield openai_client(server.url), offline
    finally:
        llm.shutdown()
        offline.shutdown()


def _offline(offline: Any, prompt_ids: list[int], n: int, max_tokens: int, **fields: Any) -> list[Any]:
    from treadle_frontend import BeamSearchParams

    params = BeamSearchParams(n, max_tokens, **fields)
    return list(offline.beam_search([{"prompt_token_ids": prompt_ids}], params)[0].sequences)


def _expected(offline: Any, seq: Any, num_prompt: int, keep_eos: bool = False) -> tuple[str, list[int], str]:
    """(text, token_ids, finish_reason) vLLM's server gives for an offline sequence."""
    generated = seq.tokens[num_prompt:]
    ended = seq.finish_reason == "stop"
    text = offline.get_tokenizer().decode(generated[:-1] if ended else generated, skip_special_tokens=True)
    return text, generated if keep_eos or not ended else generated[:-1], seq.finish_reason


def test_completions_equal_offline(served: tuple[openai.OpenAI, Any]) -> None:
    client, offline = served
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[:2], n=3, max_tokens=7, temperature=0, extra_body=BEAM
    )
    assert [c.index for c in r.choices] == list(range(6))
    completion_tokens = 0
    for i, prompt in enumerate(PROMPTS[:2]):
        want = [_expected(offline, s, len(prompt)) for s in _offline(offline, prompt, 3, 7)]
        got = [
            (c.text, (c.model_extra or {})["token_ids"], c.finish_reason)
            for c in r.choices[3 * i : 3 * i + 3]
        ]
        assert got == want
        completion_tokens += sum(len(ids) for _, ids, _ in got)
    assert "stop" in {c.finish_reason for c in r.choices}  # EOS ends some beam of PROMPTS[0]
    stopped = next(c for c in r.choices if c.finish_reason == "stop")
    assert (stopped.model_extra or {})["stop_reason"] == EOS
    assert r.usage is not None and r.usage.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    assert r.usage.completion_tokens == completion_tokens


def test_completions_options_and_stream(served: tuple[openai.OpenAI, Any]) -> None:
    """length_penalty and include_stop_str_in_output reach the search; stream=true answers the whole response as
    one event, as vLLM does."""
    client, offline = served
    body = {**BEAM, "length_penalty": 0.5, "include_stop_str_in_output": True}
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[0], n=4, max_tokens=7, temperature=0, logprobs=2, extra_body=body
    )
    seqs = _offline(offline, PROMPTS[0], 4, 7, length_penalty=0.5)
    want = [_expected(offline, s, len(PROMPTS[0]), keep_eos=True) for s in seqs]
    assert [(c.text, (c.model_extra or {})["token_ids"], c.finish_reason) for c in r.choices] == want
    assert any(ids[-1] == EOS for _, ids, reason in want if reason == "stop")
    lps = r.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None and lps.top_logprobs is not None
    assert sum(lps.token_logprobs) == pytest.approx(seqs[0].cum_logprob, abs=1e-4)
    assert all(len(top) <= 3 for top in lps.top_logprobs if top is not None)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPTS[0], n=4, max_tokens=7, temperature=0, logprobs=2, extra_body=body,
            stream=True,
        )
    )  # fmt: skip
    assert len(chunks) == 1 and [c.text for c in chunks[0].choices] == [c.text for c in r.choices]
    assert chunks[0].usage == r.usage


def test_chat_equal_offline_and_streamed(served: tuple[openai.OpenAI, Any]) -> None:
    client, offline = served
    prompt_ids = offline.input_processor.encode_chat(MESSAGES)[1]
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=3,
        max_tokens=6,
        temperature=0,
        extra_body=BEAM,  # type: ignore[arg-type]
    )
    want = [_expected(offline, s, len(prompt_ids)) for s in _offline(offline, prompt_ids, 3, 6)]
    got = [(c.message.content, (c.model_extra or {})["token_ids"], c.finish_reason) for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and got == want
    assert r.usage is not None and r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == sum(len(ids) for _, ids, _ in want)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, n=3, max_tokens=6, temperature=0, extra_body=BEAM,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    roles = [c.choices[0] for c in chunks[:3]]
    assert [(ch.index, ch.delta.role) for ch in roles] == [
        (0, "assistant"),
        (1, "assistant"),
        (2, "assistant"),
    ]
    texts = [c.choices[0] for c in chunks[3:-1]]  # one chunk per choice: its whole text and finish_reason
    assert [(ch.index, ch.delta.content, ch.finish_reason) for ch in texts] == [
        (i, text, reason) for i, (text, _, reason) in enumerate(want)
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage


def test_echo_returns_the_prompt_logprobs(served: tuple[openai.OpenAI, Any]) -> None:
    """Completions' echo with logprobs: every choice opens with the prompt's logprobs (null first), as the request
    without beams gives them, and they are the model's own (the HF model's log-softmax); chat's prompt_logprobs
    too. (vLLM's search returns none, and its echo then fails.) The SDK types token_logprobs as list[float]: the
    echo's null first entry needs a client without strict validation."""
    strict, _ = served
    client = openai.OpenAI(base_url=str(strict.base_url), api_key="x", max_retries=0)
    prompt = PROMPTS[0]
    model = hf_model()
    make_eos_likely(model)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    want = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    kw: dict[str, Any] = {"model": "tiny", "prompt": prompt, "temperature": 0, "logprobs": 2, "echo": True}
    plain = client.completions.create(max_tokens=1, **kw).choices[0].logprobs
    assert plain is not None and plain.token_logprobs is not None and plain.top_logprobs is not None
    k = len(prompt)
    for stream in (False, True):
        r = client.completions.create(n=2, max_tokens=3, extra_body=BEAM, stream=stream, **kw)
        choices = next(iter(r)).choices if stream else r.choices  # type: ignore[arg-type, union-attr]
        for c in choices:
            lps = c.logprobs
            assert lps is not None and lps.tokens is not None and lps.token_logprobs is not None
            assert lps.tokens[:k] == plain.tokens[:k] and lps.text_offset[:k] == plain.text_offset[:k]  # type: ignore[index]
            assert lps.token_logprobs[0] is None and lps.token_logprobs[1:k] == pytest.approx(want, abs=1e-4)
            assert lps.top_logprobs is not None and lps.top_logprobs[0] is None
            for got, expected in zip(lps.top_logprobs[1:k], plain.top_logprobs[1:k], strict=True):
                assert got == pytest.approx(expected, abs=1e-5)
            assert len(lps.tokens) == k + len((c.model_extra or {})["token_ids"])
    messages: Any = MESSAGES
    chat = client.chat.completions.create(
        model="tiny",
        messages=messages,
        n=2,
        max_tokens=3,
        temperature=0,
        extra_body={**BEAM, "prompt_logprobs": 1},
    )
    plain_chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    beam_prompt, plain_prompt = (x.model_extra["prompt_logprobs"] for x in (chat, plain_chat))  # type: ignore[index]
    assert beam_prompt[0] is None and len(beam_prompt) == len(plain_prompt) > 1
    for got, expected in zip(beam_prompt[1:], plain_prompt[1:], strict=True):
        assert got.keys() == expected.keys()
        for token, entry in got.items():
            assert entry["rank"] == expected[token]["rank"]
            assert entry["logprob"] == pytest.approx(expected[token]["logprob"], abs=1e-5)


@pytest.mark.parametrize(
    ("route", "fields", "param", "message"),
    [
        ("completions", {"n": 11}, "n", r"^n \(11\) is too wide a beam: each step asks for the 2 \* n"),
        ("completions", {"n": 2, "best_of": 3}, "best_of", r"^best_of \(3\) must equal n \(2\), the beam"),
        ("completions", {"n": 2, "max_tokens": 0}, "max_tokens", r"beam_search, max_tokens must be in \[1"),
        ("completions", {"n": 2, "length_penalty": "x"}, "length_penalty", "length_penalty"),
        ("completions", {"allowed_token_ids": [5]}, "allowed_token_ids", "cannot be combined with use_beam"),
        (
            "completions",
            {"n": 2, "prompt_logprobs": 21},
            "prompt_logprobs",
            r"^Requested prompt logprobs of 21",
        ),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format", "cannot be combined with"),
        ("chat", {"n": 0}, "n", r"^with use_beam_search, n must be in \[1, inf\], got 0"),
        (
            "chat",
            {"n": 2, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            r"^top_logprobs must be in \[0, 20\]",
        ),
    ],
)
def test_bad_requests(
    served: tuple[openai.OpenAI, Any], route: str, fields: dict[str, Any], param: str, message: str
) -> None:
    client, _ = served
    body = {"use_beam_search": True, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        if route == "completions":
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body=body)
        else:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=body)  # type: ignore[arg-type]
    error = e.value.body
    assert isinstance(error, dict) and error.get("param") == param, error
    assert re.search(message, str(error.get("message"))), error
