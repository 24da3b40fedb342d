"""`kv_cache_dtype` fp8: the runner allocates 8-bit caches, sizes them by their bytes and generates through them.

The kernels' own fp8 tests compare every write and read against the IR op and the torch reference; here a tiny
Llama runs whole requests (chunked prefill, decode) through fp8 caches on the torch backend and
stays close to the same runner with caches in the model dtype. GPU (``-m gpu``): the Triton backend with CUDA
graphs against the torch backend, both on fp8 caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_runner_fakes import FakeScheduler, make_runner, record_hidden, save_llama

from treadle_kernels.attention import AttentionBackend
from treadle_kernels.attention.flashinfer_backend import FlashInferAttentionBackend
from treadle_model_runner import CacheConfig, ModelConfig
from treadle_model_runner.kv_cache import resolve_kv_cache_dtype
from treadle_model_runner.runner import ModelRunner

VOCAB = 96
# mean |hidden error| / mean |hidden| per step (measured up to 0.079 for e4m3, 0.169 for e5m2 on this model)
BOUND = {"fp8": 0.12, "fp8_e5m2": 0.25}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_fp8"), 3, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)  # fmt: skip


def _runner(path: Path, kv_cache_dtype: str, device: str = "cpu", **model: Any) -> ModelRunner:
    return make_runner(path, 8, 24, block_size=4, num_blocks=96, kv_cache_dtype=kv_cache_dtype, device=device,
                       **model)  # fmt: skip


def _generate(runner: ModelRunner, max_tokens: int = 10) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (19, 7, 30, 3, 18)]
    sched = FakeScheduler(runner, seed=2)
    hidden = record_hidden(runner)
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, max_tokens=max_tokens)
    return sched.run(budget=24), hidden


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_cache_generates_close_to_model_dtype(llama: Path, name: str) -> None:
    full = _runner(llama, "auto")
    fp8 = _runner(llama, name)
    expected = torch.float8_e4m3fn if name == "fp8" else torch.float8_e5m2
    assert all(t.dtype == expected for t in fp8.kv_caches)
    assert fp8.kv_cache_config.bytes_per_block * 4 == full.kv_cache_config.bytes_per_block  # type: ignore[union-attr]
    # prompts only (one sampled token each), so both runs see the same inputs: chunks of later steps attend to
    # the fp8 blocks earlier chunks (and the shared prefix) wrote
    (_, full_hidden), (_, fp8_hidden) = _generate(full, max_tokens=1), _generate(fp8, max_tokens=1)
    errors = [
        float((a - b).abs().mean() / a.abs().mean()) for a, b in zip(full_hidden, fp8_hidden, strict=True)
    ]
    assert len(errors) >= 4 and max(errors) < BOUND[name], errors
    assert min(errors) > 0.0, "fp8 caches gave bit-identical hidden states: were they used?"
    tokens, _ = _generate(fp8)  # and whole requests decode through them
    assert sorted(tokens) == [f"r{i}" for i in range(5)] and all(len(t) == 10 for t in tokens.values())


def test_fp8_cache_holds_more_tokens_in_the_same_memory(llama: Path) -> None:
    blocks = {}
    for name in ("auto", "fp8"):
        fp32_block = 2 * 2 * 4 * 2 * 16 * 4  # layers x (k, v) x block x nkv x head x 4 bytes
        cache = CacheConfig(block_size=4, kv_cache_space=50 * fp32_block / (1 << 30), kv_cache_dtype=name)
        runner = ModelRunner(ModelConfig(str(llama), dtype="float32"), cache, 64, 64, device="cpu")
        runner.load_model()
        blocks[name] = runner.initialize_kv_cache().num_blocks
    assert blocks == {"auto": 50, "fp8": 200}  # fp32 model: 4 bytes a value against 1


def test_fp8_cache_errors(llama: Path) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp4' is not one of auto, fp8, fp8_e4m3, fp8_e5m2"):
        CacheConfig(kv_cache_dtype="fp4")

    class NoFp8(AttentionBackend):
        name = "no-fp8"

    with pytest.raises(
        ValueError, match=r"not supported by the 'no-fp8' attention backend.*--attention-backend"
    ):
        resolve_kv_cache_dtype("fp8", torch.bfloat16, NoFp8)
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, NoFp8) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16, FlashInferAttentionBackend) == torch.float8_e5m2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_gpu_triton_fp8_cache_matches_torch(llama: Path, name: str) -> None:
    """fp32 model: both backends narrow K/V the same way (round to nearest even), so they agree to fp32 noise."""
    torch_tokens, torch_hidden = _generate(_runner(llama, name, "cuda", enforce_eager=True))
    triton = _runner(llama, name, "cuda", attention_backend="triton")
    assert triton.graphs is not None and triton.mixed_graphs is not None
    triton_tokens, triton_hidden = _generate(triton)
    assert triton_tokens == torch_tokens
    for a, b in zip(torch_hidden, triton_hidden, strict=True):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
