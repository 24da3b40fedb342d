"""Test helpers (no tests here): 4-bit (W4A16) MoE problems and a 4-bit spec written here (independent of treadle's
packing and reference code).

`make_int4_inputs` takes `make_moe_inputs`' random problem and quantizes each expert's gate+up ([2N, K], one
projection: gate and up read the same input, so they share its act order) and down ([K, N]) matrix in groups of
input rows, round to nearest: asymmetric scale (max - min) / 15 with zero point round(-min / scale), symmetric
amax / 7 around 8; scales rounded to the activation dtype first. Act order draws a random permutation of each
projection's input rows and groups them in that order (g_idx[perm[i]] = i // group_size). Codes are packed eight
input rows to an int32 word (nibble j of word [i, c] = q[8i + j, c]), the layout of treadle_ir.ops.int4.
`moe_int4_spec`: each token's experts on the dequantized weights (q - z) * s in fp32, each projection's output
rounded to the activation dtype, act(gate) * up in fp32 rounded too, weighted and summed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moe_cases import DEVICE, make_moe_inputs

from treadle_moe import Int4ExpertScales, Int4Layout

# name -> (group_size, has_zeros, act_order); K = N = 48: group 32 leaves a ragged last group, 24 is not a power of
# two (the kernel gathers each row's scale), -1 is one group per output column
LAYOUTS = {
    "g16-asym": (16, True, False),
    "g32-sym": (32, False, False),
    "g24-asym": (24, True, False),
    "channel-sym": (-1, False, False),
    "g16-asym-act-order": (16, True, True),
    "g16-sym-act-order": (16, False, True),
}
# Qwen3-30B-A3B-GPTQ-Int4's groups, for the GPU tests
GPU_LAYOUTS = {
    "g128-sym": (128, False, False),
    "g128-asym": (128, True, False),
    "g128-sym-act-order": (128, False, True),
}


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[k, n] codes -> int32 [k / 8, n] with nibble j of word [i, c] = q[8i + j, c]."""
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64, device=q.device)
    for j in range(8):
        words |= q[j::8].to(torch.int64) << (4 * j)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantize(
    w: torch.Tensor, group: int, has_zeros: bool, act_order: bool, gen: torch.Generator, dtype: torch.dtype
):
    """w [n, k] -> (packed [k / 8, n], scales [groups, n], zeros uint8 [groups, n], g_idx int32 [k], dequant [n, k])."""
    n, k = w.shape
    size = k if group == -1 else group
    g_idx = torch.argsort(torch.randperm(k, generator=gen)) // size if act_order else torch.arange(k) // size
    g_idx = g_idx.to(w.device)
    groups = -(-k // size)
    wt = w.float().t()
    q = torch.empty(k, n, dtype=torch.int64, device=w.device)
    scales = torch.empty(groups, n, dtype=dtype, device=w.device)
    zeros = torch.full((groups, n), 8, dtype=torch.int64, device=w.device)
    for g in range(groups):
        rows = wt[g_idx == g]
        if has_zeros:
            low, high = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            s = ((high - low) / 15).clamp_min(1e-6).to(dtype)
            zeros[g] = torch.round(-low / s.float()).clamp(0, 15).long()
        else:
            s = (rows.abs().amax(0) / 7).clamp_min(1e-6).to(dtype)
        scales[g] = s
        q[g_idx == g] = (torch.round(rows / s.float()) + zeros[g]).clamp(0, 15).long()
    deq = ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t()
    return _pack_rows(q), scales, zeros.to(torch.uint8), g_idx.to(torch.int32), deq


def make_int4_inputs(
    layout: str,
    num_tokens: int,
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: str = DEVICE,
    seed: int = 0,
    skip_experts: int = 0,
) -> tuple[dict[str, torch.Tensor], Int4ExpertScales]:
    """`make_moe_inputs`' problem with w13 / w2 quantized to 4 bits here; inputs["w13_deq"] / ["w2_deq"] hold the
    dequantized fp32 weights [E, 2N, K] / [E, K, N] for the spec."""
    group, has_zeros, act_order = {**LAYOUTS, **GPU_LAYOUTS}[layout]
    inputs = make_moe_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, device, seed, skip_experts)
    gen = torch.Generator().manual_seed(seed + 1)
    parts: dict[str, list[torch.Tensor]] = {}
    for e in range(num_experts):
        for tag, w in (("13", inputs["w13"][e]), ("2", inputs["w2"][e])):
            for name, t in zip("pszgd", quantize(w, group, has_zeros, act_order, gen, dtype), strict=True):
                parts.setdefault(name + tag, []).append(t)
    t = {name: torch.stack(ts) for name, ts in parts.items()}
    out = dict(inputs)
    out["w13"], out["w2"], out["w13_deq"], out["w2_deq"] = t["p13"], t["p2"], t["d13"], t["d2"]
    scales = Int4ExpertScales(
        t["s13"], t["s2"], t["z13"] if has_zeros else None, t["z2"] if has_zeros else None,
        t["g13"] if act_order else None, t["g2"] if act_order else None, Int4Layout(group, has_zeros, act_order),
    )  # fmt: skip
    return out, scales


def moe_int4_spec(inputs: dict[str, torch.Tensor], activation: str = "silu") -> torch.Tensor:
    """[M, K] in the activation dtype (module docstring): each (token, slot) on its expert's dequantized weights,
    gathered expert by expert (on the inputs' device), weighted and summed in fp32."""
    x, dtype = inputs["hidden"], inputs["hidden"].dtype
    w13, w2 = inputs["w13_deq"], inputs["w2_deq"]
    ids, weights = inputs["topk_ids"].long(), inputs["topk_weights"].float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    n = w2.shape[2]
    for e in range(w13.shape[0]):
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = (x[tokens].float() @ w13[e].t()).to(dtype).float()
        gate, up = h[:, :n], h[:, n:]
        act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
        y = ((act * up).to(dtype).float() @ w2[e].t()).to(dtype).float()
        out.index_add_(0, tokens, weights[tokens, slots, None] * y)
    return out.to(dtype)
