"""Shared helpers of the MoE tests: random MoE problems, a dense float64 spec, tolerances, the combos."""

from __future__ import annotations

import pytest
import torch

from treadle_moe import (
    BatchedTorchExperts,
    BatchedTritonExperts,
    Experts,
    ModularKernel,
    NoEPBatchedPrepareFinalize,
    NoEPStandardPrepareFinalize,
    PrepareFinalize,
    TorchExperts,
    TritonExperts,
)

# (prepare/finalize factory, experts factory, runs in the interpreter)
COMBOS: dict[str, tuple[type[PrepareFinalize], type[Experts], bool]] = {
    "standard-torch": (NoEPStandardPrepareFinalize, TorchExperts, False),
    "standard-triton": (NoEPStandardPrepareFinalize, TritonExperts, True),
    "batched-torch": (NoEPBatchedPrepareFinalize, BatchedTorchExperts, False),
    "batched-triton": (NoEPBatchedPrepareFinalize, BatchedTritonExperts, True),
}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors unless interpreted


def skip_without_triton(combo: str) -> None:
    """Triton ships with treadle-kernels on Linux only; elsewhere the Triton combos are skipped."""
    if COMBOS[combo][2]:
        pytest.importorskip("triton")


def run_combo(combo: str, inputs: dict[str, torch.Tensor], activation: str = "silu") -> torch.Tensor:
    skip_without_triton(combo)
    pf_cls, experts_cls, _ = COMBOS[combo]
    kernel = ModularKernel(pf_cls(), experts_cls())
    return kernel(
        inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"], activation
    )


def make_moe_inputs(
    num_tokens: int,
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: str = DEVICE,
    seed: int = 0,
    skip_experts: int = 0,
) -> dict[str, torch.Tensor]:
    """Random hidden states, O(1)-scaled expert weights and random distinct routing.

    `skip_experts` > 0 keeps the last `skip_experts` experts out of the routing, so they receive no token.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skip_experts:
        logits[:, num_experts - skip_experts :] = float("-inf")
    scores = torch.softmax(logits, dim=-1)
    topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    return {
        "hidden": x.to(device=device, dtype=dtype),
        "w13": w13.to(device=device, dtype=dtype),
        "w2": w2.to(device=device, dtype=dtype),
        "topk_weights": topk_weights.to(device),
        "topk_ids": topk_ids.to(device=device, dtype=torch.int32),
    }


def moe_reference_fp64(inputs: dict[str, torch.Tensor], activation: str = "silu") -> torch.Tensor:
    """Dense float64 spec: every token through each of its experts, weighted and summed."""
    x = inputs["hidden"].double()
    w13, w2 = inputs["w13"].double(), inputs["w2"].double()
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for m in range(x.shape[0]):
        for j in range(inputs["topk_ids"].shape[1]):
            e = int(inputs["topk_ids"][m, j])
            h = w13[e] @ x[m]
            gate, up = h[:inter], h[inter:]
            act = (
                torch.nn.functional.silu(gate)
                if activation == "silu"
                else torch.nn.functional.gelu(gate, approximate="tanh")
            )
            out[m] += float(inputs["topk_weights"][m, j]) * (w2[e] @ (act * up))
    return out


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of O(1) magnitude."""
    return {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 5e-2)}[dtype]


def check_graph_replays_layer(
    layer: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, eager: torch.Tensor
) -> None:
    """`layer(x, logits)` captured in a CUDA graph (after a warm-up on a side stream) and replayed on new x gives the
    eager result on that x (bf16 rounding apart), and not `eager`, the output before x changed."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x, logits)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = layer(x, logits)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured.float(), layer(x, logits).float(), atol=1e-2, rtol=1e-2)
    assert not torch.equal(captured, eager)
