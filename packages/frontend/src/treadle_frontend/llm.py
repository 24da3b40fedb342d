"""LLM: offline batched generation, the same EngineCore run in this process (no ZMQ, no server; with
`engine_process=True`, in a process of its own behind ZMQ, as the server runs it).

    llm = LLM()                                  # the embedded SmolLM2-135M-Instruct
    out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    out[0].outputs[0].text

`generate` adds every prompt, then steps the engine until all are done and returns RequestOutputs in prompt
order (FINAL_ONLY outputs, so no per-step text is built for nobody; that loop is batch_runner.py's). `chat`
renders conversations with the chat template first. `params=None` takes the model's generation_config.json
defaults; a list of params gives one per prompt, and so does a list of `lora_request`s (LoRA adapters, with
`enable_lora=True`). A progress bar (tqdm) shows when `use_tqdm` and there is more than one prompt.
`beam_search` is vLLM's beam search, a loop of one-token requests over the same engine (beam_search.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

from treadle_engine_core.heap import freeze_startup_heap
from treadle_frontend.batch_runner import BatchRunner, LoRARequests, loras_per_prompt, params_per_prompt
from treadle_frontend.beam_search import BeamSearchOutput, BeamSearchParams, beam_search_offline
from treadle_frontend.engine_client import SyncEngineClient, make_engine_request
from treadle_frontend.input_processor import InputProcessor, PromptType, embedding_params, keep_last
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
from treadle_frontend.pooling_params import PoolingParams, check_truncate
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]


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
        reference counting only until `shutdown`, which unfreezes it."""
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
        self._runner = BatchRunner(client, input_processor, self.output_processor, request_factory)

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
        encoded = [self.input_processor.encode_prompt(p) for p in prompt_list(prompts)]
        return self._run(encoded, sampling_params, use_tqdm, priority, lora_request)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        use_tqdm: bool = True,
        lora_request: LoRARequests = None,
        *,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed on a decoder model: each prompt's embedding, its final hidden states pooled as the
        engine's pooler_config says (default: the last token's, L2-normalised; `LLM(pooler_config={"pooling_type":
        "MEAN", "normalize": False})`: their mean, as is); `out.outputs.embedding` is a list of hidden_size floats.
        `lora_request`: as in `generate`; `pooling_params`: vLLM's per-call options (normalize,
        truncate_prompt_tokens); `truncate_prompt_tokens`: each prompt's last N tokens (-1: max_model_len)."""
        pooling = pooling_params or PoolingParams()
        keep = (
            truncate_prompt_tokens if truncate_prompt_tokens is not None else pooling.truncate_prompt_tokens
        )
        check_truncate(keep)
        params = embedding_params(self.input_processor.model.pooler, pooling.normalize)
        if keep is not None:  # the last tokens of each prompt, as token ids
            limit = self.input_processor.model.max_model_len
            encoded = [self.input_processor.encode_prompt(p)[1] for p in prompt_list(prompts)]
            prompts = [{"prompt_token_ids": keep_last(ids, keep, limit)} for ids in encoded]
        outs = self.generate(prompts, params, use_tqdm, lora_request=lora_request)
        return [
            EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding or []))
            for o in outs
        ]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        use_tqdm: bool = True,
        *,
        lora_request: LoRARequest | None = None,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score for an embedding model: the cosine similarity of each pair's embeddings (`embed`, with
        its `lora_request`, `pooling_params` and `truncate_prompt_tokens`). One text_1 against each text_2, or two
        lists of one length, pairwise."""
        pairs = score_pairs(text_1, text_2)
        distinct = list(dict.fromkeys(t for pair in pairs for t in pair))
        embedded = self.embed(distinct, use_tqdm, lora_request, pooling_params=pooling_params,
                              truncate_prompt_tokens=truncate_prompt_tokens)  # fmt: skip
        vectors = {t: o.outputs.embedding for t, o in zip(distinct, embedded, strict=True)}
        return [
            ScoringRequestOutput(str(i), ScoringOutput(similarity(vectors[a], vectors[b])))
            for i, (a, b) in enumerate(pairs)
        ]

    def beam_search(
        self,
        prompts: Sequence[PromptType] | str | dict[str, Any],
        params: BeamSearchParams,
        lora_request: LoRARequests = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search (beam_search.py): per prompt, up to `params.beam_width` sequences, best first,
        whose `tokens` and `text` hold the prompt too. Each step sends every live beam of every running prompt to the
        engine as one batch; `concurrency_limit` caps how many prompts run at once (None: all of them);
        `lora_request`: as in `generate`, one adapter for every prompt or one per prompt (None: the base model)."""
        count = 1 if isinstance(prompts, (str, dict)) else len(prompts)
        loras = loras_per_prompt(lora_request, count)
        return beam_search_offline(
            self.input_processor, lambda enc, sp, lr: self._run(enc, sp, False, lora_request=lr), prompts, params,
            use_tqdm, concurrency_limit, loras,
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
    def _run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        sampling_params: Any,
        use_tqdm: bool,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequests = None,
    ) -> list[RequestOutput]:
        """Every encoded prompt through the engine (batch_runner.py), in prompt order."""
        params_list = params_per_prompt(sampling_params, len(encoded), self.get_default_sampling_params)
        loras = loras_per_prompt(lora_request, len(encoded))
        return self._runner.run(encoded, params_list, use_tqdm, priority, loras)

    def shutdown(self) -> None:
        """Stop the engine. The heap frozen at start-up goes back to the garbage collector: an in-process engine's
        objects may form reference cycles (under tensor parallelism rank 0's adapter cache refers back to its
        executor), which only the collector frees, and the next `gc.collect()` must free the engine's runner,
        weights and KV cache for a next LLM in this process to size its own."""
        self.client.shutdown()
        gc.unfreeze()

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()


def prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """`prompts` as a list of prompts: one prompt (a string, a dict or a list of token ids) or a list of them."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)  # type: ignore[arg-type]
    raise TypeError(
        "prompts must be a string, a list of token ids, a prompt dict ({'prompt': ...} or "
        f"{{'prompt_token_ids': ...}}) or a list of those; got {type(prompts).__name__}"
    )
