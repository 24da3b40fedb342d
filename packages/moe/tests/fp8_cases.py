"""Test helpers (no tests here): fp8 MoE problems and an fp8 spec written here, with torch's own e4m3 cast
(independent of treadle's fp8 code).

`make_fp8_inputs` takes `make_moe_inputs`' random problem and quantizes its expert weights in the test: per
channel (scale = row amax / 448) or block-wise (each [block_n, block_k] tile of each expert's gate, up and down
matrix, the gate and up grids stacked), values cast(w * (1 / scale)).
`with_static_inputs` adds static (per-tensor) input scales to a per-channel problem, `calibrate` measures them.
`moe_fp8_spec` is what an fp8 MoE computes, token by token: each expert as the dense fp8 projections would
(activations quantized per token, per (token, block_k group), or with the static input scale of the GEMM, values
beyond 448 * scale saturating; dequantized products in fp32, the projection's
output rounded to the activation dtype, act(gate) * up rounded too, then the down projection likewise), weighted
and summed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moe_cases import DEVICE, make_moe_inputs

from treadle_moe import Fp8ExpertScales, Fp8Layout

E4M3_MAX = 448.0
LAYOUTS = {"channel": None, "block16x32": (16, 32), "block32x16": (32, 16)}


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _cast(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t.float() * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_tiles(w: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] -> (float8_e4m3fn [n, k], fp32 scales [ceil(n / block_n), ceil(k / block_k)]), tile by tile (the
    ragged last tiles padded with zeros, which change no amax)."""
    n, k = w.shape
    rows, cols = -(-n // block_n), -(-k // block_k)
    padded = F.pad(w.float(), (0, cols * block_k - k, 0, rows * block_n - n))
    tiles = padded.view(rows, block_n, cols, block_k)
    scales = _scale(tiles.abs().amax(dim=(1, 3)))  # [rows, cols]
    q = _cast(tiles, scales[:, None, :, None]).view(rows * block_n, cols * block_k)
    return q[:n, :k].contiguous(), scales


def dequantize_tiles(q: torch.Tensor, scales: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    n, k = q.shape
    return q.float() * scales.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]


def make_fp8_inputs(
    block: tuple[int, int] | None,
    num_tokens: int,
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: str = DEVICE,
    seed: int = 0,
    skip_experts: int = 0,
) -> tuple[dict[str, torch.Tensor], Fp8ExpertScales]:
    """`make_moe_inputs`' problem with w13 / w2 quantized to float8_e4m3fn here (module docstring)."""
    inputs = make_moe_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, "cpu", seed, skip_experts)
    w13, w2 = inputs["w13"].float(), inputs["w2"].float()
    if block is None:
        s13, s2 = _scale(w13.abs().amax(dim=2)), _scale(w2.abs().amax(dim=2))  # [E, 2N], [E, K]
        q13, q2 = _cast(w13, s13[..., None]), _cast(w2, s2[..., None])
    else:
        parts13, parts2 = [], []
        for e in range(num_experts):
            gate, up = quantize_tiles(w13[e, :inter], *block), quantize_tiles(w13[e, inter:], *block)
            parts13.append((torch.cat([gate[0], up[0]]), torch.cat([gate[1], up[1]])))
            parts2.append(quantize_tiles(w2[e], *block))
        q13, s13 = torch.stack([p[0] for p in parts13]), torch.stack([p[1] for p in parts13])
        q2, s2 = torch.stack([p[0] for p in parts2]), torch.stack([p[1] for p in parts2])
    inputs = {name: t.to(device) for name, t in inputs.items()}
    inputs["w13"], inputs["w2"] = q13.to(device), q2.to(device)
    return inputs, Fp8ExpertScales(s13.to(device), s2.to(device), Fp8Layout(block))


def with_static_inputs(scales: Fp8ExpertScales, w13_input: float, w2_input: float) -> Fp8ExpertScales:
    """Per-channel `scales` whose activations are quantized with the given input scales (one per GEMM)."""
    assert scales.layout.block is None
    device = scales.w13.device
    return Fp8ExpertScales(scales.w13, scales.w2, Fp8Layout(static_activations=True),
                           torch.tensor([w13_input], device=device), torch.tensor([w2_input], device=device))  # fmt: skip


