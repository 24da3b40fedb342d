"""The end of a step: logits where needed, the sampler, prompt logprobs, and the ModelRunnerOutput.

Logits are computed for the `S` rows that sample (their last scheduled token) and, for requests that asked for
prompt logprobs, at the prompt positions computed this step whose next token is a prompt token (position p
scores prompt token p + 1). Sampled tokens are appended to the persistent batch and to each request's outputs.
A request verifying draft tokens (spec_decode.py) gets logits and a sample at each of its 1 + k positions and keeps
its drafts up to the first one its samples disagree with, plus that sample.
A request asking for pooling gets its embedding with its first sampled token, pooled from its prompt's final
hidden states (runner/pooling.py: last token, mean, or first token; mean and first token accumulate over the
steps of a chunked prefill).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from treadle_model_runner.outputs import AsyncModelRunnerOutput, Logprobs, ModelRunnerOutput
from treadle_model_runner.runner import pooling
from treadle_model_runner.runner.inputs import StepInputs
from treadle_model_runner.runner.pending import PLACEHOLDER
from treadle_model_runner.runner.spec_decode import accepted_runs
from treadle_model_runner.sample import LogprobsTensors, SamplingMetadata, compute_prompt_logprobs
from treadle_model_runner.sample.drafts import concat_ranges, expand_for_drafts

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner


def sample_step(
    runner: ModelRunner, req_ids: list[str], inputs: StepInputs, hidden: torch.Tensor, defer: bool = False
) -> ModelRunnerOutput | AsyncModelRunnerOutput:
    """Sample this step's tokens. `defer`: do not wait for them (async output, see pending.py; their logprobs
    travel with them); the caller guarantees no request of the step wants prompt logprobs."""
    batch = runner.batch
    model = runner._require_model()
    rows = inputs.sample_rows
    sampled_lists: list[list[int]] = [[] for _ in req_ids]
    logprobs_lists: list[list[Logprobs] | None] = [None] * len(req_ids)
    pooled: dict[str, list[float]] = {}
    pooling.accumulate(batch, inputs, hidden)
    if rows.size:
        states = [batch.states[r] for r in rows]
        assert all(s is not None for s in states), "a sampling row has no request state"
        params = [s.sampling_params for s in states if s is not None]
        outputs = [s.output_token_ids for s in states if s is not None]
        metadata = SamplingMetadata.build(
            params,
            [s.prompt_token_ids for s in states if s is not None],
            outputs,
            batch.num_tokens[rows].tolist(),
            runner.vocab_size,
            runner.device,
            generator=runner.generator,
        )
        drafts = inputs.sample_drafts
        if drafts is not None:  # one row per position a request samples at (speculative decoding)
            metadata = expand_for_drafts(metadata, params, outputs, drafts)
        # [S, vocab] in the model dtype (with drafts one row per position): the sampler casts when it needs float32
        last_hidden = hidden[inputs.logits_indices]
        logits = model.compute_logits(last_hidden)
        if any(s is not None and s.sampling_params.structured_outputs is not None for s in states):
            # a grammar advances over the previous step's tokens: wait for them now, with this step's forward
            # already queued on the device, instead of before the step (which would leave the device idle)
            runner._resolve_pending(keep_newest=False)
            runner.structured.mask([s for s in states if s is not None], logits, drafts)
        out = runner.sampler(logits, metadata)
        if defer:
            assert drafts is None, "a step verifying drafts is never deferred"
            positions = batch.num_tokens[rows].copy()
            batch.append_tokens(rows, np.full(rows.size, PLACEHOLDER, dtype=np.int32))
            for state in states:
                assert state is not None
                state.output_token_ids.append(PLACEHOLDER)
            lp = out.logprobs
            extra = () if lp is None else (lp.token_ids, lp.logprobs, lp.ranks)
            pending = runner.copier.start(
                [req_ids[r] for r in rows.tolist()], positions, out.sampled_token_ids, extra
            )
            runner.pending.append(pending)
            logprobs = None
            if lp is not None:  # built from the host copies when the engine asks for the step's output
                logprobs = functools.partial(_host_logprobs, pending.extra, metadata.num_logprobs)
            return AsyncModelRunnerOutput(req_ids, rows.tolist(), pending.host, pending.wait, logprobs)
        tokens = out.sampled_token_ids.cpu().numpy()
        # sampling row i keeps tokens[first[i] : first[i] + count[i]]: one, or its kept drafts and one more
        if drafts is None:
            first, count = np.arange(rows.size), np.ones(rows.size, dtype=np.int64)
        else:
            first, count = accepted_runs(tokens, drafts)
            # pooling takes no drafts: each request's own last hidden state is at its first sample
            last_hidden = last_hidden[torch.from_numpy(first).to(last_hidden.device)]
        pooled = pooling.pooled(states, rows, req_ids, last_hidden)
        appended = count
        if (batch.num_tokens[rows] >= batch.max_model_len).any():
            # only a prompt-only request (max_tokens 0, e.g. an embedding) fills its row: the engine drops the token
            # its prefill samples, so it stays out of the row (a full row of any other request still raises)
            mask = np.array([s is None or s.sampling_params.max_tokens != 0 for s in states], dtype=bool)
            appended = np.where(mask, count, 0)
        batch.append_runs(rows, appended, tokens[concat_ranges(first, appended)].astype(np.int32))
        host_logprobs = out.logprobs.tolists(metadata.num_logprobs) if out.logprobs is not None else None
        for j, row in enumerate(rows.tolist()):
            start, end = int(first[j]), int(first[j] + count[j])
            new = tokens[start:end].tolist()
            state = states[j]
            assert state is not None
            state.output_token_ids.extend(new)
            sampled_lists[row] = new
            if host_logprobs is not None and host_logprobs[start] is not None:
                logprobs_lists[row] = host_logprobs[start:end]  # type: ignore[assignment]
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled_lists,
        logprobs=logprobs_lists,
        prompt_logprobs=_prompt_logprobs(runner, req_ids, inputs, hidden),
        pooled=pooled,
    )


def _host_logprobs(host: list[torch.Tensor], counts: list[int]) -> list[Logprobs | None]:
    """A deferred step's logprobs, from their host copies (token ids, logprobs, ranks) once they landed."""
    return LogprobsTensors(*host).tolists(counts)


def _prompt_logprobs(
    runner: ModelRunner, req_ids: list[str], inputs: StepInputs, hidden: torch.Tensor
) -> dict[str, list[Logprobs]]:
    batch = runner.batch
    result: dict[str, list[Logprobs]] = {}
    for row, req_id in enumerate(req_ids):
        state = batch.states[row]
        if state is None or state.sampling_params.prompt_logprobs is None:
            continue
        start = int(batch.num_computed_tokens[row])
        end = min(start + int(inputs.num_scheduled[row]), int(batch.num_prompt_tokens[row]) - 1)
        if end <= start:
            continue
        first = int(inputs.query_start[row])
        index = torch.arange(first, first + end - start, device=hidden.device)
        next_ids = torch.from_numpy(batch.token_ids[row, start + 1 : end + 1].astype(np.int64)).to(
            hidden.device
        )
        logits = runner._require_model().compute_logits(hidden[index]).float()
        result[req_id] = compute_prompt_logprobs(logits, next_ids, state.sampling_params.prompt_logprobs)
    return result
