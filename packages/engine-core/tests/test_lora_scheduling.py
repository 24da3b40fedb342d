"""LoRA in the engine core, on the fake runner: the adapter cap per step, no starvation under it, prefix-cache
isolation between adapters, and the requests and utilities LoRA adds (the adapter math is model-runner's)."""

from __future__ import annotations

import msgspec
import pytest
from engine_core_harness import Collected, check_block_ownership, collect, expected_output, make_engine

from treadle_engine_core.block_hash import update_block_hashes
from treadle_engine_core.config import EngineConfig, FakeRunnerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import (
    ApplyLoRA,
    EngineCoreRequest,
    ListLoRAs,
    LoRACall,
    LoRAReply,
    ReadLoRA,
    decode,
    encode,
)
from treadle_engine_core.request import FinishReason, Request
from treadle_model_runner import ModelConfig, SamplingParams
from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora import LoRARequest
from treadle_model_runner.lora.change import HostChange

ADAPTERS = {name: LoRARequest(name, i + 1, f"/adapters/{name}") for i, name in enumerate("ABC")}


def _engine(max_loras: int, **kwargs: object) -> EngineCore:
    return make_engine(lora=LoRAConfig(enable_lora=True, max_loras=max_loras), **kwargs)  # type: ignore[arg-type]


def _add(engine: EngineCore, rid: str, adapter: str | None, prompt_len: int = 6, max_tokens: int = 4) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    lora = ADAPTERS[adapter] if adapter else None
    prompt = list(range(2, 2 + prompt_len))
    engine.add_request(EngineCoreRequest(rid, prompt, params, 0.0, lora_request=lora))


def _step(engine: EngineCore, got: dict[str, Collected], max_loras: int) -> set[str]:
    """One step; checks its adapters against the cap and returns the requests it scheduled."""
    scheduler = engine.scheduler
    so = scheduler.schedule()
    adapters = {scheduler.requests[r].lora_id for r in so.num_scheduled_tokens} - {0}
    assert len(adapters) <= max_loras, f"step runs adapters {adapters}, more than max_loras {max_loras}"
    running = {r.lora_id for r in scheduler.running} - {0}
    assert len(running) <= max_loras, f"running requests use adapters {running}"
    collect(scheduler.update_from_output(so, engine.executor.execute(so)), got)
    check_block_ownership(scheduler.kv)
    return set(so.num_scheduled_tokens)


@pytest.mark.parametrize("max_loras", [1, 2])
def test_steps_never_exceed_max_loras_and_every_request_completes(max_loras: int) -> None:
    engine = _engine(max_loras, max_num_seqs=8)
    adapters = ["A", "B", None, "C", "A", "B", "C", None, "B"]
    for i, adapter in enumerate(adapters):
        _add(engine, f"r{i}", adapter, prompt_len=5 + i, max_tokens=3 + i % 4)
    got: dict[str, Collected] = {}
    for _ in range(200):
        if not engine.has_work:
            break
        _step(engine, got, max_loras)
    assert not engine.has_work
    for i in range(len(adapters)):
        params = SamplingParams(max_tokens=3 + i % 4, ignore_eos=True)
        assert got[f"r{i}"].tokens == expected_output(f"r{i}", 5 + i, params, 128, FakeRunnerConfig())[0]
    runner = engine.executor.runner
    assert runner.most_loras_in_a_step == max_loras  # type: ignore[attr-defined]
    assert runner.loras == {1, 2, 3}  # type: ignore[attr-defined]


def test_requests_of_the_running_adapter_pass_a_skipped_one() -> None:
    engine = _engine(1, max_num_seqs=8)
    for rid, adapter in (("a1", "A"), ("b1", "B"), ("a2", "A"), ("base", None)):
        _add(engine, rid, adapter)
    got: dict[str, Collected] = {}
    assert _step(engine, got, 1) == {"a1", "a2", "base"}  # b1 is skipped; the batch stays full
    assert [r.request_id for r in engine.scheduler.waiting] == ["b1"]


def test_a_skipped_adapter_is_not_starved_by_later_arrivals() -> None:
    """Requests of adapter A keep arriving; B's request, skipped at first, still runs once A's earlier ones end."""
    engine = _engine(1, max_num_seqs=8)
    _add(engine, "a0", "A", max_tokens=6)
    _add(engine, "b", "B", max_tokens=2)
    got: dict[str, Collected] = {}
    assert _step(engine, got, 1) == {"a0"}  # b is skipped: A holds the one slot
    admitted_before_b: set[str] = set()
    for step in range(1, 40):
        _add(engine, f"a{step}", "A", max_tokens=6)
        scheduled = _step(engine, got, 1)
        if "b" in scheduled:
            break
        admitted_before_b |= scheduled
    else:
        raise AssertionError("b never ran: starved by A's later requests")
    assert admitted_before_b == {"a0"}  # nothing that arrived after b was skipped went ahead of it
    while engine.has_work:
        _step(engine, got, 1)
    assert all(c.finish_reason is not None for c in got.values()) and len(got) == step + 2


