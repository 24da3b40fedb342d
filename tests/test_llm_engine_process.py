"""`LLM(engine_process=True)`: the offline engine core in its own process gives exactly what the in-process one
gives (greedy and seeded tokens, logprobs), and its process ends with `shutdown`; an LLM freezes its start-up
heap out of the garbage collector's scans; `treadle bench throughput
--engine-process` runs on it."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import LLAMA

from treadle import LLM, SamplingParams, cli

ENGINE: dict[str, Any] = {"load_format": "dummy", "max_model_len": 256, "kv_cache_space": 0.05}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("tiny_llama")
    (model / "config.json").write_text(json.dumps(LLAMA))  # the e2e tests' tiny Llama
    return model


def _run(llm: LLM) -> list[Any]:
    prompts: list[Any] = [{"prompt_token_ids": [3 + i, 7, 11 + 2 * i, 5]} for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, [greedy, seeded] * 3)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def test_engine_process_equals_in_process(tiny: Path) -> None:
    gc.unfreeze()
    inproc = LLM(str(tiny), **ENGINE)
    assert gc.get_freeze_count() > 10_000, "the LLM should freeze its start-up heap (engine_core.heap)"
    runner = weakref.ref(inproc.client.engine.executor.runner)  # type: ignore[attr-defined]
    try:
        want = _run(inproc)
    finally:
        inproc.shutdown()
    del inproc
    gc.collect()
    assert runner() is None, "a frozen LLM must still be freed by reference counting once dropped"
    llm = LLM(str(tiny), engine_process=True, **ENGINE)
    proc = llm.client.proc  # type: ignore[attr-defined]
    try:
        got = _run(llm)
        assert proc.is_alive() and proc.pid != __import__("os").getpid()
    finally:
        llm.shutdown()
    proc.join(timeout=30)
    assert not proc.is_alive(), "shutdown should end the engine process"
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for (_, lps), (_, ref) in zip(got, want, strict=True):
        assert (lps is None) == (ref is None)
        for pos, ref_pos in zip(lps or [], ref or [], strict=True):
            assert list(pos) == list(ref_pos)
            assert [e.logprob for e in pos.values()] == pytest.approx([e.logprob for e in ref_pos.values()])


def test_bench_throughput_in_an_engine_process(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.json"
    argv = ["bench", "throughput", "--model", str(tiny), "--load-format", "dummy", "--max-model-len", "256",
            "--kv-cache-space", "0.05", "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
            "--engine-process", "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "Throughput: " in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["args"]["engine_process"] is True and record["total_output_tokens"] == 16


def test_quantization_reaches_an_engine_process(tiny: Path, tmp_path: Path) -> None:
    """`--quantization fp8` travels with the engine config to the engine's own process (as `treadle serve`'s does):
    the READY handshake's runtime facts say the weights run fp8."""
    out = tmp_path / "q.json"
    argv = ["bench", "throughput", "--model", str(tiny), "--load-format", "dummy", "--max-model-len", "256",
            "--kv-cache-space", "0.05", "--num-prompts", "2", "--input-len", "8", "--output-len", "4",
            "--quantization", "fp8", "--engine-process", "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["engine"]["quantization"] == "fp8" and record["total_output_tokens"] == 8
