"""LLM: offline batched generation, the same EngineCore run in this process (no ZMQ, no server; with
`engine_process=True`, in a process of its own behind ZMQ, as the server runs it).

    llm = LLM()                                  # the embedded SmolLM2-135M-Instruct
    out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    out[0].outputs[0].text

`generate` adds every prompt, then steps the engine until all are done and returns RequestOutputs in prompt
order (FINAL_ONLY outputs, so no per-step text is built for nobody). `chat` renders conversations with the
chat template first. `params=None` takes the model's generation_config.json defaults; a list of params gives
one per prompt, and so does a list of `lora_request`s (LoRA adapters, with `enable_lora=True`). A progress bar
(tqdm) shows when `use_tqdm` and there is more than one prompt.
`beam_search` is vLLM's beam search, a loop of one-token requests over the same engine (beam_search.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from treadle_engine_core.heap import freeze_startup_heap
from treadle_frontend.beam_search import BeamSearchOutput, BeamSearchParams, beam_search_offline
from treadle_frontend.engine_client import SyncEngineClient, make_engine_request
from treadle_frontend.input_processor import InputProcessor, PromptType, embedding_params
from treadle_frontend.output_processor import OutputProcessor
from treadle_frontend.outputs import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
    score_pairs,
    similarity,
)
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]
LoRARequests = LoRARequest | Sequence[LoRARequest | None] | None  # one for every prompt, or one per prompt


class LLM:
    def __init__(self, model: str | None = None, *, engine_process: bool = False, **kwargs: Any) -> None:
        """`engine_process=True` runs the engine core in its own process (as the server does, and as vLLM's LLM
        does by default): its scheduling and launches then do not share this process's GIL with the output
        processing (detokenizing, logprobs); it costs the process's start and a message per step. Measured on an
        H200 it did not pay (Qwen3-0.6B 256 x U(100, 1024): 20.4k against 20.6k output tok/s; 256 requests
        under a regex: 15.5-18.6k against 21.5-23.9k; benchmarks/results/gpu-engine-process-h200-5d136f8), so
        in-process stays the default.

        Once started, the LLM freezes the process's heap out of the garbage collector's scans (gc.freeze, as
        vLLM's engine does; treadle_engine_core.heap): every object alive then, the caller's too, is freed by
        reference counting only; a reference cycle among them stays until `gc.unfreeze()`."""
        from treadle_frontend.engine_factory import EngineArgs, start_inproc, start_sync_mp

        args = EngineArgs.from_kwargs(model, **kwargs)
        client, processor = (start_sync_mp if engine_process else start_inproc)(args)
        self._setup(client, processor)
        freeze_startup_heap("LLM")  # treadle_engine_core.heap: full collections stop walking the model's heap

    @classmethod
    def from_client(
        cls,
        client: SyncEngineClient,
        input_processor: InputProcessor,
        request_factory: Callable[..., Any] = make_engine_request,
    ) -> LLM:
        """An LLM over an existing engine client (tests use a fake engine)."""
        self = cls.__new__(cls)
        self._setup(client, input_processor, request_factory)
        return self

    def _setup(
        self,
        client: SyncEngineClient,
        input_processor: InputProcessor,
        request_factory: Callable[..., Any] = make_engine_request,
    ) -> None:
        self.client = client
        self.request_factory = request_factory
        self.input_processor = input_processor
        self.output_processor = OutputProcessor()
        self._ids = itertools.count()

    @property
    def vocab_size(self) -> int:
        return self.input_processor.model.vocab_size

    def engine_info(self) -> dict[str, Any]:
        """What a benchmark record needs to know about the engine it ran on."""
        info = self.input_processor.model
        return {
            "model": info.name,
            "model_path": str(info.path) if info.path else None,
            "max_model_len": info.max_model_len,
            "kv_capacity_tokens": info.kv_capacity_tokens,
            **info.runtime,
        }

    def get_tokenizer(self) -> Any:
        return self.input_processor.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_params()

    # ---- public API -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """vLLM's LLM.generate; `priority`: one per prompt (lower runs first; needs the priority policy);
        `lora_request`: the LoRA adapter every prompt runs with, or a list with one per prompt (None: the base
        model)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompt_list: list[PromptType] = [prompts]  # type: ignore[list-item]
        elif isinstance(prompts, (list, tuple)):
            prompt_list = list(prompts)  # type: ignore[arg-type]
        else:
            raise TypeError(
                "prompts must be a string, a list of token ids, a prompt dict ({'prompt': ...} or "
                f"{{'prompt_token_ids': ...}}) or a list of those; got {type(prompts).__name__}"
            )
        encoded = [self.input_processor.encode_prompt(p) for p in prompt_list]
        return self._run(encoded, sampling_params, use_tqdm, priority, lora_request)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        use_tqdm: bool = True,
        lora_request: LoRARequests = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed on a decoder model: each prompt's embedding, the L2-normalised final hidden state of its
        last token (last-token pooling); `out.outputs.embedding` is a list of hidden_size floats. `lora_request`:
        as in `generate`."""
        outs = self.generate(prompts, embedding_params(), use_tqdm, lora_request=lora_request)
        return [
            EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding or []))
            for o in outs
        ]

    def score(
        self, text_1: str | Sequence[str], text_2: str | Sequence[str], use_tqdm: bool = True
    ) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score for an embedding model: the cosine similarity of each pair's embeddings (`embed`). One
        text_1 against each text_2, or two lists of one length, pairwise."""
        pairs = score_pairs(text_1, text_2)
        distinct = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors = {
            t: o.outputs.embedding for t, o in zip(distinct, self.embed(distinct, use_tqdm), strict=True)
        }
        return [
            ScoringRequestOutput(str(i), ScoringOutput(similarity(vectors[a], vectors[b])))
            for i, (a, b) in enumerate(pairs)
        ]

    def beam_search(
        self,
        prompts: Sequence[PromptType] | str | dict[str, Any],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search (beam_search.py): per prompt, up to `params.beam_width` sequences, best first,
        whose `tokens` and `text` hold the prompt too. Each step sends every live beam of every running prompt to the
        engine as one batch; `concurrency_limit` caps how many prompts run at once (None: all of them);
        `lora_request`: the adapter every prompt runs with (None: the base model)."""
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise TypeError(
                f"lora_request must be one LoRARequest for every prompt, got {type(lora_request).__name__}"
            )
        return beam_search_offline(
            self.input_processor, lambda enc, sp: self._run(enc, sp, False, lora_request=lora_request), prompts,
            params, use_tqdm, concurrency_limit,
        )  # fmt: skip

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation or a list of them through the chat template; `tools` (OpenAI's
        function definitions) reach the template as its `tools` variable; replies are text."""
        if tools is not None:
            chat_template_kwargs = {**(chat_template_kwargs or {}), "tools": tools}
        if messages and isinstance(messages[0], dict):
            conversations: list[Conversation] = [messages]  # type: ignore[list-item]
        else:
            conversations = messages  # type: ignore[assignment]
        encoded: list[tuple[str | None, list[int]]] = [
            self.input_processor.encode_chat(
                conv,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                template_kwargs=chat_template_kwargs,
                chat_template=chat_template,
            )
            for conv in conversations
        ]
        return self._run(encoded, sampling_params, use_tqdm, lora_request=lora_request)

    # ---- the loop ---------------------------------------------------------------------------------
    def _params_list(self, sampling_params: Any, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params() for _ in range(n)]
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

    def _run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        sampling_params: Any,
        use_tqdm: bool,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        params_list = self._params_list(sampling_params, len(encoded))
        loras = _per_prompt(lora_request, len(encoded))
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

    def shutdown(self) -> None:
        self.client.shutdown()

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()


def _per_prompt(lora_request: LoRARequests, n: int) -> list[LoRARequest | None]:
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
