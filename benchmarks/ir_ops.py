"""Micro-benchmark of treadle's IR ops: each Triton provider vs eager torch native vs torch.compile'd native.

Workload: num_tokens 1 ... 8192, hidden 4096 (32 query heads + 8 KV heads of 128 for rotary / KV-cache
writes), bf16. For every (op, implementation, num_tokens) it reports the GPU time per call and the achieved
bandwidth: the op's minimum bytes moved (each input read once, each output written once) over the time. The
ceiling is a large device-to-device copy measured in the same run (bytes read + bytes written). Times are
CUDA-graph replays of 20 back-to-back calls (device time, no Python launch cost); the eager launch cost is
reported separately as ``launch_us`` (a stream of plain calls), which is what small batches pay without graphs.
Working sets that fit in L2 (about 50 MB on H100/H200; e.g. 1024 tokens) are re-read from L2 across replays and
can exceed the copy bandwidth; the acceptance point, 8192 x 4096, is far larger than L2.

Usage (on a CUDA machine, from the repo root):
    PYTHONPATH=packages/ir/src:packages/kernels/src python benchmarks/ir_ops.py benchmarks/results/ir_ops_h100.json
Options: --tokens 1,64,8192  --ops rms_norm,silu_and_mul  --no-compile  --commit SHA. Needs only torch + triton.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 4096, 32, 8, 128
DTYPE = torch.bfloat16
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096, 8192)
GRAPH_CALLS = 20  # calls captured per CUDA graph


@dataclass
class Row:
    op: str
    impl: str  # "triton" | "eager" | "compiled"
    num_tokens: int
    time_us: float  # device time per call (CUDA-graph replay)
    launch_us: float  # wall time per call when launched eagerly back to back
    gbps: float  # bytes moved / time_us
    pct_of_copy: float  # gbps / copy bandwidth * 100


def _elapsed_ms(fn: Callable[[], Any], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def copy_bandwidth_gbps(num_bytes: int = 2 << 30) -> float:
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = min(_elapsed_ms(lambda: dst.copy_(src), 5) / 5 for _ in range(5))
    return 2 * num_bytes / (best * 1e-3) / 1e9


def time_graph_us(fn: Callable[[], Any]) -> float:
    """Median device time per call of ``fn`` replayed from a CUDA graph of GRAPH_CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    samples = sorted(_elapsed_ms(graph.replay, 1) * 1e3 / GRAPH_CALLS for _ in range(15))
    return samples[len(samples) // 2]


def time_launch_us(fn: Callable[[], Any], iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def make_case(op: str, num_tokens: int) -> tuple[tuple[Any, ...], int]:
    """Arguments for ``op`` at ``num_tokens`` and the minimum bytes one call moves."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(DTYPE)

    e = torch.tensor([], dtype=DTYPE).element_size()
    t, h = num_tokens, HIDDEN
    if op in ("rms_norm", "gemma_rms_norm"):
        return (randn(t, h), randn(h), 1e-6), (2 * t * h + h) * e
    if op == "fused_add_rms_norm_":
        return (randn(t, h), randn(t, h), randn(h), 1e-6), (4 * t * h + h) * e
    if op == "fused_add_rms_norm":
        return (randn(t, h), randn(t, h), randn(h), 1e-6), (4 * t * h + h) * e
    if op in ("silu_and_mul", "gelu_tanh_and_mul"):
        return (randn(t, 2 * h),), 3 * t * h * e
    if op == "rotary_embedding_":
        positions = torch.randint(0, 8192, (t,), generator=gen, device="cuda")
        q, k = randn(t, NUM_HEADS * HEAD_SIZE), randn(t, NUM_KV_HEADS * HEAD_SIZE)
        cache = torch.randn(8192, HEAD_SIZE, generator=gen, device="cuda")  # [max_pos, rot_dim] fp32
        moved = 2 * (q.numel() + k.numel()) * e + t * (HEAD_SIZE * 4 + 8)
        return (positions, q, k, HEAD_SIZE, cache, True), moved
    if op == "reshape_and_cache":
        k, v = randn(t, NUM_KV_HEADS, HEAD_SIZE), randn(t, NUM_KV_HEADS, HEAD_SIZE)
        num_blocks = (t + 15) // 16 + 1
        kv_cache = torch.zeros(2, num_blocks, 16, NUM_KV_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
        slots = torch.randperm(num_blocks * 16, generator=gen, device="cuda")[:t]
        return (k, v, kv_cache[0], kv_cache[1], slots), 4 * k.numel() * e + t * 8
    raise ValueError(f"unknown op {op!r}")


OPS = (
    "rms_norm",
    "fused_add_rms_norm_",
    "fused_add_rms_norm",
    "gemma_rms_norm",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "rotary_embedding_",
    "reshape_and_cache",
)


def _commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="where to write the JSON results")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd native baseline")
    parser.add_argument("--commit", default=None, help="commit id to record (default: git rev-parse HEAD)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ir_ops.py needs a CUDA GPU")

    import treadle_kernels  # noqa: F401  (registers the triton providers)
    from treadle_ir import ops

    tokens = [int(t) for t in args.tokens.split(",")]
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()]
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    copy_gbps = copy_bandwidth_gbps()
    print(f"device {torch.cuda.get_device_name(0)}  copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows: list[Row] = []
    errors: list[str] = []
    started = time.perf_counter()
    for name in op_names:
        ir_op = getattr(ops, name)
        impls: dict[str, Callable[..., Any]] = {
            "triton": ir_op.providers["triton"].impl,
            "eager": ir_op.native,
        }
        if not args.no_compile:
            impls["compiled"] = torch.compile(ir_op.native, dynamic=True, fullgraph=True)
        for num_tokens in tokens:
            case, moved = make_case(name, num_tokens)
            chosen = ir_op.select(*case).name
            assert chosen == "triton", f"dispatch would not pick triton for {name} at {num_tokens}: {chosen}"
            for impl_name, impl in impls.items():
                fn = lambda impl=impl, case=case: impl(*case)  # noqa: E731
                try:
                    device_us = time_graph_us(fn)
                except Exception as exc:  # one broken measurement must not lose the others
                    errors.append(f"{name} {impl_name} T={num_tokens}: {type(exc).__name__}: {exc}")
                    print("ERROR", errors[-1], flush=True)
                    torch.cuda.synchronize()
                    continue
                gbps = moved / (device_us * 1e-6) / 1e9
                row = Row(
                    name, impl_name, num_tokens, device_us, time_launch_us(fn), gbps, 100 * gbps / copy_gbps
                )
                rows.append(row)
                print(
                    f"{name:22s} {impl_name:8s} T={num_tokens:5d}  {row.time_us:9.2f} us  "
                    f"launch {row.launch_us:7.2f} us  {gbps:7.0f} GB/s  {row.pct_of_copy:5.1f}% of copy",
                    flush=True,
                )
    # dispatch overhead: the IR op call (per-call dispatch) vs the Triton impl called directly, T=1
    case, _ = make_case("rms_norm", 1)
    dispatch_us = time_launch_us(lambda: ops.rms_norm(*case), 200) - time_launch_us(
        lambda: ops.rms_norm.providers["triton"].impl(*case), 200
    )

    def pick(op: str, impl: str, t: int) -> Row | None:
        return next((r for r in rows if (r.op, r.impl, r.num_tokens) == (op, impl, t)), None)

    acceptance = {}
    for op in ("rms_norm", "fused_add_rms_norm_"):
        tri, eager = pick(op, "triton", 8192), pick(op, "eager", 8192)
        if tri and eager:
            acceptance[op] = {
                "pct_of_copy_at_8192": round(tri.pct_of_copy, 1),
                "meets_70pct": tri.pct_of_copy >= 70.0,
                "speedup_vs_eager": round(eager.time_us / tri.time_us, 2),
                "beats_eager": tri.time_us < eager.time_us,
            }
    result = {
        "benchmark": "ir_ops",
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "commit": _commit(args.commit),
        "command": " ".join([sys.executable, *sys.argv]),
        "dtype": "bfloat16",
        "hidden": HIDDEN,
        "timing": f"CUDA-graph replay of {GRAPH_CALLS} calls, median of 15; launch_us = eager back-to-back; "
        "working sets under the L2 size can exceed copy bandwidth",
        "baseline": {"copy_bandwidth_gbps": round(copy_gbps, 1), "method": "2 GiB bf16 copy_, read + write"},
        "dispatch_overhead_us": round(dispatch_us, 2),
        "acceptance": acceptance,
        "wall_s": round(time.perf_counter() - started, 1),
        "errors": errors,
        "results": [asdict(r) for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(acceptance, indent=2))
    print(f"dispatch overhead {dispatch_us:.2f} us/call; wrote {args.output}")


if __name__ == "__main__":
    main()
