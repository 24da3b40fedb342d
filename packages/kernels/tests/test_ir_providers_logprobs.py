"""The Triton provider of ``token_logprobs`` against its native spec on fresh random logits.

Ranks and the token column's ids are compared exactly, logprobs within float32 rounding of the log-sum-exp. The
top columns are compared by value (largest first); among equal logprobs the spec leaves the ids' order open, so
each returned id is checked to carry its value, and a row's ids to be distinct. Rows mix plain random logits,
heavy ties (logits rounded to a coarse grid) and rows that are mostly -inf (a truncated sampler's logits, with
fewer finite entries than num_top). CPU: Triton's interpreter at small vocab sizes and a three-chunk one; GPU
(``-m gpu``): Llama-3's 128,256 logits at batch 1 and 256.
"""

from __future__ import annotations

import pytest
import torch
from test_ir_providers import DEVICE, _gen, _randn, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_kernels.ops.logprobs import CHUNK, MAX_VOCAB, TOPS

pytest.importorskip("triton")


def _logits(num_rows: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [num_rows, vocab] whose row r is random (r % 3 == 0), tied (1) or mostly -inf (2), and a token per
    row (sometimes the argmax, sometimes a -inf one)."""
    gen = _gen(seed)
    x = _randn(gen, num_rows, vocab, dtype=torch.float32) * 3
    tokens = torch.randint(0, vocab, (num_rows,), generator=gen, device=DEVICE)
    for row in range(num_rows):
        if row % 3 == 1:
            x[row] = torch.round(x[row] * 2) / 2  # many equal values, the largest among them
        elif row % 3 == 2:
            keep = torch.randperm(vocab, generator=gen, device=DEVICE)[: max(vocab // 50, 2)]
            finite = x[row, keep]
            x[row] = float("-inf")
            x[row, keep] = finite
        if row % 4 == 3:
            tokens[row] = int(x[row].argmax())
    return x.to(dtype), tokens


def _check(logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> None:
    _, values, ranks = ops.token_logprobs.native(logits, tokens, num_top)
    with _triton(ops.token_logprobs, logits, tokens, num_top):
        got_ids, got_values, got_ranks = ops.token_logprobs(logits, tokens, num_top)
    n = logits.shape[0]
    assert got_ids.shape == got_values.shape == (n, num_top + 1) and got_ranks.shape == (n,)
    assert got_ids.dtype == got_ranks.dtype == torch.int64 and got_values.dtype == torch.float32
    assert torch.equal(got_ids[:, 0], tokens) and torch.equal(got_ranks, ranks), (got_ranks, ranks)
    torch.testing.assert_close(got_values, values, atol=2e-5, rtol=1e-5)  # -inf where the spec has -inf
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = got_ids[:, 1:]
    assert bool(((top >= 0) & (top < logits.shape[1])).all()), "an id outside the vocabulary"
    torch.testing.assert_close(lp.gather(1, top), values[:, 1:], atol=2e-5, rtol=1e-5)
    for row in range(n):
        assert len(set(top[row].tolist())) == num_top, f"row {row}: repeated ids {top[row].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("num_rows", [1, 3, 7])
def test_token_logprobs(num_rows: int, vocab: int, dtype: torch.dtype) -> None:
    logits, tokens = _logits(num_rows, vocab, dtype, seed=num_rows * 7919 + vocab)
    for num_top in sorted({0, 1, min(3, vocab), min(5, vocab), min(20, vocab)}):
        _check(logits, tokens, num_top)


@pytest.mark.parametrize("num_top", [0, 5, 20])
def test_token_logprobs_many_chunks(num_top: int) -> None:
    """5,003 logits: three chunks, the last one partial and shorter than the candidates it keeps."""
    vocab = 2 * CHUNK + 907
    logits, tokens = _logits(6, vocab, torch.bfloat16, seed=num_top + 1)
    logits[0, -3:] = logits[0].max() + 1  # the row's largest logits in the partial chunk
    _check(logits, tokens, num_top)


def test_token_logprobs_on_column_slice() -> None:
    """Rows strided by a wider buffer and starting at an offset."""
    wide, _ = _logits(4, 1300, torch.float32, seed=5)
    logits = wide[:, 3:1203]
    assert logits.stride(0) == 1300 and not logits.is_contiguous()
    _check(logits, torch.tensor([0, 17, 1199, 600], device=DEVICE), 5)


def test_token_logprobs_empty_batch() -> None:
    logits, tokens = torch.randn(0, 50, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE)
    with _triton(ops.token_logprobs, logits, tokens, 5):
        ids, values, ranks = ops.token_logprobs(logits, tokens, 5)
    assert ids.shape == values.shape == (0, 6) and ranks.shape == (0,)


def test_triton_declines_what_it_cannot_read() -> None:
    tokens = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    for args, why in (
        ((torch.randn(2, 3, 8, device=DEVICE), tokens, 1), "[N, V]"),
        ((torch.randn(8, 2, device=DEVICE).t(), tokens, 1), "strided"),
        ((torch.randn(2, 8, device=DEVICE), tokens[:1], 1), "token_ids must be [2]"),
        ((torch.randn(2, 8, device=DEVICE), tokens, TOPS[-1] + 1), "num_top 21 outside"),
        ((torch.empty(1, MAX_VOCAB + 1, device=DEVICE), tokens[:1], 1), f"outside [1, {MAX_VOCAB}]"),
    ):
        with ops.token_logprobs.priority(["triton"]):
            chosen, skipped = ops.token_logprobs.explain(*args)
        assert chosen.name == "native" and why in skipped["triton"], skipped


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows", [1, 256])
def test_token_logprobs_gpu(num_rows: int, dtype: torch.dtype) -> None:
    logits, tokens = _logits(num_rows, 128256, dtype, seed=num_rows)  # Llama-3's vocabulary
    for num_top in (0, 1, 5, 20):
        _check(logits, tokens, num_top)
