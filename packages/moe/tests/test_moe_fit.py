"""A fused-MoE block config that needs more shared memory than the GPU has (float32 inputs on tiles tuned for
16-bit ones) is shrunk at its first launch and the fitted config is remembered; the result is still exact.

The launch is wrapped so that configs above a shared-memory budget raise Triton's OutOfResources, as the real
launch does on a GPU; the kernel itself runs (on the GPU, or under the interpreter on CPU) and is compared with the
torch reference.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from treadle_moe.configs import BlockConfig
from treadle_moe.experts import triton_launch
from treadle_moe.experts.align import align_block_size

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources


def _smem(config: BlockConfig, dtype: torch.dtype) -> int:
    return config.num_stages * (config.block_m + config.block_n) * config.block_k * dtype.itemsize


def test_config_too_big_for_shared_memory_is_shrunk_and_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 16 * 1024
    tried: list[BlockConfig] = []
    launch = triton_launch._launch

    def limited(*args, **kwargs):
        config, a = args[5], args[0]
        tried.append(config)
        if _smem(config, a.dtype) > budget:
            raise OutOfResources(_smem(config, a.dtype), budget, "shared memory")
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_launch, "_launch", limited)
    monkeypatch.setattr(triton_launch, "_FITTED", {})
    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden, inter, experts, top_k = 12, 64, 48, 4, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(num_tokens, hidden, generator=gen).to(device)
    w = (torch.randn(experts, inter, hidden, generator=gen) * hidden**-0.5).to(device)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(num_tokens)]).to(
        device
    )
    config = BlockConfig(16, 32, 64, num_warps=4, num_stages=3)  # 3 * 48 * 64 * 4 B = 36 KiB > 16 KiB
    alignment = align_block_size(topk_ids, config.block_m, experts, use_triton=False)
    expected = torch.einsum("th,eih->tei", a, w)[torch.arange(num_tokens)[:, None], topk_ids].reshape(
        -1, inter
    )
    for attempt in range(2):
        out = torch.zeros(num_tokens * top_k, inter, device=device)
        triton_launch.invoke_moe_gemm(a, w, out, None, alignment, config, a_rows_per_token=top_k, gated=False)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        fitted = tried[-1]
        assert _smem(fitted, a.dtype) <= budget and fitted.block_m == config.block_m
        if attempt == 0:
            assert len(tried) > 1 and tried[0] == config  # shrunk step by step
            tried.clear()
        else:
            assert tried == [fitted]  # the second launch goes straight to the fitted config
    assert {(config, torch.float32, False): fitted} == triton_launch._FITTED


def test_shrinking_logs_no_reference_to_the_launch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning must not carry the exception: its traceback holds the launching frames (on a GPU, the model
    runner and its KV cache), and a handler that keeps records (pytest's capture) kept a whole engine alive."""
    monkeypatch.setattr(triton_launch, "_FITTED", {})

    class Inputs:  # stands for the launch's tensors and the frames above it
        pass

    inputs = Inputs()
    alive = weakref.ref(inputs)

    def launch(config: BlockConfig, held: Inputs = inputs) -> None:
        if config.num_stages > 1:
            raise OutOfResources(2 * 1024, 1024, "shared memory")

    config = BlockConfig(16, 32, 64, num_warps=4, num_stages=3)
    with caplog.at_level(logging.WARNING, logger=triton_launch.__name__):
        triton_launch.launch_fitted((config, torch.float32, False), config, launch)
        assert "do not fit this GPU" in caplog.text
        del inputs, launch
        gc.collect()
        assert alive() is None, "a logged record still refers to the failed launch's frames"
