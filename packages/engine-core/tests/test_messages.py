"""Wire messages round-trip through msgspec msgpack (SamplingParams and Logprobs are dataclasses)."""

from __future__ import annotations

import msgspec
import pytest

from treadle_engine_core import messages as msg
from treadle_engine_core.request import FinishReason
from treadle_model_runner import Logprobs, RequestOutputKind, SamplingParams


def test_request_with_every_sampling_field_round_trips() -> None:
    params = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=-3, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={7: -2.5, 9: 1.0}, allowed_token_ids=[1, 7, 9],
        bad_words=["x"], bad_words_token_ids=[[3, 4]], min_tokens=2, max_tokens=None, stop=["\n\n"],
        stop_token_ids=[11], include_stop_str_in_output=True, ignore_eos=True, logprobs=3, prompt_logprobs=0,
        skip_special_tokens=False, output_kind=RequestOutputKind.DELTA, all_stop_token_ids={2}, pooling="cls",
        normalize=False,
    )  # fmt: skip
    req = msg.EngineCoreRequest("id-1", [1, 2, 3], params, 12.5, priority=-1, cache_salt="tenant")
    back = msg.decode(msg.encode(req), msg.EngineCoreRequest)
    assert back == req
    assert isinstance(back.sampling_params, SamplingParams)
    assert back.sampling_params.logit_bias == {7: -2.5, 9: 1.0}
    assert back.sampling_params.all_stop_token_ids == {2, 11}
    assert back.sampling_params.output_kind is RequestOutputKind.DELTA


def test_invalid_sampling_params_fail_on_decode() -> None:
    raw = msgspec.msgpack.encode(
        {"request_id": "x", "prompt_token_ids": [1], "sampling_params": {"top_p": 0.0}, "arrival_time": 0.0}
    )
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        msg.decode(raw, msg.EngineCoreRequest)


def test_outputs_round_trip() -> None:
    outs = msg.EngineCoreOutputs(
        outputs=[
            msg.EngineCoreOutput("a", [5], new_logprobs=[Logprobs([5, 1], [-0.1, -2.0], 1)]),
            msg.EngineCoreOutput(
                "b", [], finish_reason=FinishReason.STOP, stop_reason=11, num_cached_tokens=32
            ),
        ],
        scheduler_stats=msg.SchedulerStats(num_running_reqs=1, kv_cache_usage=0.25, prefix_cache_hits=32),
        timestamp=3.0,
        utility_results=[msg.UtilityResult(4, result={"ok": True})],
        finished_requests=["b"],
    )
    back = msg.decode(msg.encode(outs), msg.EngineCoreOutputs)
    assert back == outs
    assert back.outputs[1].finish_reason is FinishReason.STOP and str(FinishReason.STOP) == "stop"
    assert back.outputs[1].finished and not back.outputs[0].finished


def test_ready_and_utility_messages() -> None:
    ready = msg.EngineReady(1, 99, 16, 1584, 2048, 32000, [2])
    assert msg.decode(msg.encode(ready), msg.EngineReady) == ready
    call = msg.UtilityRequest(7, "get_stats", [])
    assert msg.decode(msg.encode(call), msg.UtilityRequest) == call


def test_structured_outputs_round_trip() -> None:
    from treadle_model_runner.structured_outputs import StructuredOutputsParams

    so = StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True)
    req = msg.EngineCoreRequest("id-2", [1], SamplingParams(structured_outputs=so), 0.0)
    back = msg.decode(msg.encode(req), msg.EngineCoreRequest)
    assert back == req and isinstance(back.sampling_params.structured_outputs, StructuredOutputsParams)
    assert back.sampling_params.structured_outputs.key() == so.key()
