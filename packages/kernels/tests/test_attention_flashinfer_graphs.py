"""FlashInfer decode under CUDA graphs: the CSR page table (CPU), the graph-mode glue through a stand-in for the
flashinfer module (CPU), and real graph-mode wrappers captured in CUDA graphs against the torch reference (GPU).

Each test captures like the runner does: a dummy batch of one-token requests of context 1 (slot -1: nothing
written) is built with ``build_for_cuda_graph``, run once (which creates and plans the size's wrapper), and
captured; a replay rewrites the static inputs, calls ``prepare_cuda_graph_replay`` with the step's metadata and
replays. Sizes are captured largest first and replayed interleaved, so the shared page-table buffers are reused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attention_cases import Case, make_case
from flashinfer_fake import FakeWrapper, fake_flashinfer

from treadle_kernels.attention import AttentionMetadata, get_attn_backend
from treadle_kernels.attention.flashinfer_plan import LayerSignature, build_page_table

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _dummy_decode(num_reqs: int, max_blocks: int, device: str) -> AttentionMetadata:
    """What the runner captures: ``num_reqs`` one-token requests of context 1 on block 0, writing nowhere."""
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32)
    seq_lens = torch.ones(num_reqs, dtype=torch.int32)
    return AttentionMetadata(
        num_actual_tokens=num_reqs,
        max_query_len=1,
        max_seq_len=1,
        query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        block_table=torch.zeros(num_reqs, max_blocks, dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_reqs,), -1, dtype=torch.int64, device=device),
    )


def _reference(case: Case, num_heads: int, head_size: int, num_kv_heads: int, window, cap) -> torch.Tensor:
    device = case.query.device
    backend = get_attn_backend("torch", device)
    md = backend.get_builder_cls()(case.kv_cache.shape[2], device).build(case.metadata)
    impl = backend.get_impl_cls()(num_heads, head_size, head_size**-0.5, num_kv_heads, window, cap)
    out = torch.zeros_like(case.query)
    return impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), md, out)


def _graph_wrapper(builder, size: int):
    (wrapper,) = builder.graph_wrappers.for_size(size).values()  # one layer signature
    return wrapper


def test_page_table_lists_each_requests_blocks() -> None:
    """indices = block_table[i, :pages[i]] request after request, gathered without a mask; blocks may repeat."""
    block_size = 4
    seq_lens = torch.tensor([1, 4, 5, 13, 1], dtype=torch.int32)  # the last: a padding request of context 1
    table = torch.randint(0, 50, (5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    table[3, 0] = table[1, 0]  # a shared prefix block lists in two requests
    qsl = torch.arange(6, dtype=torch.int32)
    md = AttentionMetadata(5, 1, 13, qsl, qsl, seq_lens, seq_lens, table, torch.full((5,), -1))
    pages = build_page_table(md, block_size)
    expected = torch.cat([table[i, : -(-int(s) // block_size)] for i, s in enumerate(seq_lens)])
    assert pages.indices.dtype == torch.int32 and pages.indices.tolist() == expected.tolist()
    assert pages.indptr.tolist() == [0, 1, 2, 4, 8, 9]
    assert pages.last_page_len.tolist() == [1, 4, 1, 1, 1]


def test_decode_tensor_cores_for_groups_above_four(monkeypatch) -> None:
    monkeypatch.delenv("TREADLE_FLASHINFER_DECODE_TENSOR_CORES", raising=False)

    def uses(num_heads: int, num_kv_heads: int, kv_dtype: torch.dtype = torch.bfloat16) -> bool:
        sig = LayerSignature(num_heads, num_kv_heads, 128, 0.1, None, None, torch.bfloat16, kv_dtype)
        return sig.decode_uses_tensor_cores

    assert [uses(32, kv) for kv in (32, 16, 8)] == [False, False, False]  # groups 1, 2, 4 (Llama-3.1-8B: 4)
    assert [uses(h, 4) for h in (20, 24, 28, 32, 64)] == [True] * 5  # groups 5, 6, 7, 8, 16
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):  # an fp8 cache: tensor cores at every group size
        assert [uses(32, kv, fp8) for kv in (32, 8, 4)] == [True] * 3
    for forced in ("0", "1"):  # the measurement knob
        monkeypatch.setenv("TREADLE_FLASHINFER_DECODE_TENSOR_CORES", forced)
        assert {uses(32, 8), uses(32, 4)} == {forced == "1"}


@pytest.mark.parametrize("sizes", [(8, 3), (3, 8)])  # the runner's order (largest first), and the other one
def test_graph_glue_replans_the_buffers_the_capture_reads(monkeypatch, sizes):
    from treadle_kernels.attention import flashinfer_backend as fb

    monkeypatch.setattr(fb, "_import_flashinfer", fake_flashinfer)
    monkeypatch.setattr(fb, "_WORKSPACE_BYTES", 16)
    FakeWrapper.plans = 0
    builder = fb.FlashInferMetadataBuilder(4, "cpu")
    impl = fb.FlashInferAttentionImpl(4, 16, 0.25, 2, sliding_window=6)
    captured = {}
    for size in sizes:
        md = builder.build_for_cuda_graph(_dummy_decode(size, 16, "cpu"), size)
        q, kv = (
            torch.zeros(size, 4, 16, dtype=torch.bfloat16),
            torch.zeros(2, 4, 4, 2, 16, dtype=torch.bfloat16),
        )
        impl.forward(
            q, q[:, :2], q[:, :2], kv, md, torch.zeros_like(q)
        )  # the warm-up run plans; capture reuses
        captured[size] = md
    assert FakeWrapper.plans == len(sizes)
    wrappers = {size: _graph_wrapper(builder, size) for size in sizes}
    assert all(w.use_cuda_graph and not w.use_tensor_cores for w in wrappers.values())
    shared = wrappers[8].indices_buf.data_ptr() == wrappers[3].indices_buf.data_ptr()
    assert shared == (sizes[0] > sizes[1]), (
        "smaller sizes share the largest size's buffers; larger get new ones"
    )

    gen = torch.Generator().manual_seed(3)
    for step, size in enumerate([3, 8, 3, 8, 3]):
        contexts = torch.randint(0, 40, (size,), generator=gen).tolist()
        case = make_case([(c, 1) for c in contexts], 4, 2, 16, 4, dtype=torch.bfloat16, seed=step)
        ref = _reference(case, 4, 16, 2, 6, None)
        plans = FakeWrapper.plans
        builder.prepare_cuda_graph_replay(case.metadata, size)
        assert FakeWrapper.plans == plans + 1, "one plan per signature of that size, before the replay"
        replay = dataclasses.replace(
            captured[size], common=case.metadata
        )  # the captured wrappers, as planned
        out = impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), replay,
                           torch.zeros_like(case.query))  # fmt: skip
        assert FakeWrapper.plans == plans + 1, "a replay never plans"
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


class _CapturedDecode:
    """One decode batch size captured in a CUDA graph through the flashinfer backend, with static inputs."""

    def __init__(self, builder, impl, size: int, max_blocks: int, num_blocks: int, cache_dtype=None) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device="cuda")

        nh, nkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
        self.size, self.builder = size, builder
        self.q, self.out = zeros(size, nh, d), zeros(size, nh, d)
        self.k, self.v = zeros(size, nkv, d), zeros(size, nkv, d)
        self.kv_cache = zeros(2, num_blocks, builder.block_size, nkv, d, dtype=cache_dtype or torch.bfloat16)
        self.md = builder.build_for_cuda_graph(_dummy_decode(size, max_blocks, "cuda"), size)
        impl.forward(
            self.q, self.k, self.v, self.kv_cache, self.md, self.out
        )  # creates and plans the wrapper
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            impl.forward(self.q, self.k, self.v, self.kv_cache, self.md, self.out)

    def replay(self, case: Case) -> torch.Tensor:
        self.kv_cache[:, : case.kv_cache.shape[1]].copy_(case.kv_cache)
        for static, value in ((self.q, case.query), (self.k, case.key), (self.v, case.value)):
            static.copy_(value)
        self.md.common.slot_mapping.copy_(case.metadata.slot_mapping)
        self.builder.prepare_cuda_graph_replay(case.metadata, self.size)
        self.graph.replay()
        return self.out.clone()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_kv_heads", [8, 4])  # group 4: CUDA cores for bf16; group 8: tensor cores
@pytest.mark.parametrize(("window", "cap", "cache_dtype"), [
    (None, None, None), (512, None, None), (None, 30.0, None), (None, None, torch.float8_e4m3fn),
])  # fmt: skip
def test_graph_mode_decode_matches_torch(num_kv_heads, window, cap, cache_dtype):
    pytest.importorskip("flashinfer")
    num_heads, head_size, block_size, max_blocks = 32, 128, 16, 256  # up to 4096 tokens a request
    backend = get_attn_backend("flashinfer", "cuda")
    builder = backend.get_builder_cls()(block_size, "cuda")
    impl = backend.get_impl_cls()(num_heads, head_size, head_size**-0.5, num_kv_heads, window, cap)
    graphs = {size: _CapturedDecode(builder, impl, size, max_blocks, 8 * max_blocks + 3, cache_dtype)
              for size in (8, 3)}  # fmt: skip
    for size in graphs:
        wrapper = _graph_wrapper(builder, size)
        tensor_cores = num_heads // num_kv_heads > 4 or cache_dtype is not None
        assert wrapper.is_cuda_graph_enabled and wrapper.use_tensor_cores == tensor_cores

    gen = torch.Generator().manual_seed(11)
    context_ranges = [(0, 30), (500, 3000), (0, 3000)]  # short, long (split KV), mixed
    for step, size in enumerate([8, 3, 8, 3, 8, 3]):
        low, high = context_ranges[step % len(context_ranges)]
        contexts = torch.randint(low, high, (size,), generator=gen).tolist()
        case = make_case([(c, 1) for c in contexts], num_heads, num_kv_heads, head_size, block_size,
                         dtype=torch.bfloat16, device="cuda", seed=step, cache_dtype=cache_dtype)  # fmt: skip
        ref = _reference(case, num_heads, head_size, num_kv_heads, window, cap)
        out = graphs[size].replay(case)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
