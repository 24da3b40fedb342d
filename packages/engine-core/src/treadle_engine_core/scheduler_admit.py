"""The scheduler's admission of waiting requests (Scheduler.schedule, after the running ones): FCFS or by
priority while the step's budget, max_num_seqs, KV blocks and the LoRA adapter cap last, reusing prefix-cache
hits; a request whose adapter cannot be loaded fails alone with an error output (scheduler.py has the theory)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from treadle_engine_core.lora_admission import Verdict
from treadle_engine_core.messages import EngineCoreOutput
from treadle_engine_core.request import Request, RequestStatus
from treadle_model_runner.scheduler_output import NewRequestData

if TYPE_CHECKING:
    from treadle_engine_core.scheduler import Scheduler

logger = logging.getLogger(__name__)


def admit_waiting(
    sched: Scheduler, budget: int, num_scheduled: dict[str, int], new_reqs: list[NewRequestData]
) -> int:
    """Admit waiting requests while budget, max_num_seqs, blocks and the adapter cap last; returns the budget
    left. Requests whose adapter does not fit are skipped and keep their place at the head of the queue."""
    cfg = sched.config
    kv = sched.kv
    lora = sched.lora if sched.lora is not None and len(sched.waiting) else None
    if lora is not None:
        lora.start_step(sched.running)
    skipped: list[Request] = []
    while len(sched.waiting) and budget > 0 and len(sched.running) < sched.max_num_seqs:
        req = sched.waiting.peek()
        verdict = lora.verdict(req) if lora is not None else Verdict.ADMIT
        if verdict is Verdict.SKIP:
            skipped.append(sched.waiting.pop())
            continue
        if verdict is Verdict.STOP:
            break
        hit_blocks, num_hit = kv.get_computed_blocks(req)
        num_new = req.num_tokens - num_hit
        if cfg.long_prefill_token_threshold and num_new > cfg.long_prefill_token_threshold:
            num_new = cfg.long_prefill_token_threshold
        if num_new > budget:
            if not cfg.enable_chunked_prefill:
                break
            num_new = budget
        new_blocks = sched._allocate(req, num_new, req.num_tokens, num_hit, hit_blocks)
        if new_blocks is None:
            break
        sched.waiting.pop()
        if req.lora_request is not None and sched.hold_lora is not None:
            try:
                sched.hold_lora(req.request_id, req.lora_request)
            except ValueError as exc:
                # its adapter cannot be loaded: this request fails, the others go on
                _fail(sched, req, str(exc))
                continue
        if lora is not None:
            lora.admitted(req)
        kv.record_prefix_lookup(req.num_tokens, num_hit)
        sched.running.append(req)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_hit + num_new
        if sched.async_scheduling and req.num_computed_tokens >= req.num_tokens:
            req.num_output_placeholders = 1
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
        new_reqs.append(
            NewRequestData(
                req_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling_params=req.sampling_params,
                block_ids=kv.get_block_ids(req.request_id),
                num_computed_tokens=num_hit,
                output_token_ids=list(req.output_token_ids),
                lora_request=req.lora_request,
            )
        )
        num_scheduled[req.request_id] = num_new
        budget -= num_new
    for req in reversed(skipped):  # back to the head of the queue, in their order
        sched.waiting.add_preempted(req)
    return budget


def _fail(sched: Scheduler, req: Request, message: str) -> None:
    """End a request taken off the waiting queue with an error its client sees (blocks freed)."""
    logger.warning("request %s failed: %s", req.request_id, message)
    req.status = RequestStatus.FINISHED_ERROR
    sched._free(req)
    sched.failed.append(EngineCoreOutput(req.request_id, [], finish_reason=req.finish_reason, error=message))
