"""Multi-head latent attention's cache on the Triton backend: one tensor, read as K and as V, and wide heads.

MLA (DeepSeek) caches one vector a token that is both the key and the value (num_kv_heads 1); the runner hands the
backend a stride-0 view ``[2, ...]`` over that one tensor (model-runner kv_cache.py). Here the Triton backend, on
such a view, writes the step's vectors through it (both halves see them) and attends as the torch backend does on
two separate copies, on both of its paths: the latent kernel (``triton_mla.py``, the default; its own cases are in
test_attention_triton_latent.py) and the unified kernel (``padded``: ``TREADLE_ATTN_MLA=0``), where heads of 288
dims pad to 512, past ``WIDE_HEAD_DIM``: with an H100's launch profile they take ``wide_head_config``'s tiles
(16-key tiles, one query row per head; split-KV for the decodes), as on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import make_case

from treadle_kernels.attention import get_attn_backend, triton_mla
from treadle_kernels.attention.triton_backend import TritonAttentionImpl
from treadle_kernels.attention.triton_launch import H100_PROFILE, choose_launch_config, wide_head_config

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NH, D, BLOCK = 4, 288, 16
BATCHES = {"mixed": [(0, 7), (20, 1), (9, 5), (40, 1)], "decodes": [(30, 1), (50, 1)]}


@pytest.mark.parametrize("path", ["latent", "padded"])
@pytest.mark.parametrize("h100", [False, True], ids=["interpreter-tiles", "h100-tiles"])
@pytest.mark.parametrize("batch", ["mixed", "decodes"])
def test_shared_kv_cache_matches_torch_on_two_copies(
    batch: str, h100: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_mla, "_ENABLED", path == "latent")
    case = make_case(BATCHES[batch], NH, 1, D, BLOCK, device=DEVICE, seed=41, num_padding=1)
    # [num_blocks, block_size, 1, D], NaN where unwritten
    latent = case.kv_cache[0].clone()
    shared = latent.unsqueeze(0).expand(2, *latent.shape)
    copies = torch.stack([latent, latent.clone()])
    outs = {}
    for name, cache in (("triton", shared), ("torch", copies)):
        backend = get_attn_backend(name, case.query.device)
        assert backend.supports_shared_kv
        impl = backend.get_impl_cls()(NH, D, D**-0.5, 1)
        if h100:
            assert isinstance(impl, TritonAttentionImpl) or name == "torch"
            impl.device_profile = H100_PROFILE
        builder = backend.get_builder_cls()(BLOCK, case.query.device)
        out = torch.zeros_like(case.query)
        # the key is the value: MLA's latent
        impl.forward(case.query, case.key, case.key, cache, builder.build(case.metadata), out)
        outs[name] = out[: case.metadata.num_actual_tokens]
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=2e-5, rtol=2e-5)
    slots = case.metadata.slot_mapping[: case.metadata.num_actual_tokens]
    # the value half shows what went through the key half: one tensor
    written = shared[1].flatten(0, 1)[slots]
    torch.testing.assert_close(written, case.key[: slots.shape[0]], atol=0, rtol=0)
    assert shared.stride(0) == 0


def test_wide_heads_take_narrow_tiles_on_a_gpu() -> None:
    """1024-wide (padded) heads: 16 rows (16 query heads), 16 keys, one stage, 8 warps; decodes keep their splits,
    and narrower heads or the interpreter's profile keep the usual launch."""
    decode = choose_launch_config(H100_PROFILE, 4, 1, 1, 16)
    wide = wide_head_config(decode, H100_PROFILE, 1024, 16, 1)
    assert (wide.block_m, wide.block_q, wide.block_n, wide.num_stages, wide.num_warps) == (16, 1, 16, 1, 8)
    assert wide.num_splits == decode.num_splits > 1
    prefill = wide_head_config(choose_launch_config(H100_PROFILE, 2, 64, 1, 16), H100_PROFILE, 1024, 16, 64)
    assert (prefill.block_m, prefill.num_splits) == (16, 1)
    assert wide_head_config(decode, H100_PROFILE, 256, 16, 1) == decode
