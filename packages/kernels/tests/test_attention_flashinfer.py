"""The FlashInfer backend: against the torch reference on GPU (skipped without CUDA or flashinfer), and its glue
(CSR page table, window conversion, one plan per step) on CPU through a stand-in for the flashinfer module."""

from __future__ import annotations

import pytest
import torch
from attention_cases import FP8, make_case
from flashinfer_fake import FakeWrapper, fake_flashinfer

from treadle_kernels.attention import get_attn_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(kind: str) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(7)
    decodes = [(int(c), 1) for c in torch.randint(1, 4000, (32,), generator=gen)]
    if kind == "decode":
        return decodes
    if kind == "prefill":
        return [(0, 1200), (0, 333), (0, 17)]
    return [(0, 700), (1500, 256), (64, 9), *decodes]


def _run(name, case, window, cap, layers=1):
    backend = get_attn_backend(name, "cuda")
    builder = backend.get_builder_cls()(16, "cuda")
    md = builder.build(case.metadata)
    outs = []
    for _ in range(layers):  # several layers share one step's metadata (and plan)
        impl = backend.get_impl_cls()(32, 128, 128**-0.5, 8, window, cap)
        out = torch.zeros_like(case.query)
        impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), md, out)
        outs.append(out[: case.metadata.num_actual_tokens])
    return outs, md


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize(("window", "cap"), [(None, None), (512, None), (None, 30.0)])
def test_flashinfer_matches_torch(kind, window, cap):
    pytest.importorskip("flashinfer")
    case = make_case(_batch(kind), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=31)
    (ref,), _ = _run("torch", case, window, cap)
    outs, md = _run("flashinfer", case, window, cap, layers=2)
    assert len(md.planned) == 1, "layers with one signature must share one plan per step"
    for out in outs:
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("kind", "cache", "window"), [
    ("decode", "e4m3", None), ("decode", "e5m2", None), ("prefill", "e4m3", None), ("prefill", "e5m2", None),
    ("mixed", "e4m3", None), ("mixed", "e4m3", 512), ("decode", "e4m3", 512),
])  # fmt: skip
def test_flashinfer_fp8_cache_matches_torch(kind, cache, window):
    """An fp8 cache read at unit scale: the case's K/V are exact fp8 values, so bf16 tolerances hold."""
    pytest.importorskip("flashinfer")
    case = make_case(_batch(kind), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=33,
                     cache_dtype=FP8[cache])  # fmt: skip
    (ref,), _ = _run("torch", case, window, None)
    (out,), md = _run("flashinfer", case, window, None)
    assert [sig.kv_dtype for sig in md.planned] == [FP8[cache]]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_flashinfer_missing_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "flashinfer":
            raise ImportError("no flashinfer")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    backend = get_attn_backend("flashinfer", "cuda")
    with pytest.raises(ImportError, match=r"flashinfer-python"):
        backend.get_builder_cls()(16, "cuda")


@pytest.mark.parametrize("requests", [[(0, 7), (13, 5), (20, 1), (5, 1)], [(17, 1), (3, 1), (40, 1)]])
@pytest.mark.parametrize(("window", "cap"), [(None, None), (6, 3.0)])
def test_flashinfer_glue_with_fake_module(monkeypatch, requests, window, cap):
    """CPU check of the CSR page table, window_left = W - 1, and one plan per layer signature per step."""
    from treadle_kernels.attention import flashinfer_backend as fb

    monkeypatch.setattr(fb, "_import_flashinfer", fake_flashinfer)
    monkeypatch.setattr(fb, "_WORKSPACE_BYTES", 16)
    FakeWrapper.plans = 0
    case = make_case(requests, 4, 2, 16, 4, dtype=torch.bfloat16, seed=41, num_padding=2)
    n = case.metadata.num_actual_tokens
    builder = fb.FlashInferMetadataBuilder(4, "cpu")
    md = builder.build(case.metadata)
    torch_impl = get_attn_backend("torch", "cpu").get_impl_cls()(4, 16, 0.25, 2, window, cap)
    ref = torch_impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), case.metadata,
                             torch.zeros_like(case.query))[:n]  # fmt: skip
    for _ in range(2):  # two layers of one signature
        impl = fb.FlashInferAttentionImpl(4, 16, 0.25, 2, window, cap)
        out = impl.forward(
            case.query, case.key, case.value, case.kv_cache.clone(), md, torch.zeros_like(case.query)
        )
        torch.testing.assert_close(out[:n].float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert FakeWrapper.plans == 1
    with pytest.raises(ValueError, match="float16/bfloat16"):
        fb.FlashInferAttentionImpl(4, 16, 0.3, 2).forward(
            case.query.float(),
            case.key.float(),
            case.value.float(),
            case.kv_cache.float(),
            md,
            case.query.float(),
        )
