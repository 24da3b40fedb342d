"""Embeddings (SamplingParams.pooling="last"): the runner returns the L2-normalised final hidden state of the last
prompt token, equal to HF's `last_hidden_state` there, once, in the step that finishes the prompt (also when the
prompt is chunked, or batched with generation requests, which get none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, make_runner, perturb_

from treadle_model_runner import SamplingParams


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[tf.PreTrainedModel, Path]:
    config = tf.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    hf = tf.Qwen3ForCausalLM(config).eval()
    perturb_(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def test_last_token_embedding_matches_hf(qwen3: tuple[tf.PreTrainedModel, Path]) -> None:
    hf, path = qwen3
    gen = torch.Generator().manual_seed(4)
    prompts = {f"e{i}": torch.randint(1, 128, (7 + 19 * i,), generator=gen).tolist() for i in range(3)}
    sched = FakeScheduler(make_runner(path), seed=2)
    embed = SamplingParams(temperature=0.0, max_tokens=1, pooling="last")
    for req_id, prompt in prompts.items():
        sched.add(req_id, prompt, embed, max_tokens=1)
    sched.add("gen", prompts["e1"], SamplingParams(temperature=0.0), max_tokens=5)
    sched.run(budget=16)  # e1 and e2 are chunked
    pooled = [out.pooled for out in sched.outputs if out.pooled]
    got = {req_id: vec for step in pooled for req_id, vec in step.items()}
    assert sorted(got) == sorted(prompts), "one embedding per pooling request, none for generation"
    assert sum(len(step) for step in pooled) == len(prompts)
    for req_id, prompt in prompts.items():
        with torch.no_grad():
            last = hf.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(last.float(), dim=-1)
        assert torch.tensor(got[req_id]).sub(want).abs().max().item() < 1e-5, req_id


def _pooled_by_hand(hf: tf.PreTrainedModel, prompt: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    with torch.no_grad():
        states = hf.model(torch.tensor([prompt])).last_hidden_state[0].float()  # [len(prompt), hidden]
    vector = {"last": states[-1], "mean": states.mean(dim=0), "cls": states[0]}[pooling]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", True), ("mean", False), ("cls", False)])
def test_mean_and_first_token_pooling_over_chunks(
    qwen3: tuple[tf.PreTrainedModel, Path], pooling: str, normalize: bool
) -> None:
    """MEAN adds up every chunk's prompt positions, CLS keeps the first chunk's first one; both divide or return
    only in the step that finishes the prompt, batched with a generation request and a last-token one."""
    hf, path = qwen3
    gen = torch.Generator().manual_seed(6)
    prompts = {f"p{i}": torch.randint(1, 128, (5 + 23 * i,), generator=gen).tolist() for i in range(3)}
    sched = FakeScheduler(make_runner(path), seed=2)
    for req_id, prompt in prompts.items():
        params = SamplingParams(temperature=0.0, max_tokens=1, pooling=pooling, normalize=normalize)
        sched.add(req_id, prompt, params, max_tokens=1)
    sched.add(
        "last", prompts["p2"], SamplingParams(temperature=0.0, max_tokens=1, pooling="last"), max_tokens=1
    )
    sched.add("gen", prompts["p1"], SamplingParams(temperature=0.0), max_tokens=5)
    sched.run(budget=16)  # p1 and p2 take several steps
    got = {req_id: vec for out in sched.outputs for req_id, vec in out.pooled.items()}
    assert sorted(got) == sorted([*prompts, "last"])
    for req_id, prompt in prompts.items():
        want = _pooled_by_hand(hf, prompt, pooling, normalize)
        assert torch.tensor(got[req_id]).sub(want).abs().max().item() < 1e-5, req_id
    last = _pooled_by_hand(hf, prompts["p2"], "last", True)
    assert torch.tensor(got["last"]).sub(last).abs().max().item() < 1e-5


def test_unknown_pooling_is_rejected() -> None:
    with pytest.raises(ValueError, match="pooling 'max' is not one of None, 'last', 'mean', 'cls'"):
        SamplingParams(pooling="max")
    with pytest.raises(ValueError, match="normalize must be true or false"):
        SamplingParams(pooling="mean", normalize=1)  # type: ignore[arg-type]
    assert (
        SamplingParams(pooling="mean").needs_whole_prompt and SamplingParams(pooling="cls").needs_whole_prompt
    )
    assert (
        not SamplingParams(pooling="last").needs_whole_prompt
        and SamplingParams(prompt_logprobs=0).needs_whole_prompt
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_last_token_embedding_on_gpu(qwen3: tuple[tf.PreTrainedModel, Path]) -> None:
    """bf16 on the GPU (Triton attention, CUDA graphs): within bf16 rounding of HF's float32 embedding."""
    hf, path = qwen3
    gen = torch.Generator().manual_seed(5)
    prompts = {f"e{i}": torch.randint(1, 128, (3 + 41 * i,), generator=gen).tolist() for i in range(4)}
    runner = make_runner(
        path, block_size=16, num_blocks=64, device="cuda", dtype="bfloat16", attention_backend="triton"
    )
    sched = FakeScheduler(runner, seed=3)
    for req_id, prompt in prompts.items():
        sched.add(req_id, prompt, SamplingParams(temperature=0.0, max_tokens=1, pooling="last"), max_tokens=1)
    sched.run(budget=64)
    got = {req_id: vec for out in sched.outputs for req_id, vec in out.pooled.items()}
    assert sorted(got) == sorted(prompts)
    for req_id, prompt in prompts.items():
        with torch.no_grad():
            want = hf.model(torch.tensor([prompt])).last_hidden_state[0, -1].float()
        cos = torch.nn.functional.cosine_similarity(torch.tensor(got[req_id]), want, dim=0).item()
        assert cos > 0.999, (req_id, cos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mean_and_first_token_pooling_on_gpu(qwen3: tuple[tf.PreTrainedModel, Path], pooling: str) -> None:
    """bf16 on the GPU (Triton attention, CUDA graphs, prompts chunked): within bf16 rounding of HF's float32."""
    hf, path = qwen3
    gen = torch.Generator().manual_seed(7)
    prompts = {f"e{i}": torch.randint(1, 128, (3 + 41 * i,), generator=gen).tolist() for i in range(4)}
    runner = make_runner(
        path, block_size=16, num_blocks=64, device="cuda", dtype="bfloat16", attention_backend="triton"
    )
    sched = FakeScheduler(runner, seed=3)
    for req_id, prompt in prompts.items():
        sched.add(
            req_id, prompt, SamplingParams(temperature=0.0, max_tokens=1, pooling=pooling), max_tokens=1
        )
    sched.run(budget=32)
    got = {req_id: vec for out in sched.outputs for req_id, vec in out.pooled.items()}
    assert sorted(got) == sorted(prompts)
    for req_id, prompt in prompts.items():
        want = _pooled_by_hand(hf, prompt, pooling, True)
        cos = torch.nn.functional.cosine_similarity(torch.tensor(got[req_id]), want, dim=0).item()
        assert cos > 0.999, (req_id, cos)
