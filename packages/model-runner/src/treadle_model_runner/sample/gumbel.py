"""Gumbel-max sampling, with noise for seeded requests keyed by (seed, position) only.

Theory. If E_v ~ Exp(1) are independent, argmax_v (logit_v - log E_v) is distributed as softmax(logits): it is
the Gumbel-max trick (-log E is standard Gumbel). Masked tokens (-inf) can never win. Sampling is then one
elementwise pass and one argmax, with no softmax, no cumsum and no host sync.

Seeded rows. Their E_v comes from a counter-based hash, not from a stateful RNG: a 64-bit key is derived from
(seed, position) and each vocabulary index v is hashed with it, U = hash(key, v) in (0, 1), E = -log U. So a
seeded request's token depends only on its logits, its seed and the position of the token being sampled: the
same whatever it is batched with, whatever ran before, on CPU and on GPU alike (the hash is integer arithmetic;
only the final float log can differ by an ulp between devices).

The hash is MurmurHash3's 32-bit finalizer (fmix32) in a chain: key = fmix32 over the words of seed and
position (two lanes with different start values give 64 key bits), then h = fmix32(fmix32(v ^ k0) + k1).
Everything is int64 tensor arithmetic on values below 2^32; 32-bit wrap-around multiplication is done in two
16-bit halves so that no intermediate exceeds 2^49 (no reliance on signed-overflow behaviour). U takes the top
23 bits: U = (h >> 9 + 0.5) / 2^23, which is exactly representable in float32 and lies strictly in (0, 1).

On CUDA the seeded noise comes from one fused Triton kernel with the same hash (gumbel_triton.py); this file's
torch version is the reference and the CPU path.

Unseeded rows draw E from torch's RNG (`exponential_` on CUDA, -log of `uniform_` on CPU; optionally with a
generator).

By default (TREADLE_FUSED_GUMBEL=1), a CUDA batch that only samples takes `treadle_kernels.ops.gumbel.gumbel_sample`:
one Triton pass over the logits (temperature, noise, argmax) keyed per row by `gumbel_keys`: seeded rows get the
keys above (the same tokens as this file's path, up to float rounding of the logs), the others two random 32-bit
words from torch's RNG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from treadle_ir import ops
from treadle_model_runner.sample.gumbel_triton import seeded_noise_triton, triton_available

if TYPE_CHECKING:
    from treadle_model_runner.sample.metadata import SamplingMetadata

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_C1 = 0x85EBCA6B  # fmix32 multipliers
_C2 = 0xC2B2AE35
_LANE_A = 0x9E3779B9  # start values of the two key lanes
_LANE_B = 0x7F4A7C15
_TINY = 1.0e-30  # floor for exponential noise: log(0) would let a masked token win


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without any intermediate above 2^49."""
    lo, hi = c & _M16, c >> 16
    return (x * lo + (((x * hi) & _M16) << 16)) & _M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finalizer on int64 tensors holding 32-bit values; a bijection on [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def derive_keys(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row ([S] int64 each) from the seed words and the sampling position."""
    pos_lo = positions & _M32
    pos_hi = (positions >> 32) & _M32
    k0 = torch.full_like(seed_lo, _LANE_A)
    k1 = torch.full_like(seed_lo, _LANE_B)
    for word in (seed_lo, seed_hi, pos_lo, pos_hi):
        k0 = fmix32(k0 ^ word)
        k1 = fmix32((k1 + word) & _M32)
    return k0, k1


def seeded_uniform(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """U [S, V] float32 in (0, 1): a pure function of (seed, position, vocabulary index)."""
    k0, k1 = derive_keys(seed_lo, seed_hi, positions)
    v = torch.arange(vocab_size, dtype=torch.int64, device=seed_lo.device).unsqueeze(0)  # [1, V]
    h = fmix32(v ^ k0.unsqueeze(1))  # [S, V]
    h = fmix32((h + k1.unsqueeze(1)) & _M32)
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def exponential_noise(
    num_reqs: int,
    vocab_size: int,
    device: torch.device,
    seeded_rows: torch.Tensor | None,
    seed_lo: torch.Tensor | None,
    seed_hi: torch.Tensor | None,
    positions: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """E [B, V] float32 > 0, Exp(1): hashed for seeded rows, from torch's RNG for the others."""
    noise = torch.empty(num_reqs, vocab_size, dtype=torch.float32, device=device)  # [B, V]
    if seeded_rows is None or seeded_rows.numel() < num_reqs:
        if noise.is_cuda:
            noise.exponential_(generator=generator)
        else:  # on CPU, -log(U) is several times faster than exponential_ (which runs on one thread)
            noise.uniform_(generator=generator).log_().neg_()
    if seeded_rows is not None:
        assert seed_lo is not None and seed_hi is not None and positions is not None, "seeded rows need keys"
        if noise.is_cuda and triton_available():
            seeded_noise_triton(noise, seeded_rows, seed_lo, seed_hi, positions)
        else:
            noise[seeded_rows] = -torch.log(seeded_uniform(seed_lo, seed_hi, positions, vocab_size))
    return noise.clamp_min_(_TINY)


def gumbel_keys(md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """[B, 2] int64 32-bit hash keys: derived from (seed, position) on seeded rows, random (``md.generator``) on
    the others."""
    keys = torch.randint(
        0, 1 << 32, (md.num_reqs, 2), dtype=torch.int64, device=device, generator=md.generator
    )
    if md.seeded_rows is not None:
        assert md.seed_lo is not None and md.seed_hi is not None and md.positions is not None, (
            "seeded rows need keys"
        )
        keys[md.seeded_rows] = torch.stack(derive_keys(md.seed_lo, md.seed_hi, md.positions), dim=1)
    return keys


def gumbel_max(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(logits - log E) [B] int64: a sample of softmax(logits) per row."""
    return ops.argmax_rows(logits - noise.log())
