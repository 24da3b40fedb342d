"""Attention sinks (gpt-oss) in every path of the Triton backend, against the torch backend with the same sinks.

Paths: the unified kernel (prefill, chunked prefill on cached blocks, decodes, a mixed batch's double launch), its
split-KV launch (the sink folded once, by the reduction), the fused rotary + cache-write decode kernel without and
with splits (folded once, by the merging split), sliding windows, soft-cap, GQA, head_dim 64; XQA is not called
for a layer with sinks. CPU: Triton's interpreter at tiny sizes, with an H100's launch shapes where noted. GPU
(``-m gpu``): gpt-oss's heads (64 query / 8 KV heads, head_dim 64, window 128) in bf16, also replayed from a
CUDA graph whose sinks are rewritten in place after the capture.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import Case, make_case
from test_attention_triton_decode import make_rope

from treadle_kernels.attention import get_attn_backend, xqa
from treadle_kernels.attention.backend import Rope
from treadle_kernels.attention.triton_backend import TritonAttentionImpl
from treadle_kernels.attention.triton_launch import H100_PROFILE

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
MIXED = [(0, 9), (13, 5), (20, 1), (5, 1), (0, 1), (29, 3)]  # prefill, chunked prefill, decodes
DECODES = [(17, 1), (0, 1), (40, 1), (63, 1), (64, 1), (3, 1)]  # context 0: the new token alone
H100_MIXED = [(0, 13), (40, 1), (0, 6), (50, 30), (3, 1), (100, 1)]  # 16-row and split 64-row launches


def make_sinks(nh: int, dtype: torch.dtype, seed: int, mean: float = 0.5) -> torch.Tensor:
    """Sink logits spread around ``mean``: some heads give the sink most of the weight, others little (the
    scores' exponentials sum to about ``keys * e^0.5``: tiny cases use 0.5, long contexts ``log(keys)``)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(nh, generator=gen) * 2.0 + mean).to(dtype=dtype, device=DEVICE)


def run(name: str, case: Case, nh: int, nkv: int, d: int, sinks: torch.Tensor | None, window: int | None = None,
        cap: float | None = None, splits: int | None = None, h100: bool = False,
        rope: Rope | None = None) -> torch.Tensor:  # fmt: skip
    """One backend's output; with ``rope``, through ``forward_rope`` (the Triton backend's fused decode kernel)."""
    backend = get_attn_backend(name, case.query.device)
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], case.query.device)
    impl = backend.get_impl_cls()(nh, d, d**-0.5, nkv, window, cap, sinks=sinks)
    if isinstance(impl, TritonAttentionImpl):
        impl.force_num_splits = splits
        impl.device_profile = H100_PROFILE if h100 else None
        impl.fused_decode_max_programs = 1 << 30  # the fused kernel at every decode batch here
    q, k, v = case.query.clone(), case.key.clone(), case.value.clone()
    out = torch.zeros_like(q)
    md = builder.build(case.metadata)
    if rope is None:
        impl.forward(q, k, v, case.kv_cache.clone(), md, out)
    else:
        impl.forward_rope(rope, q, k, v, case.kv_cache.clone(), md, out)
    return out[: case.metadata.num_actual_tokens]


def compare(case: Case, nh: int, nkv: int, d: int, dtype: torch.dtype, sinks: torch.Tensor, scale: float = 1.0,
            **kw) -> None:  # fmt: skip
    """Triton against torch, both with ``sinks``; ``scale``: the values' scale (``_loud``), which the absolute
    tolerance follows. The torch outputs without sinks must fail the same comparison (the test can see them)."""
    out = run("triton", case, nh, nkv, d, sinks, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("window", "cap", "rope")}
    ref = run("torch", case, nh, nkv, d, sinks, **ref_kw).float()
    atol, rtol = TOL[dtype] * scale, TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    no_sinks = run("torch", case, nh, nkv, d, None, **ref_kw).float()
    assert not torch.allclose(no_sinks, ref, atol=atol, rtol=rtol), "the sinks should change these outputs"


