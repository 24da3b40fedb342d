"""Sampled tokens in flight: the runner goes on to the next step before the host has seen them (async output).

With async scheduling the engine schedules step N+1 while step N runs, so the runner must launch N+1 without
waiting for N's sampled tokens. A step that samples in async mode therefore
  - appends a placeholder (-1) to each sampling row's host token ids and to its request's outputs, so every
    count (num_tokens, positions, min_tokens) is already right;
  - keeps the sampled ids on the device (`PendingTokens.device`) and copies them into pinned host memory on a
    side stream, recording an event;
  - returns an AsyncModelRunnerOutput that waits on that event only when the engine asks for the tokens.
The next step's input ids take each placeholder's value on the device (`device_source`); the host values are
filled in (`resolve`) at the start of the step after next, or at once when a step needs real output tokens on
the host (penalties, bad words, prompt logprobs), or, when a request of the step has a grammar, as the step
samples (after its forward is queued). A deferred step's logprobs travel with its tokens (`extra`).

Invariant: at the start of a step at most one PendingTokens (the newest) is unresolved, so any placeholder in
the host token ids belongs to it. Resolution writes only placeholders still there: a request that finished,
was preempted or was re-sent in full since then is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.request_state import RequestState

PLACEHOLDER = -1


@dataclass(slots=True)
class PendingTokens:
    req_ids: list[str]  # the requests that sampled, in sampled order
    positions: np.ndarray  # [S] position of each placeholder in its request's token ids
    device: torch.Tensor  # [S] int64 sampled ids on the device
    host: torch.Tensor  # [S] int64 pinned host copy, valid after wait()
    done: torch.cuda.Event | None  # recorded after the copy (None on CPU: the copy was synchronous)
    index: dict[str, int]  # request id -> its index in req_ids
    extra: list[
        torch.Tensor
    ]  # host copies of `extra` tensors given to start() (the logprobs), valid after wait()

    def wait(self) -> None:
        # query first: synchronize() drops the GIL even when the copy has landed, and another thread may then
        # hold it for a whole switch interval
        if self.done is not None and not self.done.query():
            self.done.synchronize()


class TokenCopier:
    """Starts the device -> host copy of a step's sampled ids on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(
        self,
        req_ids: list[str],
        positions: np.ndarray,
        sampled: torch.Tensor,
        extra: tuple[torch.Tensor, ...] = (),
    ) -> PendingTokens:
        """Copy `sampled` (and each `extra` tensor, e.g. the step's logprobs) to the host, landing together."""
        sampled = sampled.to(torch.int64)
        pinned = self.stream is not None
        host = torch.empty(sampled.shape, dtype=torch.int64, pin_memory=pinned)
        extra_host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in extra]
        done = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for dst, src in zip([host, *extra_host], [sampled, *extra], strict=True):
                    dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            for src in (sampled, *extra):
                src.record_stream(self.stream)
        else:
            for dst, src in zip([host, *extra_host], [sampled, *extra], strict=True):
                dst.copy_(src)
        index = {r: j for j, r in enumerate(req_ids)}
        return PendingTokens(req_ids, positions, sampled, host, done, index, extra_host)


def resolve(pending: PendingTokens, requests: dict[str, RequestState], batch: InputBatch) -> None:
    """Write the landed tokens over their placeholders in the request states and the persistent batch."""
    pending.wait()
    tokens = pending.host.tolist()
    for j, req_id in enumerate(pending.req_ids):
        state = requests.get(req_id)
        if state is None:
            continue  # finished or preempted since
        pos = int(pending.positions[j])
        num_prompt = len(state.prompt_token_ids)
        out = state.output_token_ids
        if 0 <= pos - num_prompt < len(out) and out[pos - num_prompt] == PLACEHOLDER:
            out[pos - num_prompt] = tokens[j]
        row = batch.req_id_to_row.get(req_id)
        if row is not None and pos < batch.num_tokens[row] and batch.token_ids[row, pos] == PLACEHOLDER:
            batch.token_ids[row, pos] = tokens[j]


def device_source(
    pending: PendingTokens | None, req_ids: list[str | None]
) -> Callable[[np.ndarray], tuple[torch.Tensor, np.ndarray]]:
    """For batch rows whose input token is a placeholder: the device tensor holding it and each one's index."""

    def source(rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        missing = [req_ids[r] for r in rows.tolist() if pending is None or req_ids[r] not in pending.index]
        if pending is None or missing:
            raise RuntimeError(
                f"input token of request(s) {missing} is not known yet and no step in flight sampled it"
            )
        index = pending.index
        return pending.device, np.array([index[req_ids[r]] for r in rows.tolist()], dtype=np.int64)  # type: ignore[index]

    return source