def calibrate(inputs: dict[str, torch.Tensor], scales: Fp8ExpertScales) -> tuple[float, float]:
    """amax / 448 of the w13 input and of every expert's intermediate act(gate) * up on these tokens."""
    x = inputs["hidden"].float()
    n = inputs["w2"].shape[2]
    w13 = inputs["w13"].float() * scales.w13[..., None]
    h = torch.einsum("tk,enk->etn", x, w13)
    inter = F.silu(h[..., :n]) * h[..., n:]
    return float(x.abs().amax()) / 448, float(inter.abs().amax()) / 448


def _quantized_input(x: torch.Tensor, group: int, static: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, k] (fp32) with each group of `group` consecutive values replaced by its e4m3 round trip (each with its
    own scale, or the `static` one [1], saturating)."""
    if static is not None:
        scale = static.cpu().float()
        return _cast(x, scale).float() * scale
    k = x.shape[1]
    padded = F.pad(x, (0, -(-k // group) * group - k)).view(x.shape[0], -1, group)
    scale = _scale(padded.abs().amax(dim=-1, keepdim=True))
    return (_cast(padded, scale).float() * scale).flatten(1)[:, :k]


def _projection(
    x: torch.Tensor, w: torch.Tensor, group: int, dtype: torch.dtype, static: torch.Tensor | None = None
) -> torch.Tensor:
    return (_quantized_input(x.float(), group, static) @ w.t()).to(dtype)


def moe_fp8_spec(inputs: dict[str, torch.Tensor], scales: Fp8ExpertScales) -> torch.Tensor:
    """The fp8 MoE output (module docstring), [M, K] in the activation dtype (silu)."""
    x = inputs["hidden"].cpu()
    dtype, (num_experts, two_n, k) = x.dtype, inputs["w13"].shape
    n = two_n // 2
    block = scales.layout.block
    w13, w2 = inputs["w13"].cpu(), inputs["w2"].cpu()
    s13, s2 = scales.w13.cpu(), scales.w2.cpu()
    if block is None:
        d13, d2 = w13.float() * s13[..., None], w2.float() * s2[..., None]
        group13, group2 = k, n
    else:
        rows = -(-n // block[0])
        d13 = torch.stack([
            torch.cat([dequantize_tiles(w13[e, :n], s13[e, :rows], *block),
                       dequantize_tiles(w13[e, n:], s13[e, rows:], *block)])
            for e in range(num_experts)
        ])  # fmt: skip
        d2 = torch.stack([dequantize_tiles(w2[e], s2[e], *block) for e in range(num_experts)])
        group13 = group2 = block[1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    ids, weights = inputs["topk_ids"].cpu(), inputs["topk_weights"].cpu()
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            gate = _projection(x[m : m + 1], d13[e, :n], group13, dtype, scales.w13_input).float()
            up = _projection(x[m : m + 1], d13[e, n:], group13, dtype, scales.w13_input).float()
            h = (F.silu(gate) * up).to(dtype)
            out[m] += float(weights[m, j]) * _projection(h, d2[e], group2, dtype, scales.w2_input)[0].float()
    return out.to(dtype)


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, min_fraction: float = 0.75) -> None:
    """Most rows (tokens) within `rtol` of the reference (relative norm), every row within 0.1.

    An fp8 MoE quantizes the activation output of each expert: where two implementations sum in another order, an
    intermediate value may round to the neighbouring e4m3 step (an eighth of its size) in one of them, which moves
    that token's output by up to a few %. Such flips are rare and isolated, so a wrong scale or group, which moves
    every token, still fails both bounds."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite values in the MoE output"
    diff = (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-30)
    close = float((diff <= rtol).float().mean())
    assert close >= min_fraction, f"{close:.0%} of the rows within {rtol:g} (need {min_fraction:.0%}): {diff}"
    assert float(diff.max()) < 0.1, f"a row is {float(diff.max()):.3g} of its norm away: {diff}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite values in the MoE output"
    return float((out.float() - ref.float()).norm() / ref.float().norm())
