"""Scheduler: hands out each step's token budget over running and waiting requests.

Theory. There are no prefill or decode phases. Each request has `num_computed_tokens` (KV in the cache) and
`num_tokens` (prompt + output, plus placeholders under async scheduling); a step gives it
`num_tokens - num_computed_tokens` more, capped by the budget `max_num_batched_tokens` and by
`long_prefill_token_threshold`. A decode is thus one token and a long prompt is chunked over steps.
Running requests are served first, in admission order; then waiting requests are admitted (scheduler_admit.py:
FCFS or by priority) while budget, `max_num_seqs`, KV blocks and the LoRA adapter cap (lora_admission.py) last,
reusing prefix-cache hits. Admitting a request that names an adapter holds that adapter in the runner's host memory
(`hold_lora`, loading it again if it was evicted): a load that fails there fails that request alone, with an error
output, and admission goes on. When a running request
cannot get blocks, the lowest-priority / latest running request is preempted by recompute: its blocks are
freed, `num_computed_tokens` reset to 0, and it waits again, keeping its output tokens (it resumes as a new
request carrying them). No waiting request is admitted in a step that preempted.

`num_computed_tokens` advances when a step is scheduled, so the next step can be scheduled before this one
returns (async scheduling): a request whose scheduled tokens reach its end will sample one token, counted in
`num_output_placeholders` until `update_from_output` delivers it.

Speculative decoding (spec_decode.py): a decoding request may run its last sample plus drafts; the step's
output then moves num_computed_tokens back over the drafts the runner rejected.

Invariants: every running request holds blocks for its num_computed_tokens; waiting requests hold none;
a request is in exactly one of running / waiting / (gone); the runner hears of a finished or preempted
request in the next SchedulerOutput.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from treadle_engine_core.block_pool import KVCacheBlock
from treadle_engine_core.config import SchedulerConfig
from treadle_engine_core.kv_cache_manager import KVCacheManager
from treadle_engine_core.lora_admission import LoRAAdmission
from treadle_engine_core.messages import EngineCoreOutput, EngineCoreOutputs, SchedulerStats
from treadle_engine_core.request import Request, RequestStatus, validate_request_length
from treadle_engine_core.request_queue import make_queue
from treadle_engine_core.scheduler_admit import admit_waiting
from treadle_engine_core.scheduler_update import apply_runner_output
from treadle_engine_core.spec_decode import SpecDecoding
from treadle_model_runner.config import SpeculativeConfig
from treadle_model_runner.kv_cache_spec import KVCacheConfig
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.outputs import ModelRunnerOutput
from treadle_model_runner.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_config: KVCacheConfig,
        *,
        enable_prefix_caching: bool = True,
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
        log_stats: bool = True,
        max_loras: int = 0,
        hold_lora: Callable[[str, LoRARequest], None] | None = None,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """`max_loras`: most distinct LoRA adapters among running requests (0: LoRA off, such requests refused);
        `hold_lora(request_id, lora)`: called as a request naming an adapter is admitted (the runner keeps the
        adapter in host memory for it); its ValueError fails that request. `speculative_config`: draft tokens
        for decoding requests (None: off); under async scheduling only requests with no token in flight draft."""
        if config.max_model_len is None:
            raise ValueError("SchedulerConfig.max_model_len is unset; call config.resolve(...) first")
        self.config = config
        self.max_model_len: int = config.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.async_scheduling = bool(config.async_scheduling)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.log_stats = log_stats
        eagle3 = speculative_config is not None and speculative_config.method == "eagle3"
        self.kv = KVCacheManager(kv_cache_config, enable_caching=enable_prefix_caching, drop_last_hit=eagle3)
        need = self.kv.blocks_needed_for(self.max_model_len, config.max_num_batched_tokens)
        if need > kv_cache_config.num_blocks - 1:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) needs {need} KV blocks for one request but the cache has "
                f"{kv_cache_config.num_blocks - 1}: such a request could never run; lower --max-model-len, or "
                "give the KV cache more memory (--gpu-memory-utilization on GPU, --kv-cache-space on CPU)"
            )
        self.requests: dict[str, Request] = {}  # live requests (waiting or running)
        self.waiting = make_queue(config.policy)
        self.running: list[Request] = []  # admission order
        self.finished_req_ids: set[str] = set()  # ended since the last schedule(); the runner drops them
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished = 0
        self.lora = LoRAAdmission(max_loras) if max_loras else None
        self.hold_lora = hold_lora
        # requests failed while scheduling (their adapter could not be loaded), reported by the next update
        self.failed: list[EngineCoreOutput] = []
        self.spec = SpecDecoding(speculative_config, self.max_model_len) if speculative_config else None
        # draft_model, eagle3: after a step that samples, the runner's drafter writes KV for its drafts' positions,
        # up to this many slots past the step's tokens (allocated when the pool has room; see _allocate)
        self.draft_lookahead = (
            speculative_config.num_speculative_tokens
            if speculative_config is not None and speculative_config.drafts_in_runner
            else 0
        )

    # ---- requests in / out ------------------------------------------------------------------------
    def validate_request(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        validate_request_length(num_prompt_tokens, max_tokens, self.max_model_len)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight; ids must be unique")
        self.validate_request(request.num_prompt_tokens, request.sampling_params.max_tokens)
        if request.lora_request is not None:
            if self.lora is None:
                raise ValueError(
                    f"request {request.request_id!r} names LoRA adapter {request.lora_request.lora_name!r} but "
                    "LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)"
                )
            self.lora.on_added(request)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, error); unknown or finished ids are ignored."""
        ended = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)
            ended.append(req)
        return ended

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        if self.spec is not None:
            self.spec.remove(req.request_id)
        del self.requests[req.request_id]
        if self.lora is not None:
            self.lora.on_freed(req.request_id)
        self.finished_req_ids.add(req.request_id)
        self.num_finished += 1

    @property
    def has_requests(self) -> bool:
        return bool(self.requests)

    # ---- schedule ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        max_len = self.max_model_len
        num_scheduled: dict[str, int] = {}
        cached = CachedRequestData()
        new_reqs: list[NewRequestData] = []
        preempted: set[str] = set()
        drafts = self.spec.propose(self.running) if self.spec is not None else {}
        spec_tokens: dict[str, list[int]] = {}

        running = self.running
        async_sched = self.async_scheduling
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_computed = req.num_computed_tokens
            num_placeholders = req.num_output_placeholders
            num_tokens = len(req.all_token_ids) + num_placeholders
            num_new = num_tokens - num_computed
            req_drafts = drafts.get(req.request_id) if drafts else None
            if req_drafts:
                num_new += len(req_drafts)  # 1 + drafts (only decoding requests have drafts)
            if num_placeholders and (
                len(req.output_token_ids) + num_placeholders >= req.max_tokens or num_tokens >= max_len
            ):
                num_new = 0  # the tokens in flight already end it
            if threshold and num_new > threshold:
                num_new = threshold
            if num_new > budget:
                num_new = budget
            if num_new > max_len - num_computed:
                num_new = max_len - num_computed
            if num_new <= 0:
                i += 1
                continue
            new_blocks = self._allocate(req, num_new, num_tokens)
            if (
                new_blocks is None and num_new > 1 and req_drafts
            ):  # drafts are optional: no preemption for them
                num_new = 1
                new_blocks = self._allocate(req, num_new, num_tokens)
            while new_blocks is None:
                victim = self._pick_victim(i)
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
                new_blocks = kv.allocate_slots(req, num_new)
            if new_blocks is None:
                continue  # req itself was preempted; running[i] is now the next request
            rid = req.request_id
            num_scheduled[rid] = num_new
            budget -= num_new
            if req_drafts and num_new > 1:  # the caps above may have trimmed the drafts
                spec_tokens[rid] = req_drafts[: num_new - 1]
            cached.req_ids.append(rid)
            cached.new_block_ids.append(new_blocks or None)
            cached.num_computed_tokens.append(num_computed)
            req.num_computed_tokens = num_computed + num_new
            if async_sched and num_computed + num_new >= num_tokens:
                req.num_output_placeholders = num_placeholders + 1  # it samples a token we will not see yet
            i += 1

        if not preempted:
            budget = admit_waiting(self, budget, num_scheduled, new_reqs)

        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=preempted,
            scheduled_spec_decode_tokens=spec_tokens,
        )
        self.finished_req_ids = set()
        return out

    def _allocate(
        self,
        req: Request,
        num_new: int,
        num_tokens: int,
        num_hit: int = 0,
        hit_blocks: list[list[KVCacheBlock]] | None = None,
    ) -> tuple[list[int], ...] | None:
        """kv.allocate_slots for num_new tokens after num_computed (+ num_hit prefix hits), and, when the step
        reaches the end of the request's `num_tokens` tokens (it samples) under a draft model, the lookahead
        slots its drafts' KV goes to. Those are optional: when the pool cannot give them, the step runs without
        (that request's drafts then read the null block: fewer accepted, the output unchanged)."""
        num_after = req.num_computed_tokens + num_hit + num_new
        lookahead = 0
        if self.draft_lookahead and num_after >= num_tokens:
            lookahead = min(self.draft_lookahead, self.max_model_len - num_after)
        if lookahead > 0:
            blocks = self.kv.allocate_slots(req, num_new, num_hit, hit_blocks, num_lookahead_tokens=lookahead)
            if blocks is not None:
                return blocks
        return self.kv.allocate_slots(req, num_new, num_hit, hit_blocks)

    def _pick_victim(self, first: int) -> Request:
        """The running request to preempt, among those not yet scheduled this step (index >= first)."""
        if self.config.policy == "priority":
            return max(self.running[first:], key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_output_placeholders = 0  # a token still in flight is appended when it arrives
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_preempted(req)
        logger.debug("preempted %s (KV cache full)", req.request_id)

    # ---- update -----------------------------------------------------------------------------------
    def update_from_output(self, so: SchedulerOutput, mro: ModelRunnerOutput) -> EngineCoreOutputs:
        """Append sampled tokens, run stop checks, free finished requests; return per-request diffs
        (scheduler_update.py)."""
        return apply_runner_output(self, so, mro)

    # ---- stats ------------------------------------------------------------------------------------
    def make_stats(self) -> SchedulerStats:
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_finished_reqs=self.num_finished,
        )
        if self.spec is not None:
            self.spec.add_stats(stats)
        return stats
