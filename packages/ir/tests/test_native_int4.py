"""The W4A16 op's native spec against references written differently: packing bit by bit in Python integers, and
float64 matmuls of a weight dequantized element by element."""

from __future__ import annotations

import pytest
import torch

from treadle_ir import ops
from treadle_ir.ops.int4 import dequantize_int4, pack_int4_rows, unpack_int4_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _packed_by_hand(q: torch.Tensor) -> torch.Tensor:
    """q [k, n] -> int32 [k / 8, n], one Python integer per word (two's complement above 2^31)."""
    k, n = q.shape
    words = []
    for i in range(k // 8):
        row = []
        for c in range(n):
            word = 0
            for j in range(8):
                word |= int(q[8 * i + j, c]) << (4 * j)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


def test_packing_is_eight_rows_per_word_lowest_bits_first() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 7), generator=gen)
    q[:8, 0] = 15  # a word with its top bit set: negative as int32
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (4, 7)
    assert torch.equal(packed, _packed_by_hand(q))
    assert int(packed[0, 0]) == -1
    assert torch.equal(unpack_int4_rows(packed), q.to(torch.int32))


def _dequantized_by_hand(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, groups: list[int]
) -> torch.Tensor:
    """float64 W [n, k]: W[c, r] = (q[r, c] - z[g(r), c]) * s[g(r), c], column by column."""
    k, n = q.shape
    w = torch.empty(n, k, dtype=torch.float64)
    for r in range(k):
        g = groups[r]
        z = zeros[g].double() if zeros is not None else 8.0
        w[:, r] = (q[r].double() - z) * scales[g].double()
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["grouped", "per-channel", "symmetric", "act-order"])
def test_w4a16_linear_is_x_times_the_dequantized_weight(dtype: torch.dtype, case: str) -> None:
    gen = torch.Generator().manual_seed(len(case))
    k, n, group_size = 48, 13, 16
    if case == "per-channel":
        group_size = k
    num_groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen)
    # 16-bit values (a checkpoint's), so (q - z) * s is exact in fp32 whatever the model dtype
    scales = (torch.rand(num_groups, n, generator=gen) * 0.1 + 0.01).to(torch.float16).to(dtype)
    zeros = (
        None if case == "symmetric" else torch.randint(0, 17, (num_groups, n), generator=gen).to(torch.uint8)
    )
    g_idx = None
    groups = [r // group_size for r in range(k)]
    if case == "act-order":  # GPTQ's desc_act: groups follow a permutation of the rows
        perm = torch.randperm(k, generator=gen)
        g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
        groups = [int(g) for g in g_idx]
    x = torch.randn(2, 3, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    weight = _dequantized_by_hand(q, scales, zeros, groups)
    packed = pack_int4_rows(q)
    assert torch.equal(dequantize_int4(packed, scales, zeros, g_idx, group_size).double(), weight.t())
    got = ops.w4a16_linear(x, packed, scales, zeros, g_idx, bias, group_size)
    expected = x.double() @ weight.t() + bias.double()
    assert got.dtype == dtype and got.shape == (2, 3, n)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), expected, **tol)
    no_bias = ops.w4a16_linear(x, packed, scales, zeros, g_idx, None, group_size)
    torch.testing.assert_close(no_bias.double(), x.double() @ weight.t(), **tol)


def test_fake_tensor_shapes() -> None:
    """The spec doubles as the fake function (torch.compile traces it): the output shape from meta tensors."""
    x = torch.empty(5, 64, device="meta", dtype=torch.bfloat16)
    packed = torch.empty(8, 24, device="meta", dtype=torch.int32)
    scales = torch.empty(2, 24, device="meta", dtype=torch.bfloat16)
    zeros = torch.empty(2, 24, device="meta", dtype=torch.uint8)
    out = ops.w4a16_linear.native(x, packed, scales, zeros, None, None, 32)
    assert out.shape == (5, 24) and out.dtype == torch.bfloat16