def test_an_adapter_that_fails_to_load_at_admission_fails_only_its_requests() -> None:
    """B cannot be loaded again when its requests are admitted (its directory went away): both end with an error
    output naming the problem, their blocks are freed, and every other request runs to its end."""
    engine = _engine(1, max_num_seqs=8)
    runner = engine.executor.runner
    runner.unloadable_loras.add(ADAPTERS["B"].lora_int_id)  # type: ignore[attr-defined]
    for i, adapter in enumerate(["A", "B", None, "B", "C"]):
        _add(engine, f"r{i}", adapter, prompt_len=6, max_tokens=3)
    got: dict[str, Collected] = {}
    errors: dict[str, str | None] = {}
    for _ in range(100):
        if not engine.has_work:
            break
        outputs = engine.step()
        errors |= {o.request_id: o.error for o in outputs.outputs if o.finish_reason == FinishReason.ERROR}
        collect(outputs, got)
        check_block_ownership(engine.scheduler.kv)
    assert not engine.has_work and engine.scheduler.kv.usage == 0
    assert set(errors) == {"r1", "r3"}
    assert all(e is not None and "/adapters/B is not a directory" in e for e in errors.values())
    assert all(got[r].tokens == [] for r in errors)
    for rid in ("r0", "r2", "r4"):
        assert got[rid].finish_reason == FinishReason.LENGTH and len(got[rid].tokens) == 3, rid
    assert runner.held_loras == {"r0": 1, "r4": 3}  # type: ignore[attr-defined]


def test_prefix_cache_is_not_shared_across_adapters() -> None:
    engine = _engine(2, block_size=4)
    prompt_len = 14  # 3 full blocks
    got: dict[str, Collected] = {}
    for rid, adapter, hit in (("base", None, 0), ("a", "A", 0), ("b", "B", 0), ("a_again", "A", 12),
                              ("base_again", None, 12)):  # fmt: skip
        _add(engine, rid, adapter, prompt_len=prompt_len, max_tokens=1)
        while engine.has_work:  # the fake runner's shadow KV also checks each read was written by its adapter
            _step(engine, got, 2)
        assert got[rid].num_cached_tokens == hit, rid
    params = SamplingParams()
    hashes = {
        lora: update_block_hashes(Request("r", list(range(2, 16)), params, 0.0, lora_request=lora), 4)
        for lora in (None, ADAPTERS["A"], ADAPTERS["B"])
    }
    assert len({h[0] for h in hashes.values()}) == 3 and len({h[2] for h in hashes.values()}) == 3


def test_an_in_place_reload_starts_a_new_prefix_cache_generation() -> None:
    """After add_lora(load_inplace) an adapter keeps its id, but requests arriving later do not match the blocks
    its old weights computed; they share blocks among themselves again."""
    engine = _engine(1, block_size=4)
    got: dict[str, Collected] = {}
    runner = engine.executor.runner
    for rid, reload, hit in (
        ("a", False, 0),
        ("a_again", False, 12),
        ("a_reloaded", True, 0),
        ("a_after", False, 12),
    ):
        if reload:
            assert engine.call_utility("add_lora", [msgspec.to_builtins(ADAPTERS["A"]), True]) is True
        _add(engine, rid, "A", prompt_len=14, max_tokens=1)
        while engine.has_work:
            _step(engine, got, 1)
        assert got[rid].num_cached_tokens == hit, rid
    assert runner.loras == {1}  # type: ignore[attr-defined]


def test_lora_requests_need_enable_lora_and_travel_the_wire() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        _add(engine, "a", "A")
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        engine.call_utility("add_lora", [msgspec.to_builtins(ADAPTERS["A"])])
    # adapters run under tensor parallelism (model-runner's lora/layer.py): rank 0's host cache decides, and the
    # other ranks read what it loads and make each change it made (tp_executor.py)
    lora_tp = EngineConfig(ModelConfig("m", tensor_parallel_size=2), lora_config=LoRAConfig(enable_lora=True))
    assert lora_tp.max_loras == LoRAConfig().max_loras
    req = EngineCoreRequest("x", [1, 2], SamplingParams(), 1.0, lora_request=ADAPTERS["B"])
    assert decode(encode(req), EngineCoreRequest).lora_request == ADAPTERS["B"]
    calls = (ReadLoRA(ADAPTERS["A"]), ApplyLoRA(HostChange(ADAPTERS["B"], (1, 3))), ApplyLoRA(HostChange()),
             ListLoRAs())  # fmt: skip
    for call in calls:
        assert decode(encode(call), LoRACall) == call
    for reply in (LoRAReply(error="gone"), LoRAReply(lora_ids=[2, 1])):
        assert decode(encode(reply), LoRAReply) == reply

    engine = _engine(1)
    assert engine.call_utility("add_lora", [msgspec.to_builtins(ADAPTERS["C"])]) is True
    assert engine.call_utility("list_loras", []) == [3]
    assert engine.call_utility("remove_lora", [3]) is True and engine.call_utility("list_loras", []) == []
