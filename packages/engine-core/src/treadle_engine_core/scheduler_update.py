"""The scheduler's half that takes a step's result: `apply_runner_output` appends each request's sampled tokens
(one, or several when drafts were verified), runs the stop checks (stop.py), frees the requests that ended and
returns the per-request diffs the frontend reads (EngineCoreOutputs).

Under async scheduling the step's tokens arrive after the next step was scheduled: each delivered token retires
one of the request's `num_output_placeholders`. A request preempted while its token was in flight is still
delivered that token here (it waits again, keeping it), and a request that ended meanwhile (abort) is skipped.
With speculative decoding the step first moves num_computed_tokens back over the drafts the runner rejected
(SpecDecoding.on_verified) before the accepted tokens are appended like any others.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from treadle_engine_core.messages import EngineCoreOutput, EngineCoreOutputs
from treadle_engine_core.request import RequestStatus
from treadle_engine_core.stop import append_and_check_stop, check_stop
from treadle_model_runner.outputs import ModelRunnerOutput
from treadle_model_runner.scheduler_output import SchedulerOutput

if TYPE_CHECKING:
    from treadle_engine_core.scheduler import Scheduler

_NO_TOKENS: list[int] = []


def apply_runner_output(sched: Scheduler, so: SchedulerOutput, mro: ModelRunnerOutput) -> EngineCoreOutputs:
    """Append sampled tokens, run stop checks, free finished requests; return per-request diffs."""
    outputs, sched.failed = sched.failed, []
    finished = [out.request_id for out in outputs]
    requests = sched.requests
    index = mro.req_id_to_index
    sampled = mro.sampled_token_ids
    all_logprobs = mro.logprobs
    prompt_logprobs = mro.prompt_logprobs
    pooled = mro.pooled
    eos, max_len = sched.eos_token_ids, sched.max_model_len
    any_running_finished = False
    running_status = RequestStatus.RUNNING
    spec_tokens = so.scheduled_spec_decode_tokens
    for rid in so.num_scheduled_tokens:
        req = requests.get(rid)
        if req is None:
            continue  # aborted or finished while this step ran
        j = index.get(rid)
        new = sampled[j] if j is not None else _NO_TOKENS
        if spec_tokens and rid in spec_tokens:
            assert sched.spec is not None
            sched.spec.on_verified(req, len(spec_tokens[rid]), len(new))
        plp = prompt_logprobs.get(rid) if prompt_logprobs else None
        if not new and not plp:
            continue
        if req.num_output_placeholders:
            req.num_output_placeholders = max(0, req.num_output_placeholders - len(new))
        output_ids = req.output_token_ids
        first_output = not output_ids
        was_running = req.status is running_status
        appended = new
        stopped = False
        if len(new) == 1 and len(output_ids) < req.max_tokens:
            tok = new[0]
            output_ids.append(tok)
            req.all_token_ids.append(tok)
            if (
                tok in eos
                or tok in req.sampling_params.all_stop_token_ids
                or len(output_ids) >= req.max_tokens
                or len(req.all_token_ids) >= max_len
            ):
                stopped = check_stop(req, tok, eos, max_len)
        elif new:
            appended, stopped = append_and_check_stop(req, new, eos, max_len)
        if appended:
            sched.num_generation_tokens += len(appended)
            if first_output:
                sched.num_prompt_tokens += req.num_prompt_tokens
        lps = all_logprobs[j] if (all_logprobs and j is not None) else None
        if lps is not None and len(lps) != len(appended):
            lps = lps[: len(appended)]
        num_cached = req.num_cached_tokens if req.num_cached_tokens > 0 else 0
        if stopped:
            finished.append(rid)
            if was_running:
                any_running_finished = True
            else:
                sched.waiting.remove(req)  # preempted with a token in flight
            sched._free(req)
            out = EngineCoreOutput(rid, appended, lps, plp, req.finish_reason, req.stop_reason, num_cached)
        else:
            out = EngineCoreOutput(rid, appended, lps, plp, None, None, num_cached)
        if pooled and rid in pooled:
            out.pooled = pooled[rid]
        outputs.append(out)
    if any_running_finished:
        sched.running = [r for r in sched.running if not r.is_finished]
    if mro.draft_token_ids:
        assert sched.spec is not None, "the runner drafted but speculative decoding is off"
        sched.spec.store_drafts(requests, mro.draft_token_ids)
    return EngineCoreOutputs(
        outputs=outputs,
        scheduler_stats=sched.make_stats() if sched.log_stats else None,
        timestamp=time.monotonic(),
        finished_requests=finished,
    )
