"""BatchRunner: the loop under the offline `LLM`: a batch of prompts added to the engine at once, then the engine
stepped until every one is done.

Each prompt comes with its own SamplingParams, priority and LoRA adapter (`params_per_prompt`, `loras_per_prompt`
spread what the caller gave over the prompts). Requests run FINAL_ONLY, so no per-step text is built for nobody,
and the results come back in prompt order; a progress bar (tqdm) counts finished prompts when asked. Whatever
goes wrong while the batch runs (a prompt the input processor refuses, naming its index when there are several; a
request the engine rejects; an interrupt) aborts every request the batch added, in the engine too, and re-raises.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from treadle_frontend.engine_client import SyncEngineClient
from treadle_frontend.input_processor import InputProcessor
from treadle_frontend.output_processor import OutputProcessor
from treadle_frontend.outputs import RequestOutput
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams

LoRARequests = LoRARequest | Sequence[LoRARequest | None] | None  # one for every prompt, or one per prompt


class BatchRunner:
    """Runs batches of encoded prompts on one engine client; its OutputProcessor holds their states."""

    def __init__(
        self,
        client: SyncEngineClient,
        input_processor: InputProcessor,
        output_processor: OutputProcessor,
        request_factory: Callable[..., Any],
    ) -> None:
        self.client = client
        self.input_processor = input_processor
        self.output_processor = output_processor
        # (id, prompt ids, params, arrival time, priority[, lora_request]) -> the engine's request
        self.request_factory = request_factory
        self._ids = itertools.count()

    def run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        params_list: list[SamplingParams],
        use_tqdm: bool,
        priority: Sequence[int] | None,
        loras: list[LoRARequest | None],
    ) -> list[RequestOutput]:
        """Each (text, prompt ids) of `encoded` with its own params (set FINAL_ONLY here) and LoRA adapter;
        `priority`: one per prompt (None: all 0). The final outputs, in prompt order."""
        if priority is not None and len(priority) != len(encoded):
            raise ValueError(
                f"got {len(priority)} priorities for {len(encoded)} prompts; pass one per prompt"
            )
        priorities = list(priority) if priority is not None else [0] * len(encoded)
        for p in set(priorities):
            self.input_processor.check_priority(p)
        order: dict[str, int] = {}
        added: list[str] = []
        try:
            for i, ((text, ids), params) in enumerate(zip(encoded, params_list, strict=True)):
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._ids))
                try:
                    parent, states, engine_reqs = self.input_processor.make_requests(rid, text, ids, params)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}" if len(encoded) > 1 else str(e)) from None
                self.output_processor.add_request(parent, states)
                added.append(rid)
                order[rid] = i
                now = time.time()
                lora = {"lora_request": loras[i]} if loras[i] is not None else {}
                for child_id, child_params in engine_reqs:
                    self.client.add_request(
                        self.request_factory(
                            child_id, parent.prompt_token_ids, child_params, now, priorities[i], **lora
                        )
                    )
            return self._drain(order, use_tqdm and len(encoded) > 1)
        except BaseException:
            engine_ids = self.output_processor.abort_requests(added)
            if engine_ids:
                self.client.abort_requests(engine_ids)
            raise

    def _drain(self, order: dict[str, int], show_progress: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.output_processor.has_unfinished():
                outputs = self.client.get_output()
                processed = self.output_processor.process_outputs(
                    list(getattr(outputs, "outputs", None) or [])
                )
                if processed.reqs_to_abort:
                    self.client.abort_requests(processed.reqs_to_abort)
                if self.output_processor.failed:
                    raise self.output_processor.failed.pop()
                for out in processed.request_outputs:
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        missing = [rid for rid, i in order.items() if results[i] is None]
        assert not missing, f"requests {missing} ended without a final output"
        return [r for r in results if r is not None]


def params_per_prompt(
    sampling_params: Any, n: int, default: Callable[[], SamplingParams]
) -> list[SamplingParams]:
    """One SamplingParams (a copy) per prompt: one for all, or a list of one per prompt; None: `default()` each."""
    if sampling_params is None:
        return [default() for _ in range(n)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params.clone() for _ in range(n)]
    if not isinstance(sampling_params, (list, tuple)) or not all(
        isinstance(p, SamplingParams) for p in sampling_params
    ):
        raise TypeError(
            "sampling_params must be a SamplingParams or a list of them (one per prompt); got "
            f"{type(sampling_params).__name__}"
        )
    plist = list(sampling_params)
    if len(plist) != n:
        raise ValueError(f"got {len(plist)} sampling params for {n} prompts; pass one, or one per prompt")
    return [p.clone() for p in plist]


def loras_per_prompt(lora_request: LoRARequests, n: int) -> list[LoRARequest | None]:
    """One LoRARequest (or None) per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if not isinstance(lora_request, (list, tuple)) or not all(
        r is None or isinstance(r, LoRARequest) for r in lora_request
    ):
        raise TypeError(
            f"lora_request must be a LoRARequest or a list of them (one per prompt); got {type(lora_request).__name__}"
        )
    if len(lora_request) != n:
        raise ValueError(
            f"got {len(lora_request)} lora requests for {n} prompts; pass one, or one per prompt"
        )
    return list(lora_request)
