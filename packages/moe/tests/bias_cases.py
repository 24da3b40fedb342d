"""Test helpers (no tests here): MoE problems with gpt-oss's expert biases, and their math as a per-token float64 loop
written here (HF GptOssExperts on plain gate | up halves): for token m and its j-th expert e,
y = w2[e] @ act(w13[e] @ x[m] + b13[e]) + b2[e], weighted by topk_weights[m, j] (the down bias too) and summed.
"""

from __future__ import annotations

import torch
from moe_cases import COMBOS, DEVICE, make_moe_inputs, skip_without_triton

from treadle_moe import ModularKernel
from treadle_moe.experts.epilogue import ExpertEpilogue


def make_bias_inputs(
    case: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = DEVICE
) -> dict[str, torch.Tensor]:
    """make_moe_inputs' problem plus O(1) biases, inputs scaled so some pre-activations pass the limit 7."""
    m, k, n, e, top_k, skip = case
    inputs = make_moe_inputs(m, k, n, e, top_k, torch.float32, device="cpu", seed=seed, skip_experts=skip)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs["hidden"] = inputs["hidden"] * 8
    inputs["b13"] = torch.randn(e, 2 * n, generator=gen)
    inputs["b2"] = 8 * torch.randn(e, k, generator=gen)  # of the outputs' magnitude
    floats = ("hidden", "w13", "w2", "b13", "b2")
    return {name: t.to(device, dtype) if name in floats else t.to(device) for name, t in inputs.items()}


def loop_reference(
    inputs: dict[str, torch.Tensor], activation: str, alpha: float, limit: float
) -> torch.Tensor:
    """Token by token, expert by expert, in float64 (experts of id -1 skipped)."""
    x, w13, w2 = (inputs[name].double().cpu() for name in ("hidden", "w13", "w2"))
    b13, b2 = inputs["b13"].double().cpu(), inputs["b2"].double().cpu()
    ids, weights = inputs["topk_ids"].cpu(), inputs["topk_weights"].double().cpu()
    n = w2.shape[2]
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            if e < 0:
                continue
            h = w13[e] @ x[m] + b13[e]
            gate, up = h[:n], h[n:]
            if activation == "swigluoai":
                gate, up = torch.clamp(gate, max=limit), torch.clamp(up, -limit, limit)
                act = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
            else:
                act = gate / (1 + torch.exp(-gate)) * up
            out[m] += weights[m, j] * (w2[e] @ act + b2[e])
    return out


def run(
    combo: str,
    inputs: dict[str, torch.Tensor],
    activation: str,
    epilogue: ExpertEpilogue,
    routed_experts: int | None = None,
) -> torch.Tensor:
    """The combo's kernel on `inputs`; `routed_experts`: the router's expert count when the weights hold fewer."""
    skip_without_triton(combo)
    pf_cls, experts_cls, _ = COMBOS[combo]
    if "triton" in combo:
        experts = experts_cls(config_experts=routed_experts)  # type: ignore[call-arg]
    else:
        experts = experts_cls()
    kernel = ModularKernel(pf_cls(), experts)
    return kernel(inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
                  activation, epilogue=epilogue)  # fmt: skip
