"""Measure the two ceilings of the device this runs on: copy bandwidth and bf16 matmul rate.

Copy bandwidth counts bytes read plus bytes written of a large device-to-device copy (the convention of the
vLLM reference table); the matmul rate is an 8192^3 bf16 product on random data. Both are the median of
repeated, event-timed runs after warm-up. Usage: python benchmarks/device_ceilings.py [--out result.json]
"""

from __future__ import annotations

import argparse
import json

import torch


def _time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(num_bytes: int = 4 << 30) -> float:
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure() -> dict[str, object]:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "total_memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "copy_bandwidth_gbps": copy_bandwidth_gbps(),
        "bf16_matmul_tflops": matmul_tflops(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = measure()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
