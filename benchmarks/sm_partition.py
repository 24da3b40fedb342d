"""Does decode attention overlap with GEMMs when each runs on its own share of the SMs? (GPU, bf16, Llama-3.1-8B)

benchmarks/stream_overlap.py showed that two plain streams do not overlap them: each kernel fills every SM, so the
block scheduler runs them nearly one after the other. CUDA green contexts give a stream a fixed share of the SMs.
This script measures, per attention share, whether the pair then runs concurrently, and how much slower each part
gets on fewer SMs (attention's KV reads need fewer SMs than the device has to reach the copy rate; the matmuls are
compute-bound and slow down with their share). It decides whether a two-micro-batch overlap in the engine could beat
the serial bound (benchmarks/README.md), before any engine work is built on it.

Per case and attention share (SMs), mean milliseconds per layer, launched eagerly ``--layers`` times per iteration
(the host runs ahead of the GPU; the kernels take 0.1-0.6 ms): ``attention`` alone on its share, ``gemms`` alone on
the rest, ``pair`` (both at once, joined every layer) and, on the whole device, ``serial`` (one after the other).
``gain`` = serial / pair (above 1: the partition beats running them in turn). ``graph`` says whether the pair can
be captured in a CUDA graph across the two green-context streams (the engine replays its steps from graphs).

    python benchmarks/sm_partition.py out.json [--layers 16] [--iters 10] [--shares 32,48,64,80]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import HEAD_DIM, NUM_KV_HEADS, copy_bandwidth_gbs
from stream_overlap import HIDDEN, INTERMEDIATE, attention_forward, gemms_forward

# (name, attention decodes, context, matmul rows): one micro-batch's attention beside the other's matmuls
CASES = [
    ("b128 ctx1536 + 128 rows (two halves of 256)", 128, 1536, 128),
    ("b256 ctx1536 + 256 rows (two halves of 512)", 256, 1536, 256),
    ("b256 ctx1536 + 512-row prefill chunk", 256, 1536, 512),
]


def green_streams(attention_sms: int) -> tuple[torch.cuda.Stream, torch.cuda.Stream, list[int]]:
    """Two streams on disjoint SM shares: ``attention_sms`` (rounded up to the device's granularity) and the rest."""
    from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

    streams, resources = split_device_green_ctx_by_sm_count(torch.device("cuda:0"), [attention_sms])
    return streams[0], streams[1], [int(r.sm.smCount) for r in resources]


def timed(body, layers: int, iters: int) -> float:
    """Mean ms per layer of ``body()`` enqueued ``layers`` times per iteration, timed on the current stream."""
    for _ in range(2):
        body()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        for _ in range(layers):
            body()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / layers


def on(stream: torch.cuda.Stream, fn):
    """``fn`` run on ``stream`` after the current stream's work, joined back into the current stream."""

    def run() -> None:
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            fn()
        main.wait_stream(stream)

    return run


def pair(attention_stream, gemm_stream, attend, multiply):
    def run() -> None:
        main = torch.cuda.current_stream()
        attention_stream.wait_stream(main)
        gemm_stream.wait_stream(main)
        with torch.cuda.stream(attention_stream):
            attend()
        with torch.cuda.stream(gemm_stream):
            multiply()
        main.wait_stream(attention_stream)
        main.wait_stream(gemm_stream)

    return run


def capture_pair(body, layers: int, iters: int) -> str:
    """Whether ``body`` captures into one CUDA graph and replays; its ms per layer if so, else the error."""
    try:
        graph, capture = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture), torch.cuda.graph(graph, stream=capture):
            for _ in range(layers):
                body()
        torch.cuda.current_stream().wait_stream(capture)
        return f"captured: {timed(graph.replay, 1, iters) / layers:.4f} ms per layer"
    except Exception as exc:  # the answer is the point: record whatever CUDA says
        torch.cuda.synchronize()
        return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def measure(case: tuple, share: int, layers: int, iters: int) -> dict:
    label, batch, context, rows = case
    attend, multiply = attention_forward(batch, context), gemms_forward(rows)
    attention_stream, gemm_stream, sms = green_streams(share)
    ms = {
        "serial": timed(lambda: (attend(), multiply()), layers, iters),
        "attention_full": timed(attend, layers, iters),
        "gemms_full": timed(multiply, layers, iters),
        "attention": timed(on(attention_stream, attend), layers, iters),
        "gemms": timed(on(gemm_stream, multiply), layers, iters),
        "pair": timed(pair(attention_stream, gemm_stream, attend, multiply), layers, iters),
    }
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    flops = 2 * rows * HIDDEN * (6144 + HIDDEN + 2 * INTERMEDIATE) + 2 * rows * INTERMEDIATE * HIDDEN
    row = {"case": label, "sms": sms, **{k: round(v, 4) for k, v in ms.items()}}
    row["gain"] = round(ms["serial"] / ms["pair"], 3)
    row["attention_tb_s"] = round(kv_bytes / (ms["attention"] * 1e-3) / 1e12, 3)
    row["gemms_tflop_s"] = round(flops / (ms["gemms"] * 1e-3) / 1e12, 1)
    row["graph"] = capture_pair(pair(attention_stream, gemm_stream, attend, multiply), layers, iters)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--shares", default="32,48,64,80", help="attention's SM counts to try")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sm_partition.py needs a CUDA GPU")
    rows = []
    for case in CASES:
        for share in (int(s) for s in args.shares.split(",")):
            try:
                row = measure(case, share, args.layers, args.iters)
            except Exception as exc:  # one failed share must not lose the others' rows
                row = {"case": case[0], "share": share, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    record = {"device": torch.cuda.get_device_name(), "sm_count": sm_count, "copy_gb_s": round(copy_bandwidth_gbs(), 1),
              "torch": torch.__version__, "layers": args.layers, "iters": args.iters, "rows": rows}  # fmt: skip
    args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
