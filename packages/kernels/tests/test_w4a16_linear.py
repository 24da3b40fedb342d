"""The ``w4a16_linear`` providers (ops/w4a16_linear.py, ops/w4a16_host.py) against the IR spec
(treadle_ir.ops.int4) on fresh random inputs.

CPU: Triton's interpreter runs the kernel at small, ragged sizes (n and k not multiples of the tiles, rows not a
multiple of the row tile), asymmetric (zeros) and symmetric, grouped, per channel and act order (g_idx), with and
without bias, through the op's dispatch (the production tiles, split K included) and through `launch` with tiles that
reach each path: split K 1 / 3, both ways of unpacking (EXPAND), one group per step and a gather per row (a group size
no step divides). The host provider runs in fp32 and bf16. GPU (``-m gpu``): Llama-3.1-8B's projections at 1 to 1024
rows. Tolerance: one rounding of the output (under the interpreter, which truncates to bf16, one bf16 step); on the GPU
bf16 rows may also round the dequantized weight (act order; every layout from dequant_min_rows() rows), 4e-3 relative.
"""

from __future__ import annotations

import pytest
import torch
from test_ir_providers import CUDA, DEVICE, _gen, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the providers)
from treadle_ir import ops
from treadle_ir.ops.int4 import pack_int4_rows
from treadle_kernels.ops import w4a16_linear as provider

pytest.importorskip("triton")


