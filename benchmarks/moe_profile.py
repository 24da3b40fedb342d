"""Where a fused-MoE layer's GPU time goes, kernel by kernel: gpt-oss-20b's experts (K=N=2880, E=32, top-4, biases,
swigluoai) in bf16 and in MXFP4, the same modular kernel as benchmarks/moe_mxfp4.py, run `--iters` times under
torch.profiler at each token count. Reported per token count and weight format: every GPU kernel's mean µs a layer
call (device time summed over the calls, divided by them), their sum, and the layer's µs replayed from a CUDA graph
(what decode steps see; the difference to the sum is the gaps between kernels).

    PYTHONPATH=packages/moe/src:packages/ir/src:packages/kernels/src python benchmarks/moe_profile.py out.json
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict

import torch
from moe_mxfp4 import TOP_K, E, K, _time_graph, make_experts
from torch.profiler import ProfilerActivity, profile

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.experts.mxfp4 import dequantize_mxfp4


def _kernel_us(call: object, iters: int) -> dict[str, float]:
    """Kernel name -> mean device µs a call of `call()` (warm: three calls first)."""
    for _ in range(3):
        call()  # type: ignore[operator]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()  # type: ignore[operator]
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            us = getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
            totals[event.name[:90]] += float(us)
    return {name: round(us / iters, 2) for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("--tokens", default="1,4,16,64,1024", help="comma-separated token counts")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    gen, b13, b2, scales, epilogue = make_experts()
    dq13 = dequantize_mxfp4(b13, scales.w13_scale, torch.bfloat16)
    dq2 = dequantize_mxfp4(b2, scales.w2_scale, torch.bfloat16)
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, K, device="cuda", generator=gen).bfloat16()
        top, ids = torch.randn(m, E, device="cuda", generator=gen).topk(TOP_K, dim=-1)
        weights, ids = top.softmax(-1), ids.to(torch.int32)
        calls = {
            "bf16": functools.partial(kernel, x, dq13, dq2, weights, ids, "swigluoai", epilogue=epilogue),
            "mxfp4": functools.partial(
                kernel, x, b13, b2, weights, ids, "swigluoai", epilogue=epilogue, mxfp4=scales
            ),
        }
        for name, call in calls.items():
            kernels = _kernel_us(call, args.iters)
            row = {"tokens": m, "weights": name, "graph_us": round(_time_graph(call), 2),
                   "kernel_sum_us": round(sum(kernels.values()), 2), "kernels": kernels}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
