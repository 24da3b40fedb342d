"""Sampling metadata for verifying draft tokens (speculative decoding): one row per position a request samples at.

A request verifying k drafts d1..dk samples at k + 1 positions in one step, and the sample at offset j must be the
very one a step without drafts would draw there once d1..dj had become the request's outputs. So the request's
row of the step's metadata (`SamplingMetadata.build` over its real outputs) becomes k + 1 consecutive rows, and
what depends on the outputs or on the position is advanced by j:
  - penalties: d1..dj are added to row j's output counts and seen tokens (requests with penalties);
  - min_tokens and bad words: decided on the host for the output of len(outputs) + j tokens that ends in d1..dj;
  - seeded noise: keyed by (seed, position + j);
the rest (temperature, min-p / top-k / top-p, allowed tokens, logit bias, logprobs asked) is the request's and is
repeated. A request without drafts keeps its one row.

The result equals `SamplingMetadata.build` over the expanded rows, each with its advanced outputs and position
(the tests compare them field by field); it is made from the per-request tensors by index_select, plus one
scatter of the drafts, instead of counting every row's whole output again. Host work is per request, and per
row only for requests with min_tokens or bad words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from treadle_model_runner.sample.metadata import SamplingMetadata, banned_pairs, bias_triples, seeded_indices
from treadle_model_runner.sampling_params import SamplingParams


def expand_for_drafts(
    md: SamplingMetadata,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int] | np.ndarray],
    drafts: Sequence[Sequence[int]],
) -> SamplingMetadata:
    """`md` (one row per request, built from `params` and `output_ids`) with request i's row repeated
    1 + len(drafts[i]) times, row j sampling as if drafts[i][:j] were outputs already (module docstring)."""
    num_reqs, vocab_size = md.num_reqs, md.vocab_size
    assert len(params) == len(output_ids) == len(drafts) == num_reqs, (
        "one params, output and draft list a row"
    )
    dev = md.temperature.device
    num_drafts = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=num_reqs)  # [R] k
    reps = num_drafts + 1  # [R] rows of each request
    first = np.cumsum(reps) - reps  # [R] its first row
    src = np.repeat(np.arange(num_reqs), reps)  # [E] request of each row
    offset = np.arange(src.size) - first[src]  # [E] j: drafts taken as outputs at that row

    def i64(values: np.ndarray) -> torch.Tensor:
        return _to_device(values, np.int64, dev)

    src_t = i64(src)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, src_t)

    seeded_rows = seed_lo = seed_hi = positions = None
    if md.seeded_rows is not None:
        assert md.seed_lo is not None and md.seed_hi is not None and md.positions is not None, "seeds unkeyed"
        slot = np.full(num_reqs, -1, dtype=np.int64)  # request -> its index among the seeded ones
        seeded = seeded_indices(params)
        slot[seeded] = np.arange(len(seeded))
        rows = np.flatnonzero(slot[src] >= 0)
        which = i64(slot[src[rows]])
        seeded_rows = i64(rows)
        seed_lo, seed_hi = md.seed_lo.index_select(0, which), md.seed_hi.index_select(0, which)
        positions = md.positions.index_select(0, which) + i64(offset[rows])

    counts = seen = None
    if not md.no_penalties:
        assert md.output_token_counts is not None and md.seen_token_mask is not None, "penalties uncounted"
        counts = md.output_token_counts.index_select(0, src_t)  # [E, V]
        seen = md.seen_token_mask.index_select(0, src_t)  # [E, V]
        penalized = np.array([p.needs_penalties for p in params], dtype=bool)
        flat = _draft_output_pairs(drafts, num_drafts * penalized, first, vocab_size)
        if flat.size:
            flat_t = i64(flat)
            counts.view(-1).index_add_(0, flat_t, torch.ones(flat.size, dtype=torch.float32, device=dev))
            seen.view(-1).index_fill_(0, flat_t, True)

    bias_indices, bias_values = _bias(params, reps, first, vocab_size, dev)
    return dataclasses.replace(
        md,
        num_reqs=int(src.size),
        temperature=md.temperature.index_select(0, src_t),
        is_greedy=take(md.is_greedy),
        top_p=take(md.top_p),
        top_k=take(md.top_k),
        min_p=take(md.min_p),
        seeded_rows=seeded_rows,
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        positions=positions,
        presence_penalty=take(md.presence_penalty),
        frequency_penalty=take(md.frequency_penalty),
        repetition_penalty=take(md.repetition_penalty),
        output_token_counts=counts,
        seen_token_mask=seen,
        allowed_mask=take(md.allowed_mask),
        banned_indices=_banned_indices(params, output_ids, drafts, first, vocab_size, dev),
        bias_indices=bias_indices,
        bias_values=bias_values,
        num_logprobs=[md.num_logprobs[i] for i in src.tolist()],
    )


def _to_device(values: np.ndarray, dtype: type, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=dtype)).to(device, non_blocking=True)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges [starts[i], starts[i] + lengths[i]) one after the other, as one int64 array."""
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def _draft_output_pairs(
    drafts: Sequence[Sequence[int]], num_counted: np.ndarray, first: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Flat indices row * V + token of each draft in the output of each later row of its request: row j of
    request i (1 <= j <= num_counted[i]) holds d1..dj."""
    max_k = int(num_counted.max(initial=0))
    if max_k == 0:
        return np.zeros(0, dtype=np.int64)
    reqs = np.flatnonzero(num_counted)
    padded = np.zeros((len(drafts), max_k), dtype=np.int64)  # [R, K] drafts, zero-padded
    for i in reqs.tolist():
        padded[i, : num_counted[i]] = drafts[i][: num_counted[i]]
    j, t = np.tril_indices(max_k)  # row offset j + 1 counts draft t (t <= j)
    req = np.repeat(reqs, j.size)
    j, t = np.tile(j, reqs.size), np.tile(t, reqs.size)
    keep = j < num_counted[req]
    req, j, t = req[keep], j[keep], t[keep]
    return (first[req] + j + 1) * vocab_size + padded[req, t]


def _banned_indices(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int] | np.ndarray],
    drafts: Sequence[Sequence[int]],
    first: np.ndarray,
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """min_tokens and bad words per row, from the output each row sees (outputs + its drafts taken)."""
    rows: list[int] = []
    row_params: list[SamplingParams] = []
    row_outputs: list[list[int]] = []
    for i, p in enumerate(params):
        if p.min_tokens > 0 or p.bad_words_token_ids:
            out = list(output_ids[i])
            for j in range(len(drafts[i]) + 1):
                rows.append(int(first[i]) + j)
                row_params.append(p)
                row_outputs.append(out + list(drafts[i][:j]))
    banned = banned_pairs(row_params, row_outputs, vocab_size)
    if not banned:
        return None
    return _to_device(np.array([rows[r] * vocab_size + t for r, t in banned]), np.int64, device)


def _bias(
    params: Sequence[SamplingParams],
    reps: np.ndarray,
    first: np.ndarray,
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(bias_indices, bias_values): logit_bias on every row of its request."""
    triples = bias_triples(params, vocab_size)
    if not triples:
        return None, None
    req, token, value = (np.array(col) for col in zip(*triples, strict=True))
    n = reps[req]
    flat = concat_ranges(first[req], n) * vocab_size + np.repeat(token, n)
    return _to_device(flat, np.int64, device), _to_device(np.repeat(value, n), np.float32, device)
