"""The sampler: per-request sampling parameters as device tensors, and one batched pass from logits to tokens.

    metadata = SamplingMetadata.build(params, prompt_ids, output_ids, positions, vocab_size, device)
    out = Sampler()(logits, metadata)      # out.sampled_token_ids [B] int64, out.logprobs: LogprobsTensors | None
    host_logprobs = out.logprobs.tolists(metadata.num_logprobs)

Seeded requests draw their Gumbel noise from a hash of (seed, position), so their tokens do not depend on the
batch. See sampler.py for the order of the steps and logprobs.py for which logits logprobs describe.
"""

from __future__ import annotations

from treadle_model_runner.sample.logprobs import (
    LogprobsTensors,
    compute_prompt_logprobs,
    compute_prompt_logprobs_tensors,
    token_logprobs,
)
from treadle_model_runner.sample.metadata import SamplingMetadata
from treadle_model_runner.sample.sampler import LogprobsMode, Sampler, SamplerOutput

__all__ = [
    "LogprobsMode",
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_prompt_logprobs",
    "compute_prompt_logprobs_tensors",
    "token_logprobs",
]