def _inputs(
    rows: int, n: int, k: int, group_size: int, dtype: torch.dtype, seed: int, zeros: bool = True,
    act_order: bool = False, bias: bool = True,
) -> tuple:  # fmt: skip
    """(x, packed_weight, scales, zeros, g_idx, bias, group_size) with weights of a realistic size (~ k^-0.5)."""
    gen = _gen(seed)
    num_groups = -(-k // group_size)
    q = torch.randint(0, 16, (k, n), generator=gen, device=DEVICE)
    spread = torch.rand(num_groups, n, generator=gen, device=DEVICE) + 0.5
    scales = (spread * (0.3 * k**-0.5)).to(dtype)
    z = torch.randint(0, 17, (num_groups, n), generator=gen, device=DEVICE).to(torch.uint8) if zeros else None
    g_idx = None
    if act_order:  # GPTQ's desc_act: group r of the rows in a permuted order
        perm = torch.randperm(k, generator=gen, device=DEVICE)
        g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
    x = torch.randn(rows, k, generator=gen, device=DEVICE).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, pack_int4_rows(q), scales, z, g_idx, b, group_size


def _close(got: torch.Tensor, expected: torch.Tensor, weight_rounded: bool = False) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.float().abs().max().item()
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
        return
    step = 2**-7 if expected.dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * step, atol=2 * step * scale)
    err = (got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    bound = (4e-3 if weight_rounded else 2e-3) if CUDA else step
    assert err.item() <= bound, f"relative error {err.item():.3g} > {bound:.3g}"


CASES = {  # name: (n, k, group_size, zeros, act_order)
    "grouped": (45, 192, 64, True, False),
    "grouped-ragged": (37, 200, 40, True, False),  # k past the last full step, a group no step divides
    "symmetric": (33, 128, 32, False, False),
    "per-channel": (70, 96, 96, True, False),
    "act-order": (24, 160, 32, True, True),
    "act-order-symmetric": (40, 64, 16, False, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_matches_spec(case: str, rows: int, dtype: torch.dtype) -> None:
    n, k, group, zeros, act_order = CASES[case]
    args = _inputs(rows, n, k, group, dtype, seed=n + k + rows, zeros=zeros, act_order=act_order)
    expected = ops.w4a16_linear.native(*args)
    with _triton(ops.w4a16_linear, *args):
        got = ops.w4a16_linear(*args)
    _close(got, expected)


TILES = [  # (block_m, block_n, block_k, split_k, num_warps, num_stages, expand)
    provider.Config(16, 32, 32, 1, 4, 1, 1),
    provider.Config(16, 16, 64, 3, 4, 1, 0),
    provider.Config(32, 32, 16, 2, 4, 1, 1),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "cfg", TILES, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}e{c.expand}"
)
@pytest.mark.parametrize("case", ["grouped", "grouped-ragged", "act-order"])
def test_every_tile_path_matches_spec(case: str, cfg: provider.Config, bias: bool) -> None:
    n, k, group, zeros, act_order = CASES[case]
    args = _inputs(19, n, k, group, torch.bfloat16, seed=k + cfg.block_k, zeros=zeros, act_order=act_order,
                   bias=bias)  # fmt: skip
    _close(provider.launch(*args, cfg=cfg), ops.w4a16_linear.native(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_then_matmul_matches_spec(case: str, dtype: torch.dtype) -> None:
    """The many-rows path: the weight dequantized by the Triton kernel, then one GEMM (ragged n and k, zeros or
    not, act order); the dequantized weight itself equals the spec's exactly in fp32."""
    n, k, group, zeros, act_order = CASES[case]
    args = _inputs(9, n, k, group, dtype, seed=3 * n + k, zeros=zeros, act_order=act_order)
    expected = ops.w4a16_linear.native(*args)
    with _triton(ops.w4a16_linear, *args):
        got = provider.dequant_matmul(*args)
        weight = provider.dequantize(args[1], args[2], args[3], args[4], group, torch.float32)
    eye = torch.eye(k, dtype=torch.float32, device=DEVICE)
    spec_weight = ops.w4a16_linear.native(eye, *args[1:5], None, group)  # row i: x = e_i picks weight row i
    torch.testing.assert_close(weight, spec_weight, rtol=0, atol=0)
    _close(got, expected, weight_rounded=True)


def test_many_rows_take_the_dequantize_path(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _inputs(provider.dequant_min_rows(), 40, 64, 16, torch.float32, seed=5)
    called: list[int] = []
    real = provider.dequant_matmul
    monkeypatch.setattr(provider, "dequant_matmul", lambda *a: called.append(1) or real(*a))
    with _triton(ops.w4a16_linear, *args):
        ops.w4a16_linear(*args)
        ops.w4a16_linear(args[0][:-1], *args[1:])
    assert called == [1]  # rows at the threshold take it, one row fewer runs the GEMM kernel


def test_production_tiles_split_k_for_few_rows_only() -> None:
    """A decode step's 16-row tile leaves a 4096-column projection 64 tiles: K is split to fill 132 SMs; a prefill
    tile grid is large enough alone; a step never straddles groups of 32 or 128 rows."""
    decode = provider.choose_config(1, 4096, 4096, 128, sms=132)
    assert decode.block_m == 16 and decode.split_k == 8 and decode.block_k == 128
    assert provider.choose_config(1, 28672, 4096, 128, sms=132).split_k == 1
    prefill = provider.choose_config(1024, 4096, 14336, 128, sms=132)
    assert prefill.split_k == 1 and prefill.block_m == 128
    assert provider.choose_config(8, 4096, 4096, 32, sms=132).block_k == 32


def test_leading_dims_and_strided_rows() -> None:
    """x as [2, 3, k] and as a column slice of a wider buffer (rows strided)."""
    x, *rest = _inputs(6, 24, 64, 32, torch.float32, seed=5)
    x3 = x.view(2, 3, 64)
    with _triton(ops.w4a16_linear, x3, *rest):
        got = ops.w4a16_linear(x3, *rest)
    _close(got, ops.w4a16_linear.native(x3, *rest))
    xs = torch.randn(3, 100, generator=_gen(6), device=DEVICE)[:, :64]
    with _triton(ops.w4a16_linear, xs, *rest):
        got = ops.w4a16_linear(xs, *rest)
    _close(got, ops.w4a16_linear.native(xs, *rest))


@pytest.mark.skipif(CUDA, reason="the host provider")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["grouped", "act-order-symmetric"])
def test_host_provider_matches_spec(case: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle_kernels.ops import w4a16_host

    monkeypatch.setattr(w4a16_host, "CHUNK_BYTES", 64 * 4 * 16)  # 16 columns per slice: three slices
    n, k, group, zeros, act_order = CASES[case]
    args = _inputs(
        4, n, 64 if case == "grouped" else k, group, dtype, seed=7, zeros=zeros, act_order=act_order
    )
    with ops.w4a16_linear.priority(["cpu"]):
        chosen, _ = ops.w4a16_linear.explain(*args)
        assert chosen.name == "cpu"
        got = ops.w4a16_linear(*args)
    expected = ops.w4a16_linear.native(*args)
    if dtype == torch.float32:
        _close(got, expected)
    else:  # the weight rounded to bf16, then a bf16 matmul
        torch.testing.assert_close(
            got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item()
        )


def test_declines_what_it_cannot_read() -> None:
    x, packed, scales, zeros, g_idx, bias, group = _inputs(2, 24, 64, 32, torch.float32, seed=1)
    for args, why in (
        ((x, packed.float(), scales, zeros, g_idx, bias, group), "packed_weight dtype"),
        ((x, packed[:4], scales, zeros, g_idx, bias, group), "must be [64 / 8, n]"),
        ((x, packed, scales[:1], zeros, g_idx, bias, group), "scales (1, 24) must be contiguous [2, 24]"),
        ((x, packed, scales, zeros.int(), g_idx, bias, group), "zeros dtype"),
        (
            (x, packed, scales, zeros, torch.zeros(64, dtype=torch.int64, device=DEVICE), bias, group),
            "g_idx dtype",
        ),
        ((x[:, :60], packed, scales, zeros, g_idx, bias, group), "k a multiple of 8"),
    ):
        with ops.w4a16_linear.priority(["triton"]):
            chosen, skipped = ops.w4a16_linear.explain(*args)
        assert chosen.name == "native" and why in skipped["triton"], skipped


LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (n, k): qkv, o, gate_up, down


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["asymmetric", "symmetric", "act-order"])
@pytest.mark.parametrize("rows", [1, 16, 64, 256, 1024])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_w4a16_linear_gpu(shape: tuple[int, int], rows: int, layout: str) -> None:
    """bf16 at Llama-3.1-8B's projections (fp16 at one shape), group size 128, against the spec in fp32."""
    n, k = shape
    for dtype in (torch.bfloat16, torch.float16) if n == 4096 and k == 4096 else (torch.bfloat16,):
        args = _inputs(rows, n, k, 128, dtype, seed=n + k + rows, zeros=layout == "asymmetric",
                       act_order=layout == "act-order", bias=n == 6144)  # fmt: skip
        expected = ops.w4a16_linear.native(*args)
        with _triton(ops.w4a16_linear, *args):
            got = ops.w4a16_linear(*args)
        # act order's gather path, and from dequant_min_rows() the dequantize-then-GEMM path, round the weight
        _close(got, expected, weight_rounded=layout == "act-order" or rows >= provider.dequant_min_rows())
