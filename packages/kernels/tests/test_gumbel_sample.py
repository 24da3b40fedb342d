"""``gumbel_sample`` (temperature, hashed exponential noise and row argmax in one pass) against a numpy model of
the same arithmetic, and its samples against softmax(logits / T). CPU: Triton's interpreter; GPU (``-m gpu``):
Llama-3's 128,256 logits at 512 rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ir_providers import DEVICE, gpu, needs_cuda

from treadle_kernels.ops.gumbel import gumbel_sample

pytest.importorskip("triton")


def _fmix32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))


def _scores(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """logits / T - log(max(-log U, 1e-30)) [B, V], U from the keyed hash, in numpy uint32 / torch float32."""
    vocab = np.arange(logits.shape[1], dtype=np.uint32)[None, :]
    k = keys.cpu().numpy().astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _fmix32(_fmix32(vocab ^ k[:, :1]) + k[:, 1:])
    u = torch.from_numpy(((h >> np.uint32(9)).astype(np.float32) + 0.5) * np.float32(1.0 / 8388608.0))
    noise = (-torch.log(u)).clamp_min(1e-30)
    x = logits.cpu().float() / temperature.cpu()[:, None]
    return x - torch.log(noise)


def _assert_argmax(got: torch.Tensor, scores: torch.Tensor) -> None:
    """``got`` is each row's argmax of ``scores``; a different index only where its score ties the maximum to
    float rounding (the logs may round differently on another device)."""
    got = got.cpu()
    want = scores.argmax(dim=-1)
    picked = scores.gather(1, got[:, None])[:, 0]
    best = scores.gather(1, want[:, None])[:, 0]
    assert ((got == want) | ((best - picked).abs() <= 1e-5 * best.abs().clamp_min(1.0))).all(), (got, want)
    assert (got == want).float().mean() >= 0.99


def _keys(gen: torch.Generator, rows: int) -> torch.Tensor:
    return torch.randint(0, 2**32, (rows, 2), generator=gen, dtype=torch.int64)


@pytest.mark.parametrize(("rows", "vocab", "dtype"), [(5, 300, torch.float32), (3, 2500, torch.bfloat16)])
def test_matches_the_numpy_model(rows: int, vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.2
    keys = _keys(gen, rows)
    got = gumbel_sample(logits.to(DEVICE), temperature.to(DEVICE), keys.to(DEVICE))
    _assert_argmax(got, _scores(logits, temperature, keys))


def test_samples_follow_the_softmax() -> None:
    """1,500 rows with the same 6 logits and fresh keys: token frequencies within 5 standard errors of softmax(x/T)
    (a sign or scale error in the noise or the temperature moves them by far more)."""
    rows, gen = 1500, torch.Generator().manual_seed(7)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(rows, 1)
    temperature = torch.full((rows,), 0.7)
    got = gumbel_sample(logits.to(DEVICE), temperature.to(DEVICE), _keys(gen, rows).to(DEVICE)).cpu()
    freq = torch.bincount(got, minlength=6).double() / rows
    p = torch.softmax(logits[0].double() / 0.7, dim=0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-9).all(), (freq, p)


@gpu
@needs_cuda
def test_gpu_llama_vocab() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(512, 128256, generator=gen) * 3).to(torch.bfloat16)
    temperature = torch.rand(512, generator=gen) + 0.5
    keys = _keys(gen, 512)
    got = gumbel_sample(logits.cuda(), temperature.cuda(), keys.cuda())
    _assert_argmax(got, _scores(logits, temperature, keys))
