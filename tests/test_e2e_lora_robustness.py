"""LoRA adapters that go away while requests wait for them, on a tiny random Llama with PEFT adapters (CPU, fp32).

With one adapter slot and one adapter kept in host memory, a waiting request's adapter is evicted by later
arrivals; if its directory is then deleted, that request alone fails when it is admitted, with the adapter and the
file problem named, while the engine goes on: the requests around it still give PEFT's greedy continuations, and
later requests still run. Checked on the EngineCore (sync and async scheduling) and through `treadle serve` with
the openai SDK.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lora_e2e_assets import Tiny, build_tiny

from treadle import LoRARequest, SamplingParams
from treadle_engine_core.config import EngineConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_engine_core.request import FinishReason
from treadle_model_runner import CacheConfig, LoRAConfig, ModelConfig

PROMPTS = {"r1": [5, 40, 17, 200, 9], "r2": [6, 43, 17, 199, 9], "r3": [7, 46, 17, 198, 9], "r4": [8, 49, 17]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("lora_robust"))


def _engine(tiny: Tiny, async_scheduling: bool) -> EngineCore:
    config = EngineConfig(
        model_config=ModelConfig(
            str(tiny.model), dtype="float32", attention_backend="torch", max_model_len=64
        ),
        cache_config=CacheConfig(block_size=4, num_gpu_blocks_override=64),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=32, async_scheduling=async_scheduling
        ),
        lora_config=LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1),
    )
    return EngineCore(config)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_deleted_adapter_fails_its_request_and_the_engine_goes_on(
    tiny: Tiny, tmp_path: Path, async_scheduling: bool
) -> None:
    doomed = Path(shutil.copytree(tiny.adapters["poet"], tmp_path / "doomed"))
    loras = {
        "r1": tiny.request("sql"),
        "r2": LoRARequest("doomed", 7, str(doomed)),
        "r3": tiny.request("poet"),
        "r4": None,
    }
    engine = _engine(tiny, async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def add(rid: str) -> None:
        engine.add_request(EngineCoreRequest(rid, PROMPTS[rid], params, 0.0, lora_request=loras[rid]))

    tokens: dict[str, list[int]] = {}
    finished: dict[str, tuple[FinishReason | None, str | None]] = {}

    def step() -> None:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.error)

    try:
        for rid in ("r1", "r2", "r3"):  # each add loads its adapter; host memory keeps one: r2's is evicted
            add(rid)
        step()  # r1 admitted (sql back in host memory); r2 and r3 wait for the one slot
        assert set(tokens) <= {"r1"} and not finished
        shutil.rmtree(doomed)
        for _ in range(100):
            if not engine.has_work:
                break
            step()
        add("r4")  # the engine still serves
        while engine.has_work:
            step()
    finally:
        engine.shutdown()
    reason, error = finished["r2"]
    assert reason == FinishReason.ERROR and tokens.get("r2", []) == []
    assert error is not None and "LoRA adapter 'doomed'" in error and f"{doomed} is not a directory" in error
    for rid, adapter in (("r1", "sql"), ("r3", "poet"), ("r4", None)):
        assert finished[rid] == (FinishReason.LENGTH, None), rid
        assert tokens[rid] == tiny.peft.greedy(adapter, PROMPTS[rid], 6), rid
