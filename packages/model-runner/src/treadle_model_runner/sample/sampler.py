"""Sampler: float32 logits [B, V] and SamplingMetadata in, one token id per row (and logprobs) out.

The pipeline (ARCHITECTURE §4), every step a batched tensor op on the logits' device, none of them syncing with
the host:

    allowed / bad tokens, min_tokens -> logit bias -> penalties -> temperature (<= 1e-5: greedy = argmax)
    -> min-p -> top-k / top-p -> Gumbel-max (noise keyed by (seed, position) for seeded rows)
    -> logprobs (chosen token's logprob and rank, top-k)

Steps no request of the batch needs are skipped (the metadata's tensors are None), so an all-greedy batch
without masks, bias or penalties is one argmax (``ops.argmax_rows``, on the model-dtype logits), and one that
only samples is one fused Gumbel pass; raw logprobs (``ops.token_logprobs``) are read from the logits as they
came, after either.
Greedy rows take the argmax of the penalized logits; temperature and truncation leave them alone. The logits are
modified in place: pass a copy if the caller still needs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from treadle_ir import ops
from treadle_kernels.ops.gumbel import gumbel_sample
from treadle_model_runner import envs
from treadle_model_runner.sample.gumbel import exponential_noise, gumbel_keys, gumbel_max
from treadle_model_runner.sample.logprobs import LogprobsTensors, token_logprobs
from treadle_model_runner.sample.masks import apply_logit_bias, apply_token_masks
from treadle_model_runner.sample.metadata import SamplingMetadata
from treadle_model_runner.sample.penalties import apply_penalties
from treadle_model_runner.sample.truncation import apply_min_p, apply_top_k_top_p

logger = logging.getLogger(__name__)

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
_LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: LogprobsTensors | None  # None when no request asked for logprobs


class Sampler:
    """Stateless apart from its logprobs mode and the fused-Gumbel switch (read from the environment when built);
    one instance serves every step."""

    def __init__(self, logprobs_mode: LogprobsMode = "raw_logprobs") -> None:
        if logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {logprobs_mode!r} is not one of {', '.join(_LOGPROBS_MODES)}")
        self.logprobs_mode = logprobs_mode
        self.fused_gumbel = envs.TREADLE_FUSED_GUMBEL()  # read once, not every step

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        expected = (metadata.num_reqs, metadata.vocab_size)
        assert tuple(logits.shape) == expected, (
            f"logits {tuple(logits.shape)} do not match metadata {expected}"
        )
        want_logprobs = metadata.max_num_logprobs >= 0
        raw = self.logprobs_mode == "raw_logprobs"
        if not want_logprobs or raw:  # processed logprobs need the processed logits the fast paths skip
            sampled = self._fast_sample(logits, metadata)
            if sampled is not None:
                logprobs = (
                    token_logprobs(logits, sampled, metadata.max_num_logprobs) if want_logprobs else None
                )
                return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)
        raw_logits = None
        if want_logprobs and raw:  # the float32 logits below are processed in place
            raw_logits = logits.clone() if logits.dtype == torch.float32 else logits
        logits = logits.to(torch.float32).contiguous()

        logits = self.apply_penalties_and_masks(logits, metadata)
        if metadata.all_greedy:
            sampled = ops.argmax_rows(logits)
        else:
            greedy = None if metadata.all_random else ops.argmax_rows(logits)
            logits = self.apply_temperature_and_truncation(logits, metadata)
            noise = exponential_noise(
                metadata.num_reqs,
                metadata.vocab_size,
                logits.device,
                metadata.seeded_rows,
                metadata.seed_lo,
                metadata.seed_hi,
                metadata.positions,
                metadata.generator,
            )
            sampled = gumbel_max(logits, noise)
            if greedy is not None:
                assert metadata.is_greedy is not None, "mixed batch without is_greedy"
                sampled = torch.where(metadata.is_greedy, greedy, sampled)

        logprobs = None
        if want_logprobs:
            source = raw_logits if raw_logits is not None else logits
            logprobs = token_logprobs(source, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _fast_sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor | None:
        """The batch's tokens when one kernel draws them all from the logits as they came, else None."""
        if md.all_greedy and _untouched(md):
            # the whole sampler is one argmax, on the logits as they come (a float32 cast is exact and monotone)
            return ops.argmax_rows(logits)
        if self.fused_gumbel and _only_samples(logits, md):
            return gumbel_sample(logits, md.temperature, gumbel_keys(md, logits.device))
        return None

    @staticmethod
    def apply_penalties_and_masks(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Steps before temperature: masks, min_tokens, bias, penalties. In place on logits [B, V]."""
        apply_token_masks(logits, md.allowed_mask, md.banned_indices)
        apply_logit_bias(logits, md.bias_indices, md.bias_values)
        if not md.no_penalties:
            assert (
                md.output_token_counts is not None
                and md.seen_token_mask is not None
                and md.presence_penalty is not None
                and md.frequency_penalty is not None
                and md.repetition_penalty is not None
            ), "penalties without their tensors"
            apply_penalties(
                logits,
                md.output_token_counts,
                md.seen_token_mask,
                md.presence_penalty,
                md.frequency_penalty,
                md.repetition_penalty,
            )
        return logits

    @staticmethod
    def apply_temperature_and_truncation(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p. In place on logits [B, V]; greedy rows are left unchanged."""
        logits.div_(md.temperature.unsqueeze(1))
        if md.min_p is not None:
            apply_min_p(logits, md.min_p)
        return apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)

    def process_logits(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Every processing step before sampling, in place: the logits the tokens are drawn from."""
        logits = self.apply_penalties_and_masks(logits, md)
        if md.all_greedy:
            return logits
        return self.apply_temperature_and_truncation(logits, md)


def _only_samples(logits: torch.Tensor, md: SamplingMetadata) -> bool:
    """A CUDA batch whose every row samples from softmax(logits / T) untouched: the fused Gumbel path's case."""
    return logits.is_cuda and logits.stride(1) == 1 and md.all_random and md.no_truncation and _untouched(md)


def _untouched(md: SamplingMetadata) -> bool:
    """No mask, bias or penalty changes any row's logits."""
    return (
        md.allowed_mask is None and md.banned_indices is None and md.bias_indices is None and md.no_penalties
    )
