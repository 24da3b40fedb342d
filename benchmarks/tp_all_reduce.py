"""All-reduce latency on two GPUs: NCCL against the symmetric-memory one-shot kernel (symm_all_reduce.py).

Each size is timed as a CUDA graph of 64 all-reduces of a bf16 tensor (what a decode step does), replayed 20 times
after a warm-up; microseconds per all-reduce, rank 0's clock. Run: python3 benchmarks/tp_all_reduce.py OUT.json
"""

from __future__ import annotations

import json
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_KIB = (8, 32, 128, 256, 512, 1024, 2048)
CALLS, REPLAYS = 64, 20


def _time(fn: object, x: torch.Tensor) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)  # type: ignore[operator]
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    graph.reset()
    return elapsed / (CALLS * REPLAYS) * 1e6


def _rank(rank: int, port: int, out: str) -> None:
    from treadle_model_runner import parallel

    device = torch.device("cuda", rank)
    parallel.init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", device)
    parallel.prepare_small_all_reduce(torch.bfloat16, device)
    small = parallel._small
    rows = []
    for kib in SIZES_KIB:
        x = torch.randn(kib * 512, device=device).to(torch.bfloat16)
        nccl = _time(lambda t: dist.all_reduce(t), x)
        one_shot = None
        if small is not None and kib * 1024 <= small.max_bytes:
            one_shot = _time(small.try_all_reduce, x)
        rows.append({"kib": kib, "nccl_us": round(nccl, 2), "one_shot_us": one_shot and round(one_shot, 2)})
    if rank == 0:
        result = {"device": f"2 x {torch.cuda.get_device_name(0)}", "dtype": "bfloat16", "calls_per_graph": CALLS,
                  "replays": REPLAYS, "torch": torch.__version__, "rows": rows}  # fmt: skip
        print(json.dumps(result, indent=1))
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    parallel.destroy_tensor_parallel()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(_rank, args=(free_port, sys.argv[1]), nprocs=2, join=True)
