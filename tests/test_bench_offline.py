"""`treadle bench throughput|latency` on CPU with a tiny dummy Llama: vLLM's printed lines, the numbers'
arithmetic, and the --output-json record carrying what API.md asks every result to record (device, version and
commit, model, dtype, dummy or real weights, max_model_len, KV capacity, CUDA graphs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from e2e_helpers import LLAMA

import treadle_frontend
from treadle import cli
from treadle.bench import offline

ENGINE = ["--load-format", "dummy", "--max-model-len", "256", "--kv-cache-space", "0.05"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("tiny_llama")
    (model / "config.json").write_text(json.dumps(LLAMA))  # the e2e tests' tiny Llama
    return model


def _engine_record(record: dict, tiny: Path) -> None:
    engine, treadle = record["engine"], record["treadle"]
    assert engine["model_path"] == str(tiny) and engine["max_model_len"] == 256
    assert engine["kv_capacity_tokens"] > 0 and engine["device"].startswith("cpu (")
    assert (engine["dtype"], engine["kv_cache_dtype"]) == ("float32", "float32")
    assert engine["cuda_graphs"] == "off (not a CUDA device)" and engine["weights"] == "dummy (random)"
    assert engine["attention_backend"] == "torch" and engine["torch"]
    assert engine["quantization"] == ("fp8" if record["args"].get("quantization") else "none")
    assert treadle["version"] and (treadle["commit"] is None or len(treadle["commit"]) >= 7)


def test_bench_throughput(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.json"
    argv = ["bench", "throughput", "--model", str(tiny), *ENGINE, "--num-prompts", "6", "--input-len", "12",
            "--output-len", "5", "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Throughput: " in printed and "Total num prompt tokens:  72" in printed
    record = json.loads(out.read_text())
    result = record
    assert (result["total_prompt_tokens"], result["total_output_tokens"], result["num_requests"]) == (
        72,
        30,
        6,
    )
    assert result["output_tokens_per_second"] == pytest.approx(30 / result["elapsed_time"])
    assert record["args"]["num_prompts"] == 6
    _engine_record(record, tiny)


def test_bench_latency(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "l.json"
    argv = ["bench", "latency", "--model", str(tiny), *ENGINE, "--batch-size", "2", "--input-len", "8",
            "--output-len", "4", "--num-iters-warmup", "1", "--num-iters", "2", "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "Avg latency: " in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert len(record["latencies"]) == 2
    assert record["ms_per_output_token"] == pytest.approx(record["avg_latency"] * 1000 / 4)
    _engine_record(record, tiny)


def test_bench_latency_quantized(tiny: Path, tmp_path: Path) -> None:
    """`--quantization fp8` (vLLM's `-q`) reaches the engine: its record says the weights run quantized."""
    out = tmp_path / "q.json"
    argv = ["bench", "latency", "--model", str(tiny), *ENGINE, "-q", "fp8", "--batch-size", "1", "--input-len", "8",
            "--output-len", "4", "--num-iters-warmup", "0", "--num-iters", "1", "--output-json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["args"]["quantization"] == "fp8"
    _engine_record(record, tiny)


def test_provenance_names_the_commit_a_benchmark_machine_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle.bench.offline import provenance

    monkeypatch.setenv("TREADLE_SOURCE_COMMIT", "380eb36")
    assert provenance()["commit"] == "380eb36"
    monkeypatch.delenv("TREADLE_SOURCE_COMMIT")
    commit = provenance()["commit"]  # this checkout's own
    assert commit is None or (commit != "380eb36" and len(commit) >= 7)


def test_vllm_flag_names_and_bad_values(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "throughput", "--model", str(tiny), *ENGINE, "--dataset-name", "random", "--num-prompts", "2",
            "--random-input-len", "6", "--random-output-len", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Total num prompt tokens:  12" in printed and "Total num output tokens:  6" in printed
    # a value that would run another workload (or divide by zero) is a usage error, before any engine starts
    for kind, bad in (("throughput", ["--output-len", "0"]), ("throughput", ["--num-prompts", "0"]),
                      ("throughput", ["--random-range-ratio", "2"]), ("throughput", ["--input-len", "-1"]),
                      ("latency", ["--output-len", "0"]), ("latency", ["--batch-size", "0"])):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", kind, "--model", str(tiny), *ENGINE, *bad])
        assert exit_info.value.code == 2, (kind, bad)
        assert "must be" in capsys.readouterr().err


def test_engine_flags_reach_the_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(treadle_frontend, "LLM", lambda **kw: seen.update(kw))
    parser = argparse.ArgumentParser()
    offline.add_throughput_args(parser)
    args = parser.parse_args(["--model", "m", "-tp", "2", "--enable-expert-parallel", "--enforce-eager"])
    offline.make_llm(args)
    assert seen["tensor_parallel_size"] == 2 and seen["enable_expert_parallel"] is True
    assert seen["enforce_eager"] is True
    seen.clear()
    offline.make_llm(parser.parse_args(["--model", "m"]))
    assert "enable_expert_parallel" not in seen and "tensor_parallel_size" not in seen
