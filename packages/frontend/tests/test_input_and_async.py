"""Input processing (generation-config defaults, chat templates) and AsyncLLM cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from frontend_helpers import FakeAsyncClient, fake_request, make_engine, make_processor
from tiny_assets import CHATML, write_generation_config

from treadle_frontend.async_llm import AsyncLLM
from treadle_frontend.input_processor import InputProcessor, ModelInfo
from treadle_frontend.output_processor import FinishedRequestStats, IterationStats
from treadle_frontend.server.metrics import ServerMetrics
from treadle_frontend.tokenizer import ChatTemplateError, load_generation_defaults, resolve_chat_template
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams


def test_generation_config_defaults(tmp_path: Path) -> None:
    write_generation_config(
        tmp_path,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.1,
        eos_token_id=[2, 7],
        max_new_tokens=50,
        do_sample=True,
    )
    d = load_generation_defaults(tmp_path)
    assert d.sampling == {"temperature": 0.3, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    assert d.eos_token_ids == frozenset({2, 7}) and d.max_new_tokens == 50
    assert load_generation_defaults(tmp_path, "none").sampling == {}
    assert load_generation_defaults(tmp_path / "missing").sampling == {}
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(ValueError, match="generation-config none"):
        load_generation_defaults(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):  # an explicit --generation-config DIR
        load_generation_defaults(tmp_path, str(tmp_path / "nodir"))


def test_defaults_apply_only_to_unset_fields(tokenizer: Any, tmp_path: Path) -> None:
    write_generation_config(tmp_path, temperature=0.3, top_k=40)
    ip = make_processor(tokenizer, defaults=load_generation_defaults(tmp_path))
    p = ip.default_params(temperature=0.9)
    assert p.temperature == 0.9 and p.top_k == 40


def test_chat_template_missing_and_override(tokenizer: Any, tmp_path: Path) -> None:
    info = ModelInfo(name="tiny", path=None, max_model_len=256, vocab_size=len(tokenizer))
    no_template = InputProcessor(tokenizer, info, chat_template=None)
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        no_template.render_chat([{"role": "user", "content": "hi"}])
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    override = InputProcessor(tokenizer, info, chat_template=resolve_chat_template(tokenizer, str(f)))
    assert override.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    assert resolve_chat_template(tokenizer, None) == CHATML
    with pytest.raises(ValueError, match="neither an existing file"):
        resolve_chat_template(tokenizer, "no-such-file.jinja")
    parts = override.render_chat(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert parts == "[user] a\nb\n"  # text parts one per line, as vLLM joins them


def test_processor_chat_template_json_is_the_fallback(tokenizer: Any, tmp_path: Path) -> None:
    """A checkpoint whose template lives only in chat_template.json (a processor's, as Mistral Small 3.1 ships it)."""
    bare = SimpleNamespace(chat_template=None)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(bare, None, tmp_path) is None  # no file: no template
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert resolve_chat_template(bare, None, tmp_path) == template
    assert resolve_chat_template(tokenizer, None, tmp_path) == CHATML  # the tokenizer's own comes first
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": ["x"]}))
    with pytest.raises(ValueError, match=r"chat_template\.json: chat_template must be a string, got list"):
        resolve_chat_template(bare, None, tmp_path)


def test_async_generate_cancel_aborts(tokenizer: Any) -> None:
    engine = make_engine(tokenizer)
    client = FakeAsyncClient(engine, step_delay=0.005)
    llm = AsyncLLM(client, make_processor(tokenizer), request_factory=fake_request)

    async def main() -> None:
        params = SamplingParams(max_tokens=100, output_kind=RequestOutputKind.DELTA)
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in llm.generate("hello", params, "r1"):
                seen += 1

        task = asyncio.create_task(consume())
        while seen < 3:
            await asyncio.sleep(0.005)
        assert "r1" in engine.running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert "r1" not in engine.running and engine.num_aborted == 1 and llm.num_unfinished == 0
        # break out of the loop early: also aborts
        async for out in llm.generate("hello", params.clone(n=2), "r2"):
            assert out.outputs[0].index in (0, 1)
            break
        await asyncio.sleep(0.05)
        assert not engine.running and engine.num_aborted == 3
        final = await llm.collect("hi", SamplingParams(max_tokens=4, n=2, seed=3))
        assert final.finished and [c.index for c in final.outputs] == [0, 1]
        llm.shutdown()

    asyncio.run(main())


def test_stats_log_line() -> None:
    m = ServerMetrics("tiny")
    assert m.log_line() is None  # idle
    it = IterationStats(num_prompt_tokens=10, num_generation_tokens=5, time_to_first_tokens=[0.1])
    it.finished.append(FinishedRequestStats("stop", 0.5, 10, 5))
    m.record(
        {
            "num_running_reqs": 2,
            "num_waiting_reqs": 1,
            "kv_cache_usage": 0.25,
            "prefix_cache_queries": 100,
            "prefix_cache_hits": 40,
            "num_prompt_tokens": 10,
            "num_generation_tokens": 5,
        },
        it,
    )
    line = m.log_line()
    assert line is not None
    for part in (
        "prompt throughput",
        "generation throughput",
        "Running: 2 reqs",
        "Waiting: 1 reqs",
        "KV cache usage: 25.0%",
        "Prefix cache hit rate: 40.0%",
    ):
        assert part in line, (part, line)
    text = m.render().decode()
    assert 'treadle:request_success_total{finished_reason="stop",model_name="tiny"} 1.0' in text
    assert 'treadle:prompt_tokens_total{model_name="tiny"} 10.0' in text


def test_slow_consumer_gets_merged_deltas(tokenizer: Any) -> None:
    engine = make_engine(tokenizer)
    client = FakeAsyncClient(engine, step_delay=0.001)
    llm = AsyncLLM(client, make_processor(tokenizer), request_factory=fake_request)

    async def main() -> None:
        params = SamplingParams(max_tokens=40, seed=1, logprobs=1, output_kind=RequestOutputKind.DELTA)
        outs = []
        async for out in llm.generate("hello", params, "slow"):
            outs.append(out)
            await asyncio.sleep(0.02)  # slower than the engine: deltas pile up and are merged
        final = await llm.collect("hello", SamplingParams(max_tokens=40, seed=1, logprobs=1))
        assert len(outs) < 40 and outs[-1].finished
        assert "".join(o.outputs[0].text for o in outs) == final.outputs[0].text
        assert [t for o in outs for t in o.outputs[0].token_ids] == final.outputs[0].token_ids
        assert sum(len(o.outputs[0].logprobs or []) for o in outs) == 40
        llm.shutdown()

    asyncio.run(main())


def test_metrics_series_exist_at_zero_from_the_start() -> None:
    """Like vLLM's: a dashboard's rate() over preemptions or finished requests reads 0 before the first event."""
    text = ServerMetrics("tiny").render().decode()
    for sample in (
        'treadle:num_preemptions_total{model_name="tiny"} 0.0',
        'treadle:prompt_tokens_total{model_name="tiny"} 0.0',
        'treadle:num_requests_running{model_name="tiny"} 0.0',
        'treadle:e2e_request_latency_seconds_count{model_name="tiny"} 0.0',
        'treadle:request_prompt_tokens_count{model_name="tiny"} 0.0',
        *(f'treadle:request_success_total{{finished_reason="{r}",model_name="tiny"}} 0.0'
          for r in ("stop", "length", "abort", "error")),
    ):  # fmt: skip
        assert sample in text, sample


def test_priorities_need_the_priority_policy(tokenizer: Any) -> None:
    fcfs = make_processor(tokenizer)
    fcfs.check_priority(0)
    with pytest.raises(
        ValueError, match="priority 3: request priorities need the priority scheduling policy"
    ):
        fcfs.check_priority(3)
    info = dataclasses.replace(fcfs.model, scheduling_policy="priority")
    InputProcessor(tokenizer, info, chat_template=None).check_priority(3)


def test_request_length_histograms() -> None:
    """vLLM's request_prompt_tokens / request_generation_tokens: 1-2-5 buckets up to max_model_len, observed for each
    request that finished (not for one its client left)."""
    from treadle_frontend.server.metrics import length_buckets

    assert length_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert length_buckets(4096)[-1] == 2000 and length_buckets(1) == (1,)
    m = ServerMetrics("tiny", max_model_len=1000)
    it = IterationStats()
    it.finished += [FinishedRequestStats("stop", 0.5, 30, 7), FinishedRequestStats("length", 0.9, 300, 60),
                    FinishedRequestStats("abort", 0.1, 999, 1)]  # fmt: skip
    m.record(None, it)
    text = m.render().decode()
    for sample in (
        'treadle:request_prompt_tokens_count{model_name="tiny"} 2.0',
        'treadle:request_prompt_tokens_sum{model_name="tiny"} 330.0',
        'treadle:request_prompt_tokens_bucket{le="50.0",model_name="tiny"} 1.0',
        'treadle:request_generation_tokens_bucket{le="10.0",model_name="tiny"} 1.0',
        'treadle:request_generation_tokens_sum{model_name="tiny"} 67.0',
        'treadle:request_generation_tokens_bucket{le="1000.0",model_name="tiny"} 2.0',
    ):
        assert sample in text, sample


def test_a_bad_word_is_banned_mid_text_too(processor: Any, tokenizer: Any) -> None:
    """As vLLM bans bad words: the word as it opens a text and after a space (its own first token there)."""

    def ids(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    assert ids("Paris")[0] != ids(" Paris")[0]
    assert (
        processor.bad_word_ids("Paris") == processor.bad_word_ids(" Paris") == [ids("Paris"), ids(" Paris")]
    )
    params = SamplingParams(max_tokens=2, bad_words=["Paris", "world"])
    _, _, engine_requests = processor.make_requests("r", None, ids("hi"), params)
    assert engine_requests[0][1].bad_words_token_ids == [
        ids("Paris"),
        ids(" Paris"),
        ids("world"),
        ids(" world"),
    ]
