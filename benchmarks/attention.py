"""Paged-attention microbenchmark: triton vs flashinfer vs torch on Llama-3.1-8B head shapes (GPU, bf16).

One attention layer (32 query heads, 8 KV heads, head_dim 128, block 16, shuffled physical blocks), timed with
CUDA events around ``impl.forward`` (the KV write of the step's new tokens included; FlashInfer's per-step plan
excluded, as it is paid once per step for all layers), replayed from a CUDA graph when the forward can be captured
(so launch overhead is not counted, as in the engine's decode graphs), else eagerly (``mode`` says which).
Workloads: decode at batch 1 / 64 / 256 x context 1k / 4k, prefills (4 x 2048 tokens; an 8192-token chunk on
8192 cached) and a mixed batch.
Reports achieved GB/s of KV read (``sum(seq_len) * nkv * head_dim * 2 (K, V) * bytes per value``) against the
device's own copy bandwidth measured in the same run, and TFLOP/s for prefill. The torch reference runs only where it
finishes quickly. ``--kv-cache-dtype fp8`` (or fp8_e5m2) fills an 8-bit cache (unit scale, as the engine's).

    python benchmarks/attention.py results.json [--backends triton,flashinfer,torch,triton+rope,triton+rope_fused,
        triton+rope_unfused,triton+rope/s4,triton+xqa]      (/sN: N KV splits forced, batch-1 decode rows only)
        [--kv-cache-dtype fp8] [--workloads "b256,prefill"] (rows whose label holds one of the words)

Needs only torch, triton and (optionally) flashinfer-python; the treadle packages are imported from the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages/ir/src"), str(ROOT / "packages/kernels/src")]

from treadle_kernels.attention import AttentionMetadata, get_attn_backend  # noqa: E402
from treadle_kernels.attention.backend import Rope  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
CACHE_DTYPES = {"auto": DTYPE, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}  # fmt: skip


def make_step(requests: list[tuple[int, int]], seed: int = 0, cache_dtype: torch.dtype = DTYPE):
    """Random q/k/v and a filled paged cache for (context_len, query_len) requests; returns tensors + metadata."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [c + q for c, q in requests]
    blocks = [(s + BLOCK_SIZE - 1) // BLOCK_SIZE for s in seq_lens]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(len(requests), max(blocks), dtype=torch.int32, device="cuda")
    starts = [0]
    for nb in blocks:
        starts.append(starts[-1] + nb)
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[starts[i] : starts[i + 1]]
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE,
                           generator=gen).to(cache_dtype)  # fmt: skip
    q_lens = torch.tensor([q for _, q in requests], dtype=torch.int32)
    qsl = torch.zeros(len(requests) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    num_tokens = int(qsl[-1])
    slots = []
    for i, (c, q) in enumerate(requests):
        pos = torch.arange(c, c + q, device="cuda")
        slots.append(table[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=num_tokens, max_query_len=int(q_lens.max()), max_seq_len=max(seq_lens),
        query_start_loc=qsl.cuda(), query_start_loc_cpu=qsl, seq_lens=sl.cuda(), seq_lens_cpu=sl,
        block_table=table, slot_mapping=torch.cat(slots),
    )  # fmt: skip
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn_like(k)
    return q, k, v, kv_cache, md


def rope_for(md: AttentionMetadata, num_tokens: int) -> Rope:
    """A rotary table and each token's position (decode: seq_len - 1), for the ``+rope`` variants."""
    angles = torch.rand(md.max_seq_len + 1, HEAD_DIM // 2, device="cuda") * 6.3
    table = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DTYPE)
    if md.max_query_len == 1:
        positions = md.seq_lens.long() - 1
    else:
        qsl, seq = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        positions = torch.cat([torch.arange(s - (qsl[i + 1] - qsl[i]), s) for i, s in enumerate(seq)])
    return Rope(positions[:num_tokens].cuda(), table, True)


def time_backend(name: str, step, iters: int) -> tuple[float, str]:
    """Mean milliseconds of one layer's forward, replayed from a CUDA graph when it can be captured.

    ``NAME+rope``: the layer hands q and k unrotated with their rotary table (``forward_rope``): for the triton
    backend, small decode batches take the fused decode kernel (the engine's policy); ``NAME+rope_fused`` takes it
    at every batch size; ``NAME+rope_unfused`` runs the rotary op first; ``triton+xqa``: decode steps take
    FlashInfer's XQA kernel (``TREADLE_ATTN_XQA=2``, attention/xqa.py). A ``/sN`` suffix forces N KV splits
    (triton; decode)."""
    q, k, v, kv_cache, md = step
    name, _, splits = name.partition("/s")
    name, _, variant = name.partition("+")
    os.environ["TREADLE_FUSED_DECODE_ATTENTION"] = "0" if variant == "rope_unfused" else "1"
    os.environ["TREADLE_ATTN_XQA"] = "2" if variant == "xqa" else "0"  # read when the builder is made
    rope = rope_for(md, q.shape[0]) if variant.startswith("rope") else None
    backend = get_attn_backend(name, "cuda")
    builder = backend.get_builder_cls()(BLOCK_SIZE, "cuda")
    impl = backend.get_impl_cls()(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS)
    if variant == "rope_fused":
        impl.fused_decode_max_programs = 1 << 30  # type: ignore[attr-defined]
    if splits:
        impl.force_num_splits = int(splits)  # type: ignore[attr-defined]
    decode_only = md.max_query_len == 1
    if decode_only and backend.supports_cuda_graphs:  # the engine's decode graphs use this metadata
        attn_md = builder.build_for_cuda_graph(md, md.num_reqs)
        builder.prepare_cuda_graph_replay(md, md.num_reqs)
    else:
        attn_md = builder.build(md)
    out = torch.empty_like(q)

    def forward() -> None:
        if rope is None:
            impl.forward(q, k, v, kv_cache, attn_md, out)
        else:
            impl.forward_rope(rope, q, k, v, kv_cache, attn_md, out)

    return time_forward(forward, iters)


def time_forward(forward: Callable[[], None], iters: int, graphs: bool = True) -> tuple[float, str]:
    """Mean milliseconds of ``forward`` after three warm-up calls, and the mode: replayed from a CUDA graph when
    ``graphs`` and it can be captured, else eagerly (host syncs or CPU work inside it)."""
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    run, mode = forward, "eager"
    try:
        if graphs:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
            run, mode = graph.replay, "graph"
    except Exception:  # host syncs or CPU work inside forward: time it eagerly
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters, mode


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a 2 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 2 * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def workloads() -> list[tuple[str, list[tuple[int, int]]]]:
    cases = [("decode b1 ctx192", [(191, 1)]), ("decode b1 ctx320", [(319, 1)])]
    cases.append(("decode b32 ctx1536", [(1535, 1)] * 32))
    cases.append(("decode b256 ctx1536", [(1535, 1)] * 256))  # the 1000 x 1024/1024 run's mean decode step
    # profile_throughput.py's decode steps (512 sequences, contexts 1024-1152) and the fp8 run's mean step
    cases += [("decode b512 ctx1088", [(1087, 1)] * 512), ("decode b512 ctx1536", [(1535, 1)] * 512)]
    cases += [(f"decode b{b} ctx{c}", [(c - 1, 1)] * b) for b in (1, 64, 256) for c in (1024, 4096)]
    cases.append(("prefill 4x2048", [(0, 2048)] * 4))
    cases.append(("prefill 1x8192 chunk on 8192 cached", [(8192, 8192)]))  # a long prompt's second chunk
    cases.append(("mixed 1x1024 prefill + 64 decodes ctx2048", [(0, 1024)] + [(2047, 1)] * 64))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--backends", default="triton,flashinfer,torch")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=sorted(CACHE_DTYPES))
    parser.add_argument(
        "--workloads", default="", help="comma-separated words; only rows whose label holds one"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    backends = args.backends.split(",")
    if "flashinfer" in backends:
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            print("flashinfer not installed: skipping it", file=sys.stderr)
            backends.remove("flashinfer")
    t0 = time.time()
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    cache_dtype = CACHE_DTYPES[args.kv_cache_dtype]
    words = [w for w in args.workloads.split(",") if w]
    for label, requests in workloads():
        if words and not any(w in label for w in words):
            continue
        step = make_step(requests, cache_dtype=cache_dtype)
        kv_bytes = sum(c + q for c, q in requests) * NUM_KV_HEADS * HEAD_DIM * 2 * cache_dtype.itemsize
        flops = sum(4 * q * (c + (q + 1) / 2) * NUM_HEADS * HEAD_DIM for c, q in requests)
        for name in backends:
            if name.startswith("torch") and len(requests) > 64:
                continue  # a Python loop over requests; too slow to be a useful baseline at this size
            if "/s" in name and not label.startswith("decode b1 "):
                continue  # forced split counts: the batch-1 question only
            ms, mode = time_backend(name, step, args.iters)
            rows.append({"workload": label, "backend": name, "mode": mode, "ms": ms,
                         "kv_read_gbs": kv_bytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12})  # fmt: skip
        del step
        torch.cuda.empty_cache()
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {
            "num_heads": NUM_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": "bfloat16",
            "kv_cache_dtype": str(cache_dtype).removeprefix("torch."),
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith("TREADLE_")},
        "copy_bandwidth_gbs": copy_gbs,
        "rows": rows,
        "wall_s": time.time() - t0,
    }
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'workload':44} {'backend':11} {'mode':6} {'ms':>9} {'KV GB/s':>9} {'TFLOP/s':>8}")
    for r in rows:
        print(
            f"{r['workload']:44} {r['backend']:11} {r['mode']:6} {r['ms']:9.4f} {r['kv_read_gbs']:9.0f} "
            f"{r['tflops']:8.1f}"
        )


if __name__ == "__main__":
    main()
