"""Stop strings: cut at the first match; with hold-back no prefix of a stop string is ever streamed."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fake_engine import FakeOutput
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle_frontend.output_processor import OutputProcessor, ParentRequest
from treadle_frontend.request_state import RequestState
from treadle_frontend.stop_strings import StopStringChecker
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams


def test_checker_finds_earliest_and_holds_back() -> None:
    c = StopStringChecker(["world", "lo w"], include_in_output=False)
    m = c.find("hello world", 6)
    assert m is not None and m.stop == "lo w" and m.truncate_to == 3
    assert c.holdback("say wor") == 3
    assert c.holdback("say hex") == 0
    assert c.holdback("hello") == 2  # "lo" could start "lo w"
    inc = StopStringChecker(["world"], include_in_output=True)
    m = inc.find("hello world!", 7)
    assert m is not None and m.truncate_to == len("hello world")


def _run_stream(
    tokenizer: Any, ids: list[int], chunks: list[int], params: SamplingParams
) -> tuple[list[str], Any]:
    from treadle_frontend.detokenizer import TokenDecoder
    from treadle_frontend.logprobs import TokenTexts

    op = OutputProcessor()
    dec = TokenDecoder(tokenizer)
    state = RequestState.create("r", "r", 0, None, [5, 6], params, dec, TokenTexts(tokenizer, dec))
    op.add_request(ParentRequest("r", None, [5, 6], 1, params.output_kind), [state])
    deltas, last, i = [], None, 0
    sizes = [*chunks, max(len(ids) - sum(chunks), 0)]
    for k, size in enumerate(sizes):
        piece = ids[i : i + size]
        i += size
        done = i >= len(ids) or k == len(sizes) - 1
        res = op.process_outputs([FakeOutput("r", piece, finish_reason="length" if done else None)])
        for out in res.request_outputs:
            deltas.append(out.outputs[0].text)
            last = out
        if res.reqs_to_abort or done:
            break
    return deltas, last


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_streamed_deltas_never_leak_stop_strings(tokenizer: Any, data: st.DataObject) -> None:
    base = data.draw(
        st.sampled_from(["The capital of France is Paris. 😀 東京 again", "hello world, hello 🚀 moon"])
    )
    ids = tokenizer.encode(base, add_special_tokens=False)
    a = data.draw(st.integers(0, len(base) - 1))
    b = data.draw(st.integers(a + 1, min(len(base), a + 6)))
    stop = base[a:b]
    extra_stop = data.draw(st.sampled_from(["zzz", "Paris!", "moon?"]))
    include = data.draw(st.booleans())
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    params = SamplingParams(
        stop=[stop, extra_stop],
        include_stop_str_in_output=include,
        max_tokens=len(ids),
        output_kind=RequestOutputKind.DELTA,
    )
    deltas, last = _run_stream(tokenizer, ids, chunks, params)
    full = tokenizer.decode(ids)
    cut = full.find(stop)
    expected = full[: cut + len(stop)] if include else full[:cut]
    streamed = "".join(deltas)
    assert streamed == expected
    assert last is not None and last.finished and last.outputs[0].stop_reason == stop
    if not include:
        running = ""
        for d in deltas:
            running += d
            assert stop not in running


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_cumulative_equals_delta_concat(tokenizer: Any, data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(["Emoji 😀🎉🚀 and accents: café", "北京是中国的首都。"]))
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    d_deltas, _ = _run_stream(
        tokenizer, ids, chunks, SamplingParams(max_tokens=99, output_kind=RequestOutputKind.DELTA)
    )
    c_outs, c_last = _run_stream(tokenizer, ids, chunks, SamplingParams(max_tokens=99))
    assert "".join(d_deltas) == c_last.outputs[0].text == text
    for prev, nxt in itertools.pairwise(c_outs):
        assert nxt.startswith(prev)


def test_min_tokens_with_several_tokens_per_step(tokenizer: Any) -> None:
    """Speculative decoding hands the frontend several tokens per step: a stop string in the text of tokens
    within min_tokens still does not count when the same step also brings tokens past min_tokens; one written
    after min_tokens in that step does."""
    ids = tokenizer.encode("a, b c, d e f g h", add_special_tokens=False)
    texts = [tokenizer.decode(ids[: n + 1]) for n in range(len(ids))]
    first_comma = next(n for n in range(len(ids)) if "," in texts[n])  # the token that writes the first ","
    second_comma = next(n for n in range(first_comma + 1, len(ids)) if texts[n].count(",") == 2)
    min_tokens = first_comma + 1
    params = SamplingParams(
        max_tokens=50, min_tokens=min_tokens, stop=[","], output_kind=RequestOutputKind.DELTA
    )
    for chunks in ([len(ids)], [1, len(ids)], [first_comma, 3, 3, 3]):
        deltas, last = _run_stream(tokenizer, ids, chunks, params)
        assert last is not None and last.outputs[0].finish_reason == "stop"
        text = "".join(deltas)
        assert text == texts[second_comma][: texts[second_comma].rindex(",")], (chunks, text)


def _final(tokenizer: Any, ids: list[int], chunks: list[int], params: SamplingParams) -> Any:
    """The finished output of `ids` fed in steps of the given sizes, each token with a logprob of its own."""
    from treadle_frontend.detokenizer import TokenDecoder
    from treadle_frontend.logprobs import TokenTexts
    from treadle_model_runner.outputs import Logprobs

    op = OutputProcessor()
    dec = TokenDecoder(tokenizer)
    state = RequestState.create("r", "r", 0, None, [5, 6], params, dec, TokenTexts(tokenizer, dec))
    op.add_request(ParentRequest("r", None, [5, 6], 1, params.output_kind), [state])
    i = 0
    for size in chunks:
        piece = ids[i : i + size]
        lps = [Logprobs([t, 7], [-0.25 - 0.01 * (i + j), -3.0], 1) for j, t in enumerate(piece)]
        i += size
        done = i >= len(ids)
        res = op.process_outputs([FakeOutput("r", piece, lps, finish_reason="length" if done else None)])
        if res.request_outputs and res.request_outputs[-1].finished:
            return res.request_outputs[-1].outputs[0]
    raise AssertionError("the request never finished")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_several_tokens_a_step_end_where_one_a_step_would(tokenizer: Any, data: st.DataObject) -> None:
    """Speculative decoding hands the frontend several tokens per step. When a stop string ends inside a step,
    the output is the one-token-a-step output: the same text, and token ids, logprobs and cumulative logprob that
    end with the token whose text completes the stop string (the step's later tokens are dropped)."""
    text = data.draw(
        st.sampled_from(["The lamp lit the bay. 😀 東京 ships pass by the lamp", "a, b c, d 🚀 e f"])
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = data.draw(st.integers(0, len(text) - 2))
    stop = text[start : start + data.draw(st.integers(1, 4))]
    params = SamplingParams(
        max_tokens=100, stop=[stop], logprobs=1, include_stop_str_in_output=data.draw(st.booleans()),
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip
    chunks, left = [], len(ids)
    while left > 0:
        chunks.append(min(left, data.draw(st.integers(1, 6))))
        left -= chunks[-1]
    one = _final(tokenizer, ids, [1] * len(ids), params)
    many = _final(tokenizer, ids, chunks, params)
    assert (many.text, many.finish_reason, many.stop_reason) == (one.text, one.finish_reason, one.stop_reason)
    assert many.token_ids == one.token_ids, (chunks, stop)
    assert list(many.logprobs) == list(one.logprobs)
    assert many.cumulative_logprob == pytest.approx(one.cumulative_logprob, abs=1e-9)
