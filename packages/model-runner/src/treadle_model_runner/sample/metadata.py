"""SamplingMetadata: one step's per-request sampling parameters, as device tensors.

Built once per step on the host from per-request data (`SamplingMetadata.build`), then read by the sampler
without any further host work. Everything the sampler touches per token is a device tensor; per-request Python
loops happen only here, while building.

Invariants:
- row i of every [B] / [B, V] tensor is request i of the batch, in the order of the logits rows;
- a tensor is None exactly when no request of the batch needs that step (the sampler then skips it), so the
  common "all greedy, no penalties" batch costs one argmax;
- greedy rows (temperature <= 1e-5) hold temperature 1.0, top_k V, top_p 1 and min_p 0: their logits are
  neither scaled nor truncated (the argmax would not change anyway);
- top_k holds vocab_size where a request has no top-k; min_p 0 and top_p 1 mean off;
- token ids in allowed_token_ids, logit_bias and bad words are checked against vocab_size here (ValueError);
  stop token ids outside the vocabulary cannot be sampled anyway and are ignored;
- a seeded request's noise depends only on (seed, position), see `gumbel.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from treadle_model_runner.sample.penalties import build_token_counts
from treadle_model_runner.sampling_params import SamplingParams, num_top_logprobs

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass(slots=True)
class SamplingMetadata:
    num_reqs: int  # B, rows of the logits
    vocab_size: int  # V, columns of the logits
    all_greedy: bool  # every row is greedy: the sampler is one argmax (plus logprobs)
    all_random: bool  # no row is greedy
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows
    is_greedy: torch.Tensor | None  # [B] bool; None when all_greedy or all_random
    top_p: torch.Tensor | None  # [B] float32 in (0, 1]; None when no row uses top-p
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V = off; None when no row uses top-k
    max_top_k: int  # largest top-k below V in the batch (0 when top_k is None): sizes torch.topk
    min_p: torch.Tensor | None  # [B] float32 in [0, 1]; None when no row uses min-p
    # seeded requests: their rows and the (seed, position) key of their noise
    seeded_rows: torch.Tensor | None  # [S] int64 row indices; None when no row is seeded
    seed_lo: torch.Tensor | None  # [S] int64: low 32 bits of the seed (as an unsigned 64-bit value)
    seed_hi: torch.Tensor | None  # [S] int64: high 32 bits of the seed
    positions: torch.Tensor | None  # [S] int64: index in the full sequence of the token being sampled
    generator: torch.Generator | None  # RNG for unseeded rows (None = torch's default generator)
    # penalties (vLLM semantics): presence/frequency on output tokens, repetition on prompt + output
    no_penalties: bool  # no row has a penalty: skip the step
    presence_penalty: torch.Tensor | None  # [B] float32, subtracted once per token present in the output
    frequency_penalty: torch.Tensor | None  # [B] float32, subtracted per occurrence in the output
    repetition_penalty: torch.Tensor | None  # [B] float32; logit / p if > 0 else logit * p, on seen tokens
    output_token_counts: torch.Tensor | None  # [B, V] float32: occurrences of each token in the output
    seen_token_mask: torch.Tensor | None  # [B, V] bool: token occurs in the prompt or the output
    # masks and bias, applied before penalties
    allowed_mask: (
        torch.Tensor | None
    )  # [B, V] bool: True where a token is NOT allowed (rows without a list: all False)
    # flat indices row * V + token of tokens set to -inf: bad words, and stop tokens below min_tokens
    banned_indices: torch.Tensor | None  # [M] int64
    bias_indices: torch.Tensor | None  # [N] int64 flat indices row * V + token of logit_bias entries
    bias_values: torch.Tensor | None  # [N] float32 values added there
    # logprobs
    num_logprobs: list[int]  # per row: top logprobs asked for, -1 = none, vocab_size = the whole vocabulary
    max_num_logprobs: int  # max of num_logprobs; -1 = no row wants logprobs

    @property
    def no_truncation(self) -> bool:
        """No row uses min-p, top-k or top-p."""
        return self.min_p is None and self.top_k is None and self.top_p is None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int] | np.ndarray],
        output_ids: Sequence[Sequence[int] | np.ndarray],
        positions: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> SamplingMetadata:
        """Metadata for one step. Row i: request i with its prompt, output so far and sampling position.

        Token rows may be lists or numpy int arrays. `positions[i]` is the index in the full sequence of the token being sampled (normally
        len(prompt) + len(output)). Raises ValueError when a token id of a request is outside [0, vocab_size).
        """
        num_reqs = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(positions) == num_reqs):
            raise ValueError(
                f"SamplingMetadata.build needs one entry per request: got {num_reqs} params, "
                f"{len(prompt_ids)} prompts, {len(output_ids)} outputs and {len(positions)} positions"
            )
        dev = torch.device(device)

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(dev, non_blocking=True)

        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)
        temperature = f32([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)])
        is_greedy = None if all_greedy or all_random else torch.tensor(greedy, dtype=torch.bool).to(dev)

        random_params = [p for p, g in zip(params, greedy, strict=True) if not g]
        # greedy rows take the "off" value: their logits are not truncated (argmax would not change anyway)
        top_p = None
        if any(p.top_p < 1.0 for p in random_params):
            top_p = f32([1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)])
        top_k = None
        max_top_k = max((p.top_k for p in random_params if 0 < p.top_k < vocab_size), default=0)
        if max_top_k > 0:
            top_k = i64(
                [
                    p.top_k if 0 < p.top_k < vocab_size and not g else vocab_size
                    for p, g in zip(params, greedy, strict=True)
                ]
            )
        min_p = None
        if any(p.min_p > 0.0 for p in random_params):
            min_p = f32([0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)])

        seeded = seeded_indices(params)
        seeded_rows = seed_lo = seed_hi = seeded_pos = None
        if seeded:
            seed_bits = [int(params[i].seed) & _MASK64 for i in seeded]  # type: ignore[arg-type]
            seeded_rows = i64(seeded)
            seed_lo = i64([s & _MASK32 for s in seed_bits])
            seed_hi = i64([s >> 32 for s in seed_bits])
            seeded_pos = i64([positions[i] for i in seeded])

        penalized = [p.needs_penalties for p in params]
        no_penalties = not any(penalized)
        presence = frequency = repetition = counts = seen = None
        if not no_penalties:
            presence = f32([p.presence_penalty for p in params])
            frequency = f32([p.frequency_penalty for p in params])
            repetition = f32([p.repetition_penalty for p in params])
            counts, seen = build_token_counts(
                [list(out) if pen else [] for out, pen in zip(output_ids, penalized, strict=True)],
                [
                    list(pr) if p.repetition_penalty != 1.0 else []
                    for pr, p in zip(prompt_ids, params, strict=True)
                ],
                vocab_size,
                dev,
            )

        allowed_mask = _build_allowed_mask(params, vocab_size, dev)
        banned = banned_pairs(params, output_ids, vocab_size)
        banned_indices = i64([r * vocab_size + c for r, c in banned]) if banned else None
        bias = bias_triples(params, vocab_size)
        bias_indices = i64([r * vocab_size + c for r, c, _ in bias]) if bias else None
        bias_values = f32([v for _, _, v in bias]) if bias else None

        num_logprobs = [num_top_logprobs(p.logprobs, vocab_size) for p in params]
        return cls(
            num_reqs=num_reqs,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=temperature,
            is_greedy=is_greedy,
            top_p=top_p,
            top_k=top_k,
            max_top_k=max_top_k,
            min_p=min_p,
            seeded_rows=seeded_rows,
            seed_lo=seed_lo,
            seed_hi=seed_hi,
            positions=seeded_pos,
            generator=generator,
            no_penalties=no_penalties,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            output_token_counts=counts,
            seen_token_mask=seen,
            allowed_mask=allowed_mask,
            banned_indices=banned_indices,
            bias_indices=bias_indices,
            bias_values=bias_values,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(num_logprobs, default=-1),
        )


def seeded_indices(params: Sequence[SamplingParams]) -> list[int]:
    """Rows whose noise is keyed by (seed, position): seeded requests that sample (greedy ones take the argmax)."""
    return [i for i, p in enumerate(params) if p.seed is not None and not p.is_greedy]


def _check_token(field: str, token: int, row: int, vocab_size: int) -> None:
    if not 0 <= token < vocab_size:
        raise ValueError(
            f"{field} of request {row} contains token id {token}, outside the vocabulary [0, {vocab_size}); "
            f"remove it or use a token id below {vocab_size}"
        )


def _build_allowed_mask(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    pair_rows: list[int] = []
    pair_cols: list[int] = []
    for i in rows:
        for t in params[i].allowed_token_ids or ():
            _check_token("allowed_token_ids", t, i, vocab_size)
            pair_rows.append(i)
            pair_cols.append(t)
    mask = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)  # [B, V]
    mask[torch.tensor(rows, device=device)] = True
    mask[torch.tensor(pair_rows, device=device), torch.tensor(pair_cols, device=device)] = False
    return mask


def banned_pairs(
    params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int] | np.ndarray], vocab_size: int
) -> list[tuple[int, int]]:
    """(row, token) pairs that must not be sampled this step: bad words, and stop tokens before min_tokens."""
    banned: list[tuple[int, int]] = []
    for i, (p, out) in enumerate(zip(params, output_ids, strict=True)):
        if p.min_tokens > 0 and len(out) < p.min_tokens:
            banned.extend((i, t) for t in sorted(p.all_stop_token_ids) if 0 <= t < vocab_size)
        for word in p.bad_words_token_ids or ():
            if not word:
                continue
            for t in word:
                _check_token("bad_words_token_ids", t, i, vocab_size)
            prefix = word[:-1]
            if len(prefix) <= len(out) and list(out[len(out) - len(prefix) :]) == list(prefix):
                banned.append((i, word[-1]))
    return banned


def bias_triples(params: Sequence[SamplingParams], vocab_size: int) -> list[tuple[int, int, float]]:
    triples: list[tuple[int, int, float]] = []
    for i, p in enumerate(params):
        for t, v in (p.logit_bias or {}).items():
            _check_token("logit_bias", t, i, vocab_size)
            triples.append((i, t, v))
    return triples
