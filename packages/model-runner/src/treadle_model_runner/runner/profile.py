"""Peak activation memory of the largest step, measured by a profiling forward pass (GPU only).

The pass runs max_num_batched_tokens prompt tokens (split into requests of at most max_model_len, at most
max_num_seqs of them) through the model over a temporary KV cache just large enough to hold them, then computes
logits for max_num_seqs rows (more under speculative decoding: `max_logits_rows`) and samples them with every
option that allocates on (`profile_sampling_params`: penalties, allowed tokens, truncation, max_logprobs). The peak of `torch.cuda.max_memory_allocated`
above the memory allocated before the pass, minus the temporary cache, is what the KV cache must leave free.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from treadle_model_runner.kv_cache import allocate_kv_caches
from treadle_model_runner.runner.inputs import prepare_inputs
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.sample import SamplingMetadata
from treadle_model_runner.sampling_params import SamplingParams

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def profile_lengths(runner: ModelRunner) -> list[int]:
    """The pass's prompt lengths: max_num_batched_tokens in requests of at most max_model_len, max_num_seqs of
    them at most."""
    max_len, budget = runner.max_model_len, runner.max_num_batched_tokens
    return [min(max_len, budget - start) for start in range(0, budget, max_len)][: runner.max_num_seqs]


def max_logits_rows(runner: ModelRunner) -> int:
    """Most logits rows a step samples: one a request, or 1 + num_speculative_tokens for a request verifying
    drafts, within the step's token budget."""
    with_drafts = min(
        runner.max_num_batched_tokens, runner.max_num_seqs * (1 + runner.num_speculative_tokens)
    )
    return max(runner.max_num_seqs, with_drafts)


def profile_sampling_params(runner: ModelRunner, num_rows: int) -> list[SamplingParams]:
    """The costliest sampling a step of `num_rows` rows may ask for: every [rows, vocab] tensor the sampler can
    build (penalty counts and seen tokens, the allowed-token mask, truncation's sorted copy), the per-row ones
    (seeds, logit bias, bad words, min_tokens' banned stops, a mixed batch's greedy argmax: row 0 is greedy) and as
    many logprobs as a request may ask (the engine's max_logprobs; -1: the whole vocabulary)."""
    sampled = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=0,
        presence_penalty=0.1, frequency_penalty=0.1, repetition_penalty=1.1,
        allowed_token_ids=[0, 1], logit_bias={1: -1.0}, bad_words_token_ids=[[1]], min_tokens=2,
        stop_token_ids=[1], logprobs=runner.model_config.max_logprobs,
    )  # fmt: skip
    greedy = dataclasses.replace(sampled, temperature=0.0, seed=None)
    return [greedy] + [sampled] * (num_rows - 1)


@torch.inference_mode()
def profile_peak_activation_bytes(runner: ModelRunner, block_bytes: int) -> int:
    model = runner._require_model()
    layers = model.attention_layers()
    block_size = runner.cache_config.block_size
    num_groups = len(runner.batch.block_tables)
    lengths = profile_lengths(runner)
    blocks_per_req = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_req) + 1
    states, next_block = [], 1
    for i, (n, nb) in enumerate(zip(lengths, blocks_per_req, strict=True)):
        ids = list(range(next_block, next_block + nb))
        next_block += nb
        states.append(
            RequestState(
                f"__profile_{i}", [0] * n, SamplingParams(), tuple(ids for _ in range(num_groups)), 0
            )
        )

    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    runner.kv_caches = allocate_kv_caches(layers, num_blocks, block_size, runner.kv_cache_dtype,
                                          runner.device, runner.attn_backend)  # fmt: skip
    try:
        for state in states:
            runner.batch.add(state)
        inputs = prepare_inputs(runner.batch, np.array(lengths, dtype=np.int64), runner.buffers)
        hidden = runner._forward(inputs)
        num_rows = max_logits_rows(runner)
        rows = torch.arange(num_rows, device=runner.device) % hidden.shape[0]
        logits = model.compute_logits(hidden[rows]).float()
        params = profile_sampling_params(runner, num_rows)
        one_token = [[0] for _ in params]
        metadata = SamplingMetadata.build(
            params, one_token, one_token, [1] * len(params), runner.vocab_size, runner.device
        )
        runner.sampler(logits, metadata)
        torch.cuda.synchronize(runner.device)
        peak = torch.cuda.max_memory_allocated(runner.device) - base - num_blocks * block_bytes
    finally:
        for state in states:
            runner.batch.remove(state.req_id)
        runner.batch.condense()
        runner.kv_caches = []
        torch.cuda.empty_cache()
    logger.info("profiling pass: %d tokens in %d requests, peak activations %.2f GiB", sum(lengths), len(lengths),
                peak / (1 << 30))  # fmt: skip
    return max(0, int(peak))
