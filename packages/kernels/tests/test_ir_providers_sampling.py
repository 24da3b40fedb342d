"""The Triton provider of ``argmax_rows`` against its native spec (``torch.argmax(logits, dim=-1)``), exactly.

Each batch cycles through row kinds that exercise the spec's corners: random logits, the maximum planted at
several positions (first wins, across chunks too), NaN (first NaN wins, over ``+inf``, either sign), all
``-inf`` (index 0), signed zeros as the maximum (they tie), ``+inf`` ties. CPU: Triton's interpreter at small
vocab sizes and one multi-chunk size; GPU (``-m gpu``): Llama-3's 128,256 logits at batch 1 and 64.
"""

from __future__ import annotations

import pytest
import torch
from test_ir_providers import DEVICE, DTYPES, _gen, _randn, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_kernels.ops.sampling import CHUNK, MAX_VOCAB

pytest.importorskip("triton")

NUM_KINDS = 6  # row r of a batch is of kind r % NUM_KINDS (see _logits)


def _nan(dtype: torch.dtype, negative: bool) -> torch.Tensor:
    """A NaN of ``dtype`` with its sign bit set or clear (torch's casts may drop a NaN's sign)."""
    nan = torch.full((1,), float("nan"), dtype=dtype, device=DEVICE)
    bits = nan.view(torch.int16 if dtype.itemsize == 2 else torch.int32)
    return (bits | torch.iinfo(bits.dtype).min).view(dtype) if negative else nan


def _logits(
    num_rows: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[int | None]]:
    """Logits [num_rows, vocab] of cycling row kinds, and the index each special row must yield (None: random)."""
    gen = _gen(seed)
    x = _randn(gen, num_rows, vocab, dtype=dtype) * 4
    want: list[int | None] = []
    for row in range(num_rows):
        kind = row % NUM_KINDS
        picks = torch.randperm(vocab, generator=gen, device=DEVICE)[:3].tolist()
        if kind == 0:  # random
            want.append(None)
            continue
        if kind == 1:  # ties: the same largest value at up to 4 places, one in the last (partial) chunk
            positions = [*picks, vocab - 1]
            x[row, positions] = x[row].max() + 1
        elif kind == 2:  # NaN of either sign at up to 3 places; +inf before them does not win
            positions = picks
            x[row, 0] = float("inf")
            for i, p in enumerate(positions):
                x[row, p] = _nan(dtype, negative=i % 2 == 0)
        elif kind == 3:  # all -inf: index 0
            positions = [0]
            x[row] = float("-inf")
        elif kind == 4:  # all negative but -0.0 and +0.0, which tie
            positions = picks[:2]
            x[row] = -x[row].abs() - 1
            x[row, positions[0]] = -0.0
            if len(positions) > 1:
                x[row, positions[1]] = 0.0
        else:  # +inf ties among -inf
            positions = picks[:2]
            x[row] = float("-inf")
            x[row, positions] = float("inf")
        want.append(min(positions))
    return x, want


def _check(logits: torch.Tensor, want: list[int | None]) -> None:
    expected = ops.argmax_rows.native(logits)
    for row, index in enumerate(want):
        assert index is None or expected[row].item() == index, (
            f"row {row}: torch.argmax disagrees with the spec"
        )
    with _triton(ops.argmax_rows, logits):
        got = ops.argmax_rows(logits)
    assert got.dtype == torch.int64 and got.shape == (logits.shape[0],)
    wrong = (got != expected).nonzero().flatten().tolist()
    assert not wrong, f"rows {wrong}: got {got[wrong].tolist()}, expected {expected[wrong].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("num_rows", [1, 3, 17])
def test_argmax_rows(num_rows: int, vocab: int, dtype: torch.dtype) -> None:
    _check(*_logits(num_rows, vocab, dtype, seed=num_rows * 7919 + vocab))


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_many_chunks(dtype: torch.dtype) -> None:
    """32,003 logits: 32 chunks, the last one partial; ties and NaNs land in different chunks."""
    vocab = 32003
    assert vocab > 8 * CHUNK and vocab % CHUNK
    _check(*_logits(NUM_KINDS, vocab, dtype, seed=3))


def test_argmax_rows_on_column_slice() -> None:
    """Rows strided by a wider buffer and starting at an offset (a slice of padded logits)."""
    wide, _ = _logits(2 * NUM_KINDS, 1300, torch.float32, seed=5)
    logits = wide[:, 3:1203]
    assert logits.stride(0) == 1300 and not logits.is_contiguous()
    _check(logits, [None] * logits.shape[0])


def test_argmax_rows_empty_batch() -> None:
    logits = torch.randn(0, 50, device=DEVICE)
    with _triton(ops.argmax_rows, logits):
        got = ops.argmax_rows(logits)
    assert got.shape == (0,) and got.dtype == torch.int64


def test_triton_declines_what_it_cannot_read() -> None:
    for logits, why in (
        (torch.randn(2, 3, 8, device=DEVICE), "[B, V]"),
        (torch.randn(8, 2, device=DEVICE).t(), "strided"),
        (torch.randint(0, 9, (2, 8), device=DEVICE), "dtype"),
        (torch.randn(2, 0, device=DEVICE), "vocab size 0"),
        (torch.empty(1, MAX_VOCAB + 1, device=DEVICE), f"outside [1, {MAX_VOCAB}]"),
    ):
        with ops.argmax_rows.priority(["triton"]):
            chosen, skipped = ops.argmax_rows.explain(logits)
        assert chosen.name == "native" and why in skipped["triton"], skipped


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows", [1, 64])
def test_argmax_rows_gpu(num_rows: int, dtype: torch.dtype) -> None:
    vocab = 128256  # Llama-3
    _check(*_logits(num_rows, vocab, dtype, seed=num_rows))
    if num_rows == 1:  # batch 1 gets no special row from _logits; run every kind alone
        specials, want = _logits(NUM_KINDS, vocab, dtype, seed=11)
        for row in range(NUM_KINDS):
            _check(specials[row : row + 1], want[row : row + 1])
