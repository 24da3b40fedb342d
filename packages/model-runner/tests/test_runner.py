"""ModelRunner driven by the fake scheduler: seeded batch invariance, logprobs, preemption, prefix hits, KV sizing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.models import get_model_class, supported_architectures
from treadle_model_runner.runner import ModelRunner

VOCAB = 128


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=[5, 7], bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(config).eval()
    perturb_(hf, seed=2, std=0.15)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def _prompt(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=gen).tolist()


def _log_softmax(hf: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)


def test_seeded_request_is_batch_invariant(llama: tuple[Any, Path]) -> None:
    _, path = llama
    gen = torch.Generator().manual_seed(1)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    prompt = _prompt(gen, 13)

    alone = FakeScheduler(make_runner(path), seed=1)
    alone.add("seeded", prompt, seeded, max_tokens=16)
    expected = alone.run(budget=64)["seeded"]

    variety = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.2, top_p=0.8, seed=7),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.8, presence_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=3),
        SamplingParams(temperature=1.0, prompt_logprobs=2),
    ]
    mixed = FakeScheduler(make_runner(path), seed=2)
    for i in range(15):
        mixed.add(f"other{i}", _prompt(gen, 3 + 3 * i), variety[i % len(variety)], max_tokens=4 + i)
        if i == 7:
            mixed.add("seeded", prompt, seeded, max_tokens=16)
    got = mixed.run(budget=40)
    assert got["seeded"] == expected
    assert len(got) == 16


def test_logprobs_and_prompt_logprobs_match_hf(llama: tuple[Any, Path]) -> None:
    hf, path = llama
    gen = torch.Generator().manual_seed(2)
    prompt = _prompt(gen, 21)
    sched = FakeScheduler(make_runner(path), seed=3)
    sched.add("r", prompt, SamplingParams(temperature=0.0, logprobs=3, prompt_logprobs=2), max_tokens=3)
    outs = [sched.step({"r": 8}), sched.step({"r": 8}), sched.step({"r": 5})]
    prompt_lps = [lp for out in outs for lp in out.prompt_logprobs.get("r", [])]
    ref = _log_softmax(hf, prompt)
    assert len(prompt_lps) == len(prompt) - 1
    for i, lp in enumerate(prompt_lps):
        assert lp.token_ids[0] == prompt[i + 1]
        assert lp.logprobs[0] == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)
        assert lp.token_ids[1:] == ref[i].topk(2).indices.tolist()
    assert outs[0].sampled_token_ids == [[]] and outs[1].logprobs == [None]
    sampled = outs[2].sampled_token_ids[0][0]
    lps = outs[2].logprobs[0]
    assert lps is not None and lps[0].token_ids[0] == sampled and lps[0].chosen_rank == 1
    assert lps[0].logprobs[0] == pytest.approx(ref[-1, sampled].item(), abs=1e-4)


def test_preempted_and_unscheduled_requests_resume_exactly(llama: tuple[Any, Path]) -> None:
    _, path = llama
    gen = torch.Generator().manual_seed(3)
    prompts = [_prompt(gen, n) for n in (9, 14, 6)]
    ref = FakeScheduler(make_runner(path))
    for i, p in enumerate(prompts):
        ref.add(f"r{i}", p, max_tokens=10)
    expected = ref.run(budget=64)

    runner = make_runner(path)
    sched = FakeScheduler(runner, seed=9)
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, max_tokens=10)
    sched.step({"r0": 9, "r1": 14, "r2": 6})
    sched.step({"r0": 1, "r1": 1, "r2": 1})
    sched.step({"r0": 1, "r2": 1})  # r1 unscheduled: leaves the batch, keeps its state
    sched.preempt("r0")  # blocks freed; resent in full (prompt + outputs) and recomputed from scratch
    sched.step({"r1": 1, "r2": 1})
    assert "r0" not in runner.batch and "r0" not in runner.requests
    sched.step({"r0": sched.requests["r0"].num_tokens - 4, "r1": 1, "r2": 1})  # recompute in two chunks
    sched.step({"r0": 4, "r1": 1})
    got = sched.run(budget=64)
    assert got == expected


def test_prefix_hit_reuses_another_requests_blocks(llama: tuple[Any, Path]) -> None:
    hf, path = llama
    gen = torch.Generator().manual_seed(4)
    shared = _prompt(gen, 8)  # two full blocks of 4
    sched = FakeScheduler(make_runner(path), seed=4)
    sched.add("a", shared + _prompt(gen, 3), max_tokens=4)
    sched.step({"a": 11})
    sched.add("b", shared + _prompt(gen, 5), max_tokens=4)
    b = sched.requests["b"]
    b.blocks = [list(blocks[:2]) for blocks in sched.requests["a"].blocks]
    b.num_computed = 8
    out = sched.step({"a": 1, "b": 5})
    ref = _log_softmax(hf, b.prompt)[-1]
    assert out.sampled_token_ids[out.req_id_to_index["b"]] == [int(ref.argmax())]


def test_kv_cache_groups_and_capacity(tmp_path: Path) -> None:
    config = tf.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8,
        sliding_window_pattern=3,
    )  # fmt: skip
    tf.Gemma3ForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    runner = ModelRunner(
        ModelConfig(str(tmp_path)), CacheConfig(block_size=8, kv_cache_space=0.001), 4, 32, "cpu"
    )
    runner.load_model()
    kv = runner.initialize_kv_cache()
    assert [(g.layer_indices, g.sliding_window) for g in kv.groups] == [((2,), None), ((0, 1), 8)]
    assert kv.bytes_per_block == 3 * 2 * 8 * 1 * 16 * 4  # layers x (k, v) x block x nkv x head x fp32
    assert kv.num_blocks == 2 * 4 * 8 + 1  # capped at what 4 full-length sequences in 2 groups can use
    assert all(t.shape == (2, kv.num_blocks, 8, 1, 16) for t in runner.kv_caches)


def test_configuration_errors(llama: tuple[Any, Path]) -> None:
    _, path = llama
    with pytest.raises(ValueError, match=r"max_model_len \(4096\).*at most 128"):
        ModelRunner(ModelConfig(str(path), max_model_len=4096), CacheConfig(), 4, 32, "cpu")
    runner = ModelRunner(ModelConfig(str(path)), CacheConfig(), 4, 32, "cpu")
    assert runner.eos_token_ids == {5, 7} and runner.vocab_size == VOCAB and runner.max_model_len == 128
    bogus = tf.LlamaConfig(architectures=["BogusForCausalLM"])
    with pytest.raises(ValueError, match=r"supported architectures: .*LlamaForCausalLM"):
        get_model_class(bogus)
    assert "Gemma3ForCausalLM" in supported_architectures()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(llama: tuple[Any, Path]) -> None:
    _, path = llama
    gen = torch.Generator().manual_seed(5)
    prompts = [_prompt(gen, n) for n in (5, 9, 17, 3, 11)]
    results = []
    for eager in (True, False):
        config = ModelConfig(str(path), dtype="float32", attention_backend="triton", enforce_eager=eager)
        runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 12, 64, "cuda")
        runner.load_model()
        runner.initialize_kv_cache()
        assert (runner.graphs is None) == eager and (eager or runner.graphs.has(8))  # type: ignore[union-attr]
        sched = FakeScheduler(runner)
        hidden = record_hidden(runner)
        for i, p in enumerate(prompts):
            sched.add(f"r{i}", p, max_tokens=12 + i)
        results.append((sched.run(budget=64), hidden))
    (eager_tokens, eager_hidden), (graph_tokens, graph_hidden) = results
    assert graph_tokens == eager_tokens
    for h_eager, h_graph in zip(eager_hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kv_capacity_from_profiling(llama: tuple[Any, Path]) -> None:
    _, path = llama
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.2)
    runner = ModelRunner(ModelConfig(str(path), enforce_eager=True), cache, 8, 256, "cuda")
    runner.load_model()
    kv = runner.initialize_kv_cache()
    total = torch.cuda.mem_get_info()[1]
    assert 0 < kv.num_blocks * kv.bytes_per_block <= 0.2 * total
    assert runner.dtype == torch.bfloat16
    sched = FakeScheduler(runner)
    sched.add("r", list(range(1, 40)), max_tokens=8)
    assert len(sched.run(budget=256)["r"]) == 8


def test_kernel_warm_up_leaves_no_trace(llama: tuple[Any, Path]) -> None:
    """The start-up warm-up steps (dummy requests on the null block) leave the runner as they found it."""
    from treadle_model_runner.runner.warmup import SHAPES, fits, warm_up_kernels

    _, path = llama
    gen = torch.Generator().manual_seed(9)
    prompts = [_prompt(gen, n) for n in (7, 20, 4)]
    results = []
    for warm in (False, True):
        runner = make_runner(path)
        if warm:
            calls: list[Any] = []
            execute = runner.execute

            def counted(so: Any, calls: list[Any] = calls, execute: Any = execute) -> Any:
                calls.append(so)
                return execute(so)

            runner.execute = counted  # type: ignore[method-assign]
            warm_up_kernels(runner)
            fitting = sum(fits(runner, q, c) for q, c in SHAPES)
            assert fitting >= 1 and len(calls) == 2 * fitting, "each fitting shape runs (then is dropped)"
            assert runner.batch.num_reqs == 0 and not runner.requests
            runner.execute = execute  # type: ignore[method-assign]
        sched = FakeScheduler(runner, seed=3)
        for i, p in enumerate(prompts):
            sched.add(f"r{i}", p, SamplingParams(temperature=0.0), max_tokens=8)
        results.append(sched.run(budget=32))
    assert results[0] == results[1]
