"""Speculative decoding behind the API server, through the real openai SDK: the engine core runs in its own process
with the fake runner (repetitive tokens, so n-gram drafts are accepted) and `speculative_config` from the engine
options; streamed completions carry several tokens per chunk and still join to the whole; /metrics carries the
spec_decode counters and the stats log gives the SpecDecoding line."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_harness import ThreadedServer
from tiny_assets import build_tokenizer_dir

K = 4  # num_speculative_tokens
SERVED: dict[str, Any] = {}  # the module's AsyncLLM


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from treadle_frontend.async_llm import AsyncLLM
    from treadle_frontend.engine_factory import EngineArgs, start_async_mp
    from treadle_frontend.server import ServerConfig, build_app

    model = build_tokenizer_dir(tmp_path_factory.mktemp("tiny_spec"))
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama"})
    )  # the fake runner reads none of it
    args = EngineArgs.from_kwargs(
        str(model),
        load_format="dummy",
        max_model_len=256,
        executor="fake",
        # ids in [2, 400) (2 is the tokenizer's EOS, so the fake model's too); its tokens repeat every 5 positions
        fake_runner={"vocab_size": 400, "eos_token_id": 2, "repeat_period": 5, "step_delay_s": 0.002},
        speculative_config={"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 2},
    )
    client, processor = start_async_mp(args)
    llm = SERVED["llm"] = AsyncLLM(client, processor)
    config = ServerConfig(host="127.0.0.1", served_model_name="tiny", stats_log_interval_s=0.3)
    with ThreadedServer(build_app(llm, config)) as server:
        yield server.url
    llm.shutdown()


def _oai(url: str) -> openai.OpenAI:
    # not strict: the SDK's Completion type has no null finish_reason, which every streamed chunk but the last has
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_streaming_with_several_tokens_per_step(spec_server: str, tokenizer: Any) -> None:
    oai = _oai(spec_server)
    kw: dict[str, Any] = dict(
        model="tiny", prompt="Hello there", max_tokens=60, n=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    ids: dict[int, list[int]] = {0: [], 1: []}
    text: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    most = 0
    usage = None
    for chunk in oai.completions.create(**kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = (choice.model_extra or {}).get("token_ids", [])
            most = max(most, len(piece))
            ids[choice.index] += piece
            text[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert most > 1, "accepted drafts should bring several tokens in one chunk"
    assert finish == {0: "length", 1: "length"}
    for i in (0, 1):
        assert len(ids[i]) == 60
        assert text[i] == tokenizer.decode(ids[i], skip_special_tokens=True)
        assert ids[i][10:] == ids[i][5:-5], "the fake model's tokens repeat with period 5"
    assert usage is not None and usage.completion_tokens == 120


def test_chat_stream_joins_to_the_whole(spec_server: str) -> None:
    oai = _oai(spec_server)
    messages = [{"role": "user", "content": "Say something repetitive"}]
    kw: dict[str, Any] = dict(
        model="tiny", messages=messages, max_tokens=40, extra_body={"return_token_ids": True}
    )
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra or {}).get("token_ids", [])]
    assert 0 < len(streamed) <= 40 and content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def _samples(text: str, name: str) -> dict[str, float]:
    """labels text -> value of the series of metric `name`."""
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}}) (\S+)$", text, re.M)}


def test_metrics_and_log_line(spec_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    oai = _oai(spec_server)
    oai.completions.create(model="tiny", prompt="Hi", max_tokens=50, extra_body={"ignore_eos": True})
    text = httpx.get(spec_server + "/metrics").text
    model = '{model_name="tiny"}'
    drafts = _samples(text, "treadle:spec_decode_num_drafts_total")[model]
    drafted = _samples(text, "treadle:spec_decode_num_draft_tokens_total")[model]
    accepted = _samples(text, "treadle:spec_decode_num_accepted_tokens_total")[model]
    per_pos = _samples(text, "treadle:spec_decode_num_accepted_tokens_per_pos_total")
    by_pos = [per_pos[f'{{model_name="tiny",position="{i}"}}'] for i in range(K)]
    assert drafts > 0 and 0 < accepted <= drafted <= K * drafts
    assert sum(by_pos) == accepted and by_pos == sorted(by_pos, reverse=True)
    deadline = time.monotonic() + 5
    while "SpecDecoding metrics" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(r.getMessage() for r in caplog.records if "SpecDecoding metrics" in r.getMessage())
    for part in ("Mean acceptance length: ", "Accepted throughput: ", "Drafted throughput: ", "Accepted: ",
                 "Drafted: ", "Per-position acceptance rate: ", "Avg Draft acceptance rate: "):  # fmt: skip
        assert part in line, (part, line)


def test_the_engine_reports_speculation(spec_server: str) -> None:
    """The engine's READY runtime (what `treadle serve` logs at start-up and benchmark records keep) names it."""
    assert SERVED["llm"].model.runtime["speculative_decoding"] == (
        f"ngram (num_speculative_tokens={K}, prompt_lookup_min=2, prompt_lookup_max=2)"
    )
    assert SERVED["llm"].model.num_speculative_tokens == K
