"""``argmax_rows``'s native spec against a plain-Python reference, its schema and fake, and its compile lowering."""

from __future__ import annotations

import math

import pytest
import torch

from treadle_ir import lowering, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF, NAN = math.inf, math.nan


def _first_max(row: list[float]) -> int:
    """The spec written out: the first NaN if any, else the first index holding the largest value."""
    for i, v in enumerate(row):
        if math.isnan(v):
            return i
    best = 0
    for i, v in enumerate(row):
        if v > row[best]:
            best = i
    return best


SPECIAL_ROWS = [
    [1.0, 3.0, 3.0, 2.0],  # tie: first
    [-INF, -INF, -INF, -INF],  # all -inf: 0
    [1.0, NAN, 5.0, NAN],  # NaN beats everything: first NaN
    [INF, 2.0, NAN, INF],  # NaN beats +inf
    [-INF, -INF, -3.0, -INF],
    [-1.0, -0.0, 0.0, -2.0],  # signed zeros tie
    [INF, 1.0, INF, 2.0],  # +inf ties: first
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_special_rows(dtype: torch.dtype) -> None:
    logits = torch.tensor(SPECIAL_ROWS, dtype=dtype)
    got = ops.argmax_rows(logits)
    assert got.dtype == torch.int64 and got.shape == (len(SPECIAL_ROWS),)
    assert got.tolist() == [_first_max(row) for row in SPECIAL_ROWS] == [1, 0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 300])
def test_argmax_rows_random(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=gen).to(dtype)
    logits[1, vocab // 2 :] = logits[1].max() + 1  # a run of ties
    logits[2, vocab - 1] = NAN
    logits[3] = -INF
    logits[4, :: max(1, vocab // 3)] = INF
    rows = logits.float().tolist()  # exact: every dtype here widens to fp32 without rounding
    assert ops.argmax_rows(logits).tolist() == [_first_max(row) for row in rows]
    column_slice = torch.cat((logits, logits), dim=-1)[:, 1 : vocab + 1]  # strided rows
    expected = [_first_max(row) for row in column_slice.float().tolist()]
    assert ops.argmax_rows(column_slice).tolist() == expected


def test_argmax_rows_schema_fake_and_lowering() -> None:
    assert str(torch.ops.treadle_ir.argmax_rows.default._schema).endswith("(Tensor logits) -> Tensor")
    fake = torch.ops.treadle_ir.argmax_rows(torch.empty(3, 128256, device="meta"))
    assert fake.shape == (3,) and fake.dtype == torch.int64
    logits = torch.randn(4, 100)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.argmax_rows(x) + 1, backend=lowering.make_backend("aot_eager"))
    assert torch.equal(compiled(logits), torch.argmax(logits, dim=-1) + 1)
    assert [(r.op, r.provider, r.inlined) for r in lowering.last_lowering] == [
        ("argmax_rows", "native", True)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_top", [0, 1, 4])
def test_token_logprobs_against_the_spec_in_python(num_top: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_top)
    logits = (torch.randn(5, 40, generator=gen) * 3).to(dtype)
    logits[1, 7:30] = -INF  # a truncated row
    logits[2, [3, 9]] = logits[2].max() + 1  # the token ties for first: rank 2
    tokens = torch.tensor([0, 5, 9, 39, int(logits[4].argmax())])
    ids, values, ranks = ops.token_logprobs(logits, tokens, num_top)
    assert ids.shape == values.shape == (5, num_top + 1) and values.dtype == torch.float32
    for row, x in enumerate(logits.float().double().tolist()):
        lse = math.log(sum(math.exp(v) for v in x if v != -INF))
        token = int(tokens[row])
        assert ranks[row].item() == sum(v >= x[token] for v in x)
        order = sorted(range(len(x)), key=lambda t: -x[t])[:num_top]
        if row == 2:  # the planted tie: either id may come first
            assert ids[row, 0].item() == token and set(ids[row, 1:3].tolist()) <= {3, 9}
        else:
            assert ids[row].tolist() == [token, *order]  # random logits: no ties among the top
        want = [x[t] - lse for t in [token, *order]]
        assert values[row].tolist() == pytest.approx(want, abs=1e-5)
    assert ranks[2].item() == 2 and ranks[4].item() == 1


def test_token_logprobs_schema_and_fake() -> None:
    schema = str(torch.ops.treadle_ir.token_logprobs.default._schema)
    assert schema.endswith("(Tensor logits, Tensor token_ids, SymInt num_top) -> (Tensor, Tensor, Tensor)")
    ids, values, ranks = torch.ops.treadle_ir.token_logprobs(
        torch.empty(3, 128256, device="meta"), torch.empty(3, dtype=torch.int64, device="meta"), 5
    )
    assert ids.shape == values.shape == (3, 6) and ranks.shape == (3,)
    assert (ids.dtype, values.dtype, ranks.dtype) == (torch.int64, torch.float32, torch.int64)
