"""Does decode attention overlap with GEMMs on two CUDA streams? (GPU, bf16, Llama-3.1-8B shapes)

The offline 1000 x 1024/1024 run is bound by two serial halves: decode attention reading the KV cache (memory) and
the projections' matmuls (compute, at 256+ rows). Run at once on two streams, each could hide behind the other:
that is the only way past the serial bound (benchmarks/README.md, "serial bound"). This script measures whether the
GPU actually overlaps them, before any engine work is built on it.

Per case, inside CUDA graphs of ``--layers`` repetitions (so launches are not counted), mean milliseconds of:
``attention`` alone (the Triton unified kernel, B decodes at context C, one layer), ``gemms`` alone (one layer's
qkv, o_proj, gate_up and down matmuls on M rows), ``serial`` (both on one stream) and ``overlap`` (attention on
one stream, the matmuls on another, joined per layer). ``hidden`` = (serial - overlap) / min(attention, gemms):
1.0 means the shorter one vanished, 0 means no overlap.

    python benchmarks/stream_overlap.py out.json [--layers 8] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "packages/ir/src"), str(ROOT / "packages/kernels/src")]

from attention import BLOCK_SIZE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, copy_bandwidth_gbs, make_step  # noqa: E402

from treadle_kernels.attention import get_attn_backend  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 14336
# (name, attention decodes, context, matmul rows): prefill chunks beside a decode batch, and two decode halves
CASES = [
    ("b256 ctx1536 + 256-row prefill chunk", 256, 1536, 256),
    ("b256 ctx1536 + 512-row prefill chunk", 256, 1536, 512),
    ("b256 ctx1536 + 1024-row prefill chunk", 256, 1536, 1024),
    ("b256 ctx1536 + 2048-row prefill chunk", 256, 1536, 2048),
    ("b128 ctx1536 + 128-row decode half", 128, 1536, 128),
    ("b128 ctx1536 + 256-row", 128, 1536, 256),
]


def attention_forward(batch: int, context: int):
    """One layer's decode attention of ``batch`` requests at ``context`` tokens, as a closure."""
    q, k, v, kv_cache, md = make_step([(context - 1, 1)] * batch)
    backend = get_attn_backend("triton", "cuda")
    builder = backend.get_builder_cls()(BLOCK_SIZE, "cuda")
    impl = backend.get_impl_cls()(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS)
    attn_md = builder.build_for_cuda_graph(md, md.num_reqs)
    builder.prepare_cuda_graph_replay(md, md.num_reqs)
    out = torch.empty_like(q)
    return lambda: impl.forward(q, k, v, kv_cache, attn_md, out)


def gemms_forward(rows: int):
    """One Llama-3.1-8B layer's four projections on ``rows`` rows (random bf16), as a closure."""

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5

    qkv, o, gate_up, down = (
        w(6144, HIDDEN),
        w(HIDDEN, HIDDEN),
        w(2 * INTERMEDIATE, HIDDEN),
        w(HIDDEN, INTERMEDIATE),
    )
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
    outs = [
        torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
        for n in (6144, HIDDEN, 2 * INTERMEDIATE, HIDDEN)
    ]

    def run() -> None:
        torch.matmul(x, qkv.t(), out=outs[0])
        torch.matmul(x, o.t(), out=outs[1])
        torch.matmul(x, gate_up.t(), out=outs[2])
        torch.matmul(h, down.t(), out=outs[3])

    return run


def timed_graph(body, layers: int, iters: int) -> float:
    """Mean ms of one layer of ``body(side_stream)``, captured ``layers`` times in one CUDA graph."""
    side = torch.cuda.Stream()
    for _ in range(2):
        body(side)
    torch.cuda.synchronize()
    graph, capture = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture), torch.cuda.graph(graph, stream=capture):
        for _ in range(layers):
            body(side)
    torch.cuda.current_stream().wait_stream(capture)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / layers


def measure(batch: int, context: int, rows: int, layers: int, iters: int) -> dict:
    attend, multiply = attention_forward(batch, context), gemms_forward(rows)

    def overlapped(side: torch.cuda.Stream) -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            multiply()
        attend()
        torch.cuda.current_stream().wait_stream(side)

    bodies = {
        "attention": lambda side: attend(),
        "gemms": lambda side: multiply(),
        "serial": lambda side: (attend(), multiply()),
        "overlap": overlapped,
    }
    ms = {name: timed_graph(body, layers, iters) for name, body in bodies.items()}
    ms["hidden"] = (ms["serial"] - ms["overlap"]) / min(ms["attention"], ms["gemms"])
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    ms["attention_tb_s"] = kv_bytes / (ms["attention"] * 1e-3) / 1e12
    flops = 2 * rows * HIDDEN * (6144 + HIDDEN + 2 * INTERMEDIATE) + 2 * rows * INTERMEDIATE * HIDDEN
    ms["gemms_tflop_s"] = flops / (ms["gemms"] * 1e-3) / 1e12
    return {k: round(v, 4) for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/stream_overlap.py needs a CUDA GPU")
    rows = []
    for label, batch, context, m in CASES:
        row = {"case": label, **measure(batch, context, m, args.layers, args.iters)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = {"device": torch.cuda.get_device_name(), "copy_gb_s": round(copy_bandwidth_gbs(), 1),
              "torch": torch.__version__, "layers": args.layers, "iters": args.iters, "rows": rows}  # fmt: skip
    args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
