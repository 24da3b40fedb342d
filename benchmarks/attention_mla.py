"""Multi-head latent attention (DeepSeek MLA) microbenchmark: one layer on the Triton backend, bf16, GPU.

The layer caches one 576-wide latent a token (512 + 64), shared by every query head as key and value (a stride-0
``[2, ...]`` view, as the runner hands it). Variants: ``latent`` (``triton_mla.py``: the head cut into 512 + 64,
each key tile loaded once), ``padded`` (the unified kernel with the head padded to 1,024, the path before it and
what ``TREADLE_ATTN_MLA=0`` selects), and ``latent`` with its tiles overridden for a sweep, as
``latent:d=BLOCK_NxWARPSxSTAGES`` (decode launches), ``:p=ROWSxBLOCK_NxWARPSxSTAGES`` (prefill launches), ``fd=`` /
``fp=`` the same with an fp8 cache (``--kv-cache-dtype fp8``: e4m3 at unit scale, as the engine's). Timed with CUDA events around ``impl.forward`` (the cache write included), replayed from a CUDA
graph for decode-only steps (as the engine's decode graphs), eagerly otherwise. Reports GB/s of latent read
(``sum(seq_len) * 576`` values) and TFLOP/s (``4 * 576`` flops per query head per visible key).

    python benchmarks/attention_mla.py OUT.json [--variants latent,padded,...] [--heads 16,128] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages/ir/src"), str(ROOT / "packages/kernels/src"), str(ROOT / "benchmarks")]

from attention import copy_bandwidth_gbs, time_forward  # noqa: E402

from treadle_kernels.attention import AttentionMetadata, get_attn_backend, triton_mla  # noqa: E402

HEAD_DIM, BLOCK_SIZE, DTYPE = 576, 16, torch.bfloat16


def make_step(requests: list[tuple[int, int]], num_heads: int, cache_dtype: torch.dtype, seed: int = 0):
    """Random queries, new latents and a filled shared cache for (context_len, query_len) requests."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [c + q for c, q in requests]
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    perm = torch.randperm(sum(blocks), device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(len(requests), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[start : start + nb]
        start += nb
    latent = torch.randn(sum(blocks), BLOCK_SIZE, 1, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    latent = latent.to(cache_dtype)
    q_lens = torch.tensor([q for _, q in requests], dtype=torch.int32)
    qsl = torch.zeros(len(requests) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    slots = []
    for i, (c, q) in enumerate(requests):
        pos = torch.arange(c, c + q, device="cuda")
        slots.append(table[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=int(q_lens.max()), max_seq_len=max(seq_lens),
        query_start_loc=qsl.cuda(), query_start_loc_cpu=qsl, seq_lens=sl.cuda(), seq_lens_cpu=sl,
        block_table=table, slot_mapping=torch.cat(slots),
    )  # fmt: skip
    q = torch.randn(int(qsl[-1]), num_heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen) * 0.3
    kv = torch.randn(int(qsl[-1]), 1, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return q, kv, latent.unsqueeze(0).expand(2, *latent.shape), md


TILE_NAMES = {"d": "DECODE_TILES", "p": "PREFILL_TILES", "fd": "FP8_DECODE_TILES", "fp": "FP8_PREFILL_TILES"}
DEFAULTS = {name: getattr(triton_mla, name) for name in TILE_NAMES.values()}


def configure(variant: str) -> None:
    """Set the latent path's module switches for a variant (module docstring)."""
    name, *opts = variant.split(":")
    triton_mla._ENABLED = name == "latent"
    for attr, value in DEFAULTS.items():
        setattr(triton_mla, attr, value)
    for opt in opts:
        key, _, value = opt.partition("=")
        setattr(triton_mla, TILE_NAMES[key], tuple(map(int, value.split("x"))))


def time_variant(variant: str, step, num_heads: int, iters: int) -> tuple[float, str]:
    q, kv, cache, md = step
    configure(variant)
    backend = get_attn_backend("triton", "cuda")
    builder = backend.get_builder_cls()(BLOCK_SIZE, "cuda")
    impl = backend.get_impl_cls()(num_heads, HEAD_DIM, HEAD_DIM**-0.5, 1)
    decode_only = md.max_query_len == 1
    attn_md = builder.build_for_cuda_graph(md, md.num_reqs) if decode_only else builder.build(md)
    out = torch.empty_like(q)

    def forward() -> None:
        impl.forward(q, kv, kv, cache, attn_md, out)

    return time_forward(forward, iters, graphs=decode_only)  # decode-only steps replay as the engine's graphs


def workloads() -> list[tuple[str, list[tuple[int, int]]]]:
    cases = [
        (f"decode b{b} ctx{c}", [(c - 1, 1)] * b) for b, c in ((1, 1024), (64, 1024), (256, 1024), (64, 4096))
    ]
    cases.append(("decode b256 ctx1536", [(1535, 1)] * 256))
    cases += [("prefill 1x2048", [(0, 2048)]), ("prefill 4x1024", [(0, 1024)] * 4)]
    cases.append(("mixed 1x512 prefill + 64 decodes ctx1024", [(0, 512)] + [(1023, 1)] * 64))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--variants", default="latent,padded")
    parser.add_argument("--heads", default="16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument(
        "--workloads", default="", help="comma-separated words; only rows whose label holds one"
    )
    args = parser.parse_args()
    t0 = time.time()
    copy_gbs = copy_bandwidth_gbs()
    words = [w for w in args.workloads.split(",") if w]
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    rows = []
    for num_heads in map(int, args.heads.split(",")):
        for label, requests in workloads():
            if words and not any(w in label for w in words):
                continue
            step = make_step(requests, num_heads, cache_dtype)
            kv_bytes = sum(c + q for c, q in requests) * HEAD_DIM * cache_dtype.itemsize
            flops = sum(4 * q * (c + (q + 1) / 2) * num_heads * HEAD_DIM for c, q in requests)
            for variant in args.variants.split(","):
                try:
                    ms, mode = time_variant(variant, step, num_heads, args.iters)
                except Exception as exc:  # a tile config that does not compile or fit: record it, go on
                    rows.append(
                        {"heads": num_heads, "workload": label, "variant": variant, "error": repr(exc)[:300]}
                    )
                    print(f"{num_heads:3} {label:42} {variant:26} ERROR {exc!r:.200}", flush=True)
                    continue
                row = {"heads": num_heads, "workload": label, "variant": variant, "mode": mode, "ms": ms,
                       "kv_read_gbs": kv_bytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12}  # fmt: skip
                rows.append(row)
                print(f"{num_heads:3} {label:42} {variant:26} {mode:5} {ms:8.4f} ms {row['kv_read_gbs']:7.0f} GB/s "
                      f"{row['tflops']:6.1f} TFLOP/s", flush=True)  # fmt: skip
            del step
            torch.cuda.empty_cache()
    import triton

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": "bfloat16",
        "kv_cache_dtype": str(cache_dtype), "copy_bandwidth_gbs": copy_gbs, "default_tiles": DEFAULTS,
        "rows": rows, "wall_s": time.time() - t0,
    }  # fmt: skip
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")


if __name__ == "__main__":
    main()
