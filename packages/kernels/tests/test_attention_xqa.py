"""XQA decode (attention/xqa.py): when it serves a call, its glue and its fallback to Triton on CPU, through
stand-ins for ``flashinfer.decode`` (one computes the documented semantics in torch, one fails); the real kernel on a
GPU against the dense reference and an e4m3-rounding model, eager and replayed from a CUDA graph (skipped without
CUDA or flashinfer).

XQA reads whole pages past a request's seq_len and masks their scores; a NaN there would still reach the output
(0 x NaN), so the GPU cases hold zeros, not the NaN poison of ``make_case``, in the unused slots, as the runner's
caches do (zeroed at allocation on a GPU, then written with saturating casts)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from attention_cases import FP8, dense_reference, make_case

from treadle_kernels.attention import AttentionMetadata, get_attn_backend, xqa
from treadle_kernels.attention.backend import write_kv_cache

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fake_decode(calls: list[dict]) -> SimpleNamespace:
    """``xqa_batch_decode_with_kv_cache`` as FlashInfer documents it, in float64 torch."""

    def xqa_batch_decode_with_kv_cache(query, kv_cache, workspace, block_tables, seq_lens, max_seq_len, *,
                                       bmm1_scale, bmm2_scale, out, kv_layout, enable_pdl):  # fmt: skip
        calls.append({"query": query, "seq_lens": seq_lens, "max_seq_len": max_seq_len, "pdl": enable_pdl})
        assert kv_layout == "NHD" and query.is_contiguous() and out.is_contiguous()
        assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.uint32
        k_cache, v_cache = kv_cache  # [pages, page_size, nkv, d] each
        page = k_cache.shape[1]
        assert max_seq_len == block_tables.shape[1] * page
        group = query.shape[1] // k_cache.shape[2]
        for i, length in enumerate(seq_lens.view(torch.int32).tolist()):
            pos = torch.arange(length)
            slots = block_tables[i, pos // page].long() * page + pos % page
            k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # [L, nh, d]
            v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
            p = torch.softmax(torch.einsum("hd,khd->hk", query[i].double(), k) * bmm1_scale, -1)
            out[i] = (torch.einsum("hk,khd->hd", p, v) * bmm2_scale).to(out.dtype)
        return out

    return SimpleNamespace(xqa_batch_decode_with_kv_cache=xqa_batch_decode_with_kv_cache)


def _decodes(n: int, max_context: int, seed: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    return [(int(c), 1) for c in torch.randint(0, max_context, (n,), generator=gen)]


@pytest.mark.parametrize("raw", ["3", "yes", "-1"])
def test_mode_rejects_other_values(monkeypatch, raw):
    monkeypatch.setenv("TREADLE_ATTN_XQA", raw)
    with pytest.raises(ValueError, match="TREADLE_ATTN_XQA"):
        xqa.mode()


def test_no_workspace_off_or_on_cpu(monkeypatch):
    monkeypatch.delenv("TREADLE_ATTN_XQA", raising=False)
    assert xqa.mode() is None  # unset: wherever it applies and flashinfer is installed
    for raw in ("0", "2"):
        monkeypatch.setenv("TREADLE_ATTN_XQA", raw)
        assert xqa.new_workspace(torch.device("cpu")) is None
        builder = get_attn_backend("triton", "cpu").get_builder_cls()(16, "cpu")
        assert builder.xqa_workspace is None  # the interpreter never calls XQA


def test_serves_only_plain_decode_steps(monkeypatch):
    monkeypatch.setenv("TREADLE_ATTN_XQA", "2")
    ws = torch.zeros(1, dtype=torch.uint8)
    case = make_case(_decodes(6, 90, 1), 8, 2, 64, 16, dtype=torch.bfloat16)
    q, kv, md = case.query, case.kv_cache, case.metadata
    assert xqa.applies(q, kv, md, None, None, ws)
    assert not xqa.applies(q, kv, md, None, None, None)  # no workspace: off or not CUDA
    assert not xqa.applies(q, kv, md, 256, None, ws)  # sliding window
    assert not xqa.applies(q, kv, md, None, 30.0, ws)  # soft-cap
    assert not xqa.applies(q.float(), kv.float(), md, None, None, ws)  # fp32 activations
    assert not xqa.applies(q, kv, dataclasses.replace(md, causal=False), None, None, ws)
    padded = dataclasses.replace(md, num_actual_tokens=md.num_reqs + 2)  # tokens past the requests
    assert not xqa.applies(q, kv, padded, None, None, ws)
    mixed = make_case([(0, 40), *_decodes(3, 90, 2)], 8, 2, 64, 16, dtype=torch.bfloat16)
    assert not xqa.applies(mixed.query, mixed.kv_cache, mixed.metadata, None, None, ws)
    monkeypatch.setenv("TREADLE_ATTN_XQA", "1")  # fp8 caches only
    assert not xqa.applies(q, kv, md, None, None, ws)
    odd_pages = make_case(_decodes(2, 90, 3), 8, 2, 64, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("TREADLE_ATTN_XQA", "2")
    assert not xqa.applies(odd_pages.query, odd_pages.kv_cache, odd_pages.metadata, None, None, ws)


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (8, 8)])
def test_glue_passes_the_step_as_xqa_reads_it(monkeypatch, heads, kv_heads):
    """Strided query rows, shuffled pages, int32 seq_lens read as uint32, the cache's two NHD halves, the scale."""
    calls: list[dict] = []
    monkeypatch.setattr(xqa, "_flashinfer_decode", lambda: _fake_decode(calls))
    case = make_case(_decodes(5, 70, 4), heads, kv_heads, 64, 16, dtype=torch.bfloat16, seed=5)
    assert not case.query.is_contiguous()
    scale = 0.3
    write_kv_cache(case.key, case.value, case.kv_cache, case.metadata.slot_mapping)
    out = torch.full_like(case.query, float("nan")).contiguous()
    xqa.decode(case.query, case.kv_cache, case.metadata, out, scale, torch.zeros(8, dtype=torch.uint8))
    ref = dense_reference(case, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert len(calls) == 1 and calls[0]["pdl"] is False
    assert calls[0]["seq_lens"].view(torch.int32).tolist() == case.metadata.seq_lens_cpu.tolist()


def test_glue_writes_through_a_strided_output(monkeypatch):
    monkeypatch.setattr(xqa, "_flashinfer_decode", lambda: _fake_decode([]))
    case = make_case(_decodes(4, 50, 6), 4, 2, 64, 16, dtype=torch.bfloat16, seed=6)
    wide = torch.zeros(4, 2, 4, 64, dtype=torch.bfloat16)
    out = wide[:, 1]  # rows strided past the heads
    write_kv_cache(case.key, case.value, case.kv_cache, case.metadata.slot_mapping)
    xqa.decode(case.query, case.kv_cache, case.metadata, out, 0.125, torch.zeros(8, dtype=torch.uint8))
    torch.testing.assert_close(out.float(), dense_reference(case, 0.125).float(), atol=2e-2, rtol=2e-2)
    assert wide[:, 0].abs().sum() == 0


def _finite_tails(case):
    """Zero the unused cache slots ``make_case`` poisons with NaN (module docstring)."""
    kv = case.kv_cache
    bad = kv.float().isnan()
    (kv.view(torch.uint8) if kv.element_size() == 1 else kv)[bad] = 0
    return case


def _failing_flashinfer() -> SimpleNamespace:
    def xqa_batch_decode_with_kv_cache(*args, **kwargs):
        raise RuntimeError("nvcc: not found")

    return SimpleNamespace(xqa_batch_decode_with_kv_cache=xqa_batch_decode_with_kv_cache)


def test_unset_mode_falls_back_to_triton_when_xqa_fails(monkeypatch, caplog):
    """Unset, a failing XQA (no nvcc for FlashInfer's build) is logged and turned off; the step runs on Triton."""
    monkeypatch.delenv("TREADLE_ATTN_XQA")
    monkeypatch.setattr(xqa, "_failure", None)
    monkeypatch.setattr(xqa, "_flashinfer_decode", _failing_flashinfer)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # as on a Hopper GPU
    case = make_case(
        _decodes(5, 90, 13), 8, 2, 64, 16, dtype=torch.bfloat16, seed=14, cache_dtype=FP8["e4m3"]
    )
    backend = get_attn_backend("triton", "cpu")
    md = backend.get_builder_cls()(16, "cpu").build(case.metadata)
    md.xqa_workspace = torch.zeros(8, dtype=torch.uint8)  # as a GPU builder holds it
    assert xqa.applies(case.query, case.kv_cache, case.metadata, None, None, md.xqa_workspace)
    out = torch.zeros_like(case.query)
    backend.get_impl_cls()(8, 64, 0.125, 2).forward(case.query, case.key, case.value, case.kv_cache, md, out)
    torch.testing.assert_close(out.float(), dense_reference(case, 0.125).float(), atol=2e-2, rtol=2e-2)
    assert "nvcc: not found" in (xqa._failure or "") and "Triton kernel from now on" in caplog.text
    assert not xqa.applies(case.query, case.kv_cache, case.metadata, None, None, md.xqa_workspace)


def test_asked_for_xqa_fails_loudly(monkeypatch):
    monkeypatch.setenv("TREADLE_ATTN_XQA", "1")
    monkeypatch.setattr(xqa, "_failure", None)
    monkeypatch.setattr(xqa, "_flashinfer_decode", _failing_flashinfer)
    case = make_case(_decodes(2, 40, 15), 4, 2, 64, 16, dtype=torch.bfloat16, seed=16)
    with pytest.raises(RuntimeError, match="nvcc"):
        xqa.decode(
            case.query, case.kv_cache, case.metadata, torch.zeros_like(case.query), 0.125, torch.zeros(8)
        )
    assert xqa._failure is None


def _xqa_run(monkeypatch, case, mode: str, num_heads: int, num_kv_heads: int):
    """The triton backend's forward with XQA on; asserts XQA served it."""
    monkeypatch.setenv("TREADLE_ATTN_XQA", mode)
    served = []
    real = xqa.decode
    monkeypatch.setattr(xqa, "decode", lambda *a: served.append(1) or real(*a))
    backend = get_attn_backend("triton", "cuda")
    builder = backend.get_builder_cls()(16, "cuda")
    impl = backend.get_impl_cls()(num_heads, 128, 128**-0.5, num_kv_heads)
    out = torch.zeros_like(case.query)
    impl.forward(case.query, case.key, case.value, case.kv_cache, builder.build(case.metadata), out)
    assert served, "XQA did not serve the decode step"
    return out, builder, impl


def _triton_run(case, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The unified Triton kernel on the same case (with ``TREADLE_ATTN_XQA=0``; the case's new K/V are written
    again, unchanged)."""
    backend = get_attn_backend("triton", "cuda")
    impl = backend.get_impl_cls()(num_heads, 128, 128**-0.5, num_kv_heads)
    out = torch.zeros_like(case.query)
    md = backend.get_builder_cls()(16, "cuda").build(case.metadata)
    return impl.forward(case.query, case.key, case.value, case.kv_cache, md, out)


def _e4m3_model(case, scale: float) -> torch.Tensor:
    """Attention as XQA's fp8 kernel rounds it, in float64: the query and the unnormalised softmax weights
    ``exp(s - max)`` rounded to e4m3 before their products, the row sum taken before the rounding."""
    md, outs = case.metadata, []
    starts = md.query_start_loc_cpu.tolist()
    for i, (k, v) in enumerate(zip(case.full_keys, case.full_values, strict=True)):
        q = case.query[starts[i] : starts[i + 1]].double().cpu()
        group = q.shape[1] // k.shape[1]
        k, v = (t.double().cpu().repeat_interleave(group, dim=1) for t in (k, v))
        s = torch.einsum("qhd,khd->hqk", q.to(torch.float8_e4m3fn).double(), k) * scale
        p = torch.exp(s - s.amax(-1, keepdim=True))
        o = torch.einsum("hqk,khd->qhd", p.to(torch.float8_e4m3fn).double(), v)
        outs.append(o / p.sum(-1).transpose(0, 1)[..., None])
    return torch.cat(outs)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative error of the whole output and of its worst (token, head) row."""
    d, r = out.double().cpu() - ref.double().cpu(), ref.double().cpu()
    return float(d.norm() / r.norm()), float((d.norm(dim=-1) / r.norm(dim=-1)).max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("requests", ["b1", "b64"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (16, 8)])  # Llama-3.1-8B / Qwen3-0.6B groups
@pytest.mark.parametrize("sharpness", [1.0, 4.0])  # query scale: scores of std 1 / 4 (peaked attention)
def test_xqa_fp8_error_is_its_e4m3_rounding(monkeypatch, requests, heads, kv_heads, sharpness):
    """The fp8 kernel rounds the query and the softmax weights to e4m3 (3 mantissa bits; the cache's K/V are
    exact e4m3 values): its error against the exact reference is what that rounding predicts (``_e4m3_model``;
    session 12's first run: 3.6 / 3.0 % at scores of std 1, 5.8-6.9 % at std 4, within 0.3 % of the model's),
    never a wrong page or scale (errors of order 1). The unified Triton kernel's error is printed beside it."""
    pytest.importorskip("flashinfer")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("XQA's fp8 kernel is Hopper's")
    batch = [(3000, 1)] if requests == "b1" else _decodes(64, 4000, 7)  # b1: XQA splits the keys
    case = _finite_tails(make_case(batch, heads, kv_heads, 128, 16, dtype=torch.bfloat16, device="cuda", seed=8,
                                   cache_dtype=FP8["e4m3"]))  # fmt: skip
    case.query.mul_(sharpness)
    monkeypatch.setenv("TREADLE_ATTN_XQA", "0")
    triton = _triton_run(case, heads, kv_heads)
    out, _, _ = _xqa_run(monkeypatch, case, "1", heads, kv_heads)
    ref = dense_reference(case, 128**-0.5)
    (err, row), (model, model_row) = _errors(out, ref), _errors(_e4m3_model(case, 128**-0.5), ref)
    print(f"xqa fp8 {requests} {heads}/{kv_heads} x{sharpness}: relative error {err:.4f} (worst row {row:.4f}); "
          f"e4m3 model {model:.4f} ({model_row:.4f}); triton {_errors(triton, ref)[0]:.4f}")  # fmt: skip
    assert err <= 1.25 * model + 0.005 and row <= 1.5 * model_row + 0.02


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("requests", ["b1", "b64"])
def test_xqa_bf16_cache_matches_reference(monkeypatch, requests):
    pytest.importorskip("flashinfer")
    batch = [(3000, 1)] if requests == "b1" else _decodes(64, 4000, 9)
    case = _finite_tails(make_case(batch, 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=10))
    out, _, _ = _xqa_run(monkeypatch, case, "2", 32, 8)
    ref = dense_reference(case, 128**-0.5).to(out.device)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache", ["e4m3", "bf16"])
def test_xqa_graph_replay_equals_eager(monkeypatch, cache):
    """Captured as the runner does (one-token requests of context 1 on the null block), replayed on a real step
    written into the same buffers: the same output as an eager call on that step."""
    pytest.importorskip("flashinfer")
    if cache == "e4m3" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("XQA's fp8 kernel is Hopper's")
    n = 24
    case = _finite_tails(make_case(_decodes(n, 2500, 11), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda",
                                   seed=12, cache_dtype=FP8.get(cache)))  # fmt: skip
    eager, builder, impl = _xqa_run(monkeypatch, case, "2", 32, 8)
    width = case.metadata.block_table.shape[1] + 5
    qsl = torch.arange(n + 1, dtype=torch.int32)
    static = AttentionMetadata(
        num_actual_tokens=n, max_query_len=1, max_seq_len=1, query_start_loc=qsl.cuda(), query_start_loc_cpu=qsl,
        seq_lens=torch.ones(n, dtype=torch.int32, device="cuda"), seq_lens_cpu=torch.ones(n, dtype=torch.int32),
        block_table=torch.zeros(n, width, dtype=torch.int32, device="cuda"),
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device="cuda"),
    )  # fmt: skip
    q, k, v = (torch.zeros_like(t).contiguous() for t in (case.query, case.key, case.value))
    out = torch.zeros_like(q)
    md = builder.build_for_cuda_graph(static, n)
    impl.forward(q, k, v, case.kv_cache, md, out)  # warm-up
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        impl.forward(q, k, v, case.kv_cache, md, out)
    torch.cuda.current_stream().wait_stream(stream)
    q.copy_(case.query)
    static.seq_lens.copy_(case.metadata.seq_lens)
    static.block_table[:, : width - 5].copy_(case.metadata.block_table)
    graph.replay()
    torch.cuda.synchronize()
    diff = float((out.float() - eager.float()).abs().max())
    print(f"xqa {cache} graph replay against eager: max abs difference {diff}")
    assert diff <= 1e-2
