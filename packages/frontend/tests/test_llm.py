"""The offline LLM over a fake engine: shapes, n > 1 fan-out, stop strings, seeds, chat, validation."""

from __future__ import annotations

from typing import Any

import pytest

from treadle_model_runner.sampling_params import SamplingParams


def test_generate_shapes(llm: Any) -> None:
    outs = llm.generate(["Hello", "The capital"], SamplingParams(max_tokens=7, temperature=0), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello", "The capital"]
    o = outs[0].outputs[0]
    assert len(o.token_ids) == 7 and o.finish_reason == "length" and o.stop_reason is None
    assert o.text == llm.get_tokenizer().decode(o.token_ids, skip_special_tokens=True)
    assert o.cumulative_logprob is None and o.logprobs is None and outs[0].finished


def test_n_and_seed(llm: Any) -> None:
    p = SamplingParams(n=3, max_tokens=5, seed=7, logprobs=2)
    a = llm.generate("Hi", p, use_tqdm=False)[0]
    b = llm.generate("Hi", p, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3
    c0 = a.outputs[0]
    assert c0.logprobs is not None and len(c0.logprobs) == 5
    first = c0.logprobs[0]
    assert c0.token_ids[0] in first and 2 <= len(first) <= 3
    assert c0.cumulative_logprob == pytest.approx(
        sum(d[t].logprob for d, t in zip(c0.logprobs, c0.token_ids, strict=True))
    )


def test_stop_string_ends_request(llm: Any) -> None:
    base = (
        llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0].outputs[0].text
    )
    stop = base[3:6]
    out = llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == base[: base.find(stop)] and c.finish_reason == "stop" and c.stop_reason == stop
    assert not llm.client.engine.running, "the stopped request was aborted in the engine"


def test_chat_and_prompt_logprobs(llm: Any) -> None:
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False
    )
    assert out[0].prompt_token_ids[0] == llm.get_tokenizer().convert_tokens_to_ids("<|im_start|>")
    pl = out[0].prompt_logprobs
    assert pl[0] is None and len(pl) == len(out[0].prompt_token_ids)
    assert all(out[0].prompt_token_ids[i] in pl[i] for i in range(1, len(pl)))


def test_context_length_and_bad_ids(llm: Any) -> None:
    """Offline, as vLLM's LLM: max_tokens past max_model_len (256 here) generates up to it and ends with
    finish_reason "length"; only a prompt that leaves no room is an error, naming its index in a batch (and
    the batch's other requests are aborted)."""
    params = SamplingParams(max_tokens=300, min_tokens=300, ignore_eos=True)
    out = llm.generate([[5] * 3], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 253 and out.finish_reason == "length"
    assert params.max_tokens == 300  # the caller's params are not changed
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[10**6]], SamplingParams(max_tokens=3), use_tqdm=False)
    outs = llm.generate([[5] * 250], SamplingParams(max_tokens=None), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match=r"^prompt 1: The prompt is 256 tokens long, which leaves no room"):
        llm.generate([[5] * 3, [5] * 256, [6] * 3], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"^The prompt is 257 tokens long"):
        llm.generate([[5] * 257], SamplingParams(max_tokens=0), use_tqdm=False)
    llm.generate([[5] * 256], SamplingParams(max_tokens=0), use_tqdm=False)  # prompt logprobs only: it fits
    assert not llm.output_processor.states  # nothing left behind by the failed batch


def test_many_prompts_progress(llm: Any, capsys: Any) -> None:
    outs = llm.generate([f"p{i}" for i in range(20)], SamplingParams(max_tokens=3), use_tqdm=True)
    assert [o.prompt for o in outs] == [f"p{i}" for i in range(20)]
    assert "Processed prompts" in capsys.readouterr().err


def test_engine_error_finish_raises(llm: Any) -> None:
    engine = llm.client.engine
    real_step = engine.step

    def failing_step() -> Any:
        outs = real_step()
        for o in outs.outputs:
            o.finish_reason = "FINISHED_ERROR"
        return outs

    engine.step = failing_step
    with pytest.raises(RuntimeError, match="the engine failed"):
        llm.generate("Hello", SamplingParams(max_tokens=5), use_tqdm=False)
    engine.step = real_step
    assert not llm.output_processor.has_unfinished()


def test_n2_keeps_prompt_logprobs(llm: Any) -> None:
    out = llm.generate(
        "Hello world", SamplingParams(n=2, max_tokens=3, prompt_logprobs=1, seed=0), use_tqdm=False
    )[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)


def test_chat_hands_tools_to_the_template(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = llm.input_processor.encode_chat
    monkeypatch.setattr(
        llm.input_processor, "encode_chat", lambda conv, **kw: seen.append(kw) or real(conv, **kw)
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), use_tqdm=False, tools=tools,
             chat_template_kwargs={"x": 1})  # fmt: skip
    assert seen[0]["template_kwargs"] == {"x": 1, "tools": tools}


def test_vllm_arguments_offline(llm: Any) -> None:
    """priority (one per prompt, checked against the policy), truncate_prompt_tokens, a chat's own template, and
    a clear TypeError for prompts or params of the wrong type."""
    added: list[Any] = []
    engine = llm.client.engine
    add = engine.add
    engine.add = lambda req: (added.append(req), add(req))[1]
    ids = list(range(20, 40))
    out = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(max_tokens=2, truncate_prompt_tokens=5), use_tqdm=False
    )
    assert out[0].prompt_token_ids == ids[-5:] and added[-1].prompt_token_ids == ids[-5:]
    llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[0, 0])
    assert [r.priority for r in added[-2:]] == [0, 0]
    with pytest.raises(ValueError, match="priority scheduling policy"):
        llm.generate(["a"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[3])
    with pytest.raises(ValueError, match="1 priorities for 2 prompts"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), chat_template=template)
    assert chat[0].prompt == "[user] hi\n"
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(123)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate("a", {"max_tokens": 1})
