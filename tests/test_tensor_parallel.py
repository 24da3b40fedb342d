"""`tensor_parallel_size=2` on CPU (gloo): the offline LLM, in-process and in an engine process, gives the one-device
engine's tokens and logprobs (dummy weights: each rank keeps its slice of the one-device values); its worker process
ends with `shutdown`, rank 0 freeing its CUDA graphs before it leaves the group; a worker that dies takes the engine process down, and the client says the engine is dead; with speculative
decoding both ranks keep the one-device tokens; a
group size that does not divide the heads fails with that message and leaves no worker behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import LLAMA

from treadle import LLM, SamplingParams
from treadle_engine_core import EngineDeadError

ENGINE: dict[str, Any] = {"load_format": "dummy", "max_model_len": 256, "kv_cache_space": 0.05}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("tiny_llama")
    (model / "config.json").write_text(json.dumps(LLAMA))  # the e2e tests' tiny Llama (4 heads, 2 KV heads)
    return model


def _run(llm: LLM) -> list[Any]:
    prompts: list[Any] = [{"prompt_token_ids": [3 + i, 7, 11 + 2 * i, 5] * (1 + i)} for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, [greedy, seeded] * 3)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _assert_same(got: list[Any], want: list[Any]) -> None:
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for (_, lps), (_, ref) in zip(got, want, strict=True):
        for pos, ref_pos in zip(lps, ref, strict=True):
            assert list(pos) == list(ref_pos)
            got_lp, want_lp = [e.logprob for e in pos.values()], [e.logprob for e in ref_pos.values()]
            assert got_lp == pytest.approx(want_lp, abs=1e-5)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def one_device(tiny: Path) -> list[Any]:
    llm = LLM(str(tiny), **ENGINE)
    try:
        return _run(llm)
    finally:
        llm.shutdown()


def test_two_ranks_in_process_equal_one_device(
    tiny: Path, one_device: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import treadle_engine_core.tp_executor as tp_executor
    from treadle_model_runner.runner import ModelRunner

    order: list[
        str
    ] = []  # rank 0's: its CUDA graphs must go before the group (NCCL's teardown waits on them)
    release, destroy = ModelRunner.release_graphs, tp_executor.destroy_tensor_parallel
    monkeypatch.setattr(
        ModelRunner, "release_graphs", lambda self: (order.append("release"), release(self))[1]
    )
    monkeypatch.setattr(
        tp_executor, "destroy_tensor_parallel", lambda: (order.append("destroy"), destroy())[1]
    )
    llm = LLM(str(tiny), tensor_parallel_size=2, **ENGINE)
    workers = [pid for pid in _children(os.getpid()) if _is_worker(pid)]
    try:
        assert len(workers) == 1
        assert "x 2 (tensor parallel)" in llm.engine_info()["device"]
        _assert_same(_run(llm), one_device)
    finally:
        llm.shutdown()
    assert not Path(f"/proc/{workers[0]}").exists(), "shutdown should end the worker process"
    assert order[:2] == ["release", "destroy"], order


def test_two_ranks_with_speculation_equal_one_device(tiny: Path, one_device: list[Any]) -> None:
    """n-gram drafts travel to the other rank inside the SchedulerOutput; both ranks verify them alike, so the
    tokens and logprobs are the one-device run's without drafts."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    llm = LLM(str(tiny), tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    try:
        _assert_same(_run(llm), one_device)
        stats = llm.client.get_stats()  # type: ignore[attr-defined]
    finally:
        llm.shutdown()
    assert stats.spec_num_accepted_tokens > 0, stats


def _is_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("treadle-tp")
    except OSError:
        return False


def test_two_ranks_in_an_engine_process_and_a_dying_worker(tiny: Path, one_device: list[Any]) -> None:
    llm = LLM(str(tiny), tensor_parallel_size=2, engine_process=True, **ENGINE)
    proc = llm.client.proc  # type: ignore[attr-defined]
    try:
        _assert_same(_run(llm), one_device)
        workers = [pid for pid in _children(proc.pid) if _is_worker(pid)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        proc.join(timeout=30)
        assert not proc.is_alive(), "the engine process should end when a tensor-parallel worker dies"
        with pytest.raises(EngineDeadError):
            llm.generate([{"prompt_token_ids": [3, 4]}], SamplingParams(max_tokens=2))
    finally:
        llm.shutdown()


def test_a_group_size_that_does_not_divide_the_heads_fails_clearly(tiny: Path) -> None:
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"
    ):
        LLM(str(tiny), tensor_parallel_size=3, **ENGINE)
    assert not [pid for pid in _children(os.getpid()) if _is_worker(pid)], "the workers should be stopped"