@pytest.mark.parametrize(
    ("window", "cap"), [(None, None), (7, None), (None, 4.0)], ids=["full", "window", "cap"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unified_mixed_batch(window, cap, dtype):
    case = make_case(MIXED, 4, 2, 16, 4, dtype=dtype, device=DEVICE, seed=61, num_padding=2)
    compare(case, 4, 2, 16, dtype, make_sinks(4, dtype, 1), window=window, cap=cap)


def test_unified_head_dim_64_group_8():
    """gpt-oss's head_dim and GQA ratio (8 query heads per KV head), with its kind of window."""
    case = make_case(MIXED, 8, 1, 64, 8, device=DEVICE, seed=62, num_padding=1)
    compare(case, 8, 1, 64, torch.float32, make_sinks(8, torch.float32, 2), window=10)


@pytest.mark.parametrize("window", [None, 9])
def test_unified_split_kv_decode(window):
    """Forced split-KV: the sink joins in the reduction, once (per split it would be counted 4 times)."""
    case = make_case([(17, 1), (3, 1), (40, 1), (0, 1)], 4, 2, 16, 4, device=DEVICE, seed=63)
    compare(case, 4, 2, 16, torch.float32, make_sinks(4, torch.float32, 3), window=window, splits=4)


@pytest.mark.parametrize("batch", ["mixed", "decodes"])
def test_h100_launches(batch):
    """An H100's launches under the interpreter: 16 splits (empty ones for short contexts), and a mixed batch's
    double launch (short queries in 16-row tiles, the rest split and reduced for their rows only)."""
    reqs = H100_MIXED if batch == "mixed" else [(0, 1), (63, 1), (200, 1), (1100, 1)]
    case = make_case(reqs, 2, 1, 16, 16, device=DEVICE, seed=64, num_padding=2)
    compare(case, 2, 1, 16, torch.float32, make_sinks(2, torch.float32, 4), window=70, h100=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_decode(splits, dtype):
    """The fused rotary + cache-write decode kernel: sinks folded by the program, or by the merging split."""
    case = make_case(DECODES, 4, 2, 32, 16, dtype=dtype, device=DEVICE, seed=65, num_padding=2)
    rope = make_rope(case, 32)
    compare(case, 4, 2, 32, dtype, make_sinks(4, dtype, 5), splits=splits, rope=rope)


@pytest.mark.parametrize("window", [5, 70])
def test_fused_decode_h100_splits_window(window):
    case = make_case([(0, 1), (20, 1), (100, 1), (1100, 1)], 4, 1, 64, 16, device=DEVICE, seed=66)
    compare(case, 4, 1, 64, torch.float32, make_sinks(4, torch.float32, 6), window=window, h100=True,
            rope=make_rope(case, 64))  # fmt: skip


def test_fused_kernel_is_taken_with_sinks(monkeypatch: pytest.MonkeyPatch):
    from treadle_kernels.attention import triton_backend

    calls: list[int] = []
    fused = triton_backend.fused_decode_attention
    monkeypatch.setattr(
        triton_backend, "fused_decode_attention", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    case = make_case(DECODES, 4, 2, 32, 16, device=DEVICE, seed=67)
    run("triton", case, 4, 2, 32, make_sinks(4, torch.float32, 7), rope=make_rope(case, 32))
    assert calls, "the fused decode kernel did not serve a decode batch with sinks"


def test_xqa_is_skipped_for_a_layer_with_sinks(monkeypatch: pytest.MonkeyPatch):
    """XQA is called without sinks: where it would apply, a layer with sinks stays on the Triton kernel."""
    monkeypatch.setattr(xqa, "applies", lambda *a: True)

    def no_xqa(*args, **kwargs):
        raise AssertionError("XQA ran for a layer with attention sinks")

    monkeypatch.setattr(xqa, "decode", no_xqa)
    case = make_case(DECODES, 4, 2, 32, 16, device=DEVICE, seed=68)
    backend = get_attn_backend("triton", DEVICE)
    builder = backend.get_builder_cls()(16, DEVICE)
    md = builder.build(case.metadata)
    md.xqa_workspace = torch.zeros(1, device=DEVICE)
    impl = backend.get_impl_cls()(4, 32, 32**-0.5, 2, sinks=make_sinks(4, torch.float32, 8))
    out = torch.zeros_like(case.query)
    impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), md, out)
    ref = run("torch", case, 4, 2, 32, impl.sinks)
    torch.testing.assert_close(out[: case.metadata.num_actual_tokens], ref, atol=2e-5, rtol=2e-5)


def test_flashinfer_refuses_sinks():
    from treadle_kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    impl_cls = FlashInferAttentionBackend.get_impl_cls()
    with pytest.raises(ValueError, match=r"'flashinfer' does not support attention sinks.*triton or torch"):
        impl_cls(4, 32, 32**-0.5, 2, sinks=torch.zeros(4))
    impl_cls(4, 32, 32**-0.5, 2)  # without sinks, as before
    assert not FlashInferAttentionBackend.supports_sinks
    assert (
        get_attn_backend("triton", DEVICE).supports_sinks and get_attn_backend("torch", "cpu").supports_sinks
    )


# ---------------------------------------------------------------------------------------------------- GPU
GPT_OSS = (64, 8, 64)  # query heads, KV heads, head_dim
SINK_MEAN = 7.0  # about log(keys) at these contexts: the sinks take a share the tolerance cannot hide


LOUD = 8.0  # the GPU cases' value scale


def _loud(case: Case) -> Case:
    """Values x8 (exact in bf16), and the absolute tolerance with them (``compare(scale=LOUD)``): a long
    context's output (a weighted average of ~1k random values) would otherwise be about as small as the bf16
    tolerance, and a missing sink would pass unseen."""
    case.value.mul_(LOUD)
    case.kv_cache[1].mul_(LOUD)
    return case


def _gpu_batch(kind: str, seed: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "decode":
        return [(int(c), 1) for c in torch.randint(1, 4096, (48,), generator=gen)]
    if kind == "prefill":
        return [(0, 1500), (0, 700), (0, 33)]
    return [
        (0, 900),
        (2000, 512),
        (100, 17),
        *[(int(c), 1) for c in torch.randint(1, 4000, (40,), generator=gen)],
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_gpt_oss_heads(kind, window):
    nh, nkv, d = GPT_OSS
    case = _loud(
        make_case(_gpu_batch(kind, 71), nh, nkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=71)
    )
    sinks = make_sinks(nh, torch.bfloat16, 11, SINK_MEAN)
    compare(case, nh, nkv, d, torch.bfloat16, scale=LOUD, sinks=sinks, window=window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4, 64])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_split_kv_decode(batch, window):
    """The device's own split count (16 at batch 1 and 4 on an H200) and a forced one, through the reduction."""
    nh, nkv, d = GPT_OSS
    reqs = [(4000 - 7 * i, 1) for i in range(batch)]
    case = _loud(make_case(reqs, nh, nkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=72))
    sinks = make_sinks(nh, torch.bfloat16, 12, SINK_MEAN)
    compare(case, nh, nkv, d, torch.bfloat16, scale=LOUD, sinks=sinks, window=window)
    compare(case, nh, nkv, d, torch.bfloat16, scale=LOUD, sinks=sinks, window=window, splits=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_fused_decode(batch, window):
    """The fused rotary + cache-write decode kernel (batch x 8 KV heads <= 32 programs): its own splits and 1."""
    nh, nkv, d = GPT_OSS
    gen = torch.Generator().manual_seed(batch)
    reqs = [(int(c), 1) for c in torch.randint(0, 4000, (batch,), generator=gen)]
    case = _loud(make_case(reqs, nh, nkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=73, num_padding=3))
    rope, sinks = make_rope(case, d), make_sinks(nh, torch.bfloat16, 13, SINK_MEAN)
    compare(case, nh, nkv, d, torch.bfloat16, scale=LOUD, sinks=sinks, window=window, rope=rope)
    compare(case, nh, nkv, d, torch.bfloat16, scale=LOUD, sinks=sinks, window=window, rope=rope, splits=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("path", "batch"), [("fused", 4), ("unified", 8), ("unified", 48)])
def test_gpu_cuda_graph_decode_reads_sinks_in_place(path, batch):
    """A decode step captured in a CUDA graph (fused kernel with in-kernel merge; unified kernel split and
    reduced; unified unsplit), replayed after new sinks were copied into the tensor the impl holds: the replay
    uses the new sinks (the kernels read the model's tensor, no copy made at construction or capture)."""
    nh, nkv, d = GPT_OSS
    gen = torch.Generator().manual_seed(batch)
    reqs = [(int(c), 1) for c in torch.randint(1, 3000, (batch,), generator=gen)]
    case = _loud(make_case(reqs, nh, nkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=74))
    sinks = make_sinks(nh, torch.bfloat16, 14, SINK_MEAN)
    backend = get_attn_backend("triton", "cuda")
    impl = backend.get_impl_cls()(nh, d, d**-0.5, nkv, 128, None, sinks=sinks)
    md = backend.get_builder_cls()(16, "cuda").build(case.metadata)
    q, k, v, kv_cache = case.query.clone(), case.key.clone(), case.value.clone(), case.kv_cache.clone()
    out = torch.zeros_like(q)
    rope = make_rope(case, d) if path == "fused" else None

    def step() -> None:  # the fused kernel leaves q and k unrotated: the step can run again
        if rope is None:
            impl.forward(q, k, v, kv_cache, md, out)
        else:
            impl.forward_rope(rope, q, k, v, kv_cache, md, out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    fresh = make_sinks(nh, torch.bfloat16, 15, SINK_MEAN)
    sinks.copy_(fresh)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = run("torch", case, nh, nkv, d, fresh, window=128, rope=rope)
    stale = run(
        "torch", case, nh, nkv, d, make_sinks(nh, torch.bfloat16, 14, SINK_MEAN), window=128, rope=rope
    )
    assert not torch.allclose(stale.float(), ref.float(), atol=2e-2 * LOUD, rtol=2e-2), (
        "sinks too alike to tell"
    )
    torch.testing.assert_close(
        out[: case.metadata.num_actual_tokens].float(), ref.float(), atol=2e-2, rtol=2e-2
    )
