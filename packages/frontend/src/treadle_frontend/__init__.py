"""treadle-frontend: what users touch — LLM, AsyncLLM, RequestOutput, and the OpenAI/Anthropic server.

Input processing (tokenizer, chat template, generation-config defaults, validation), output processing
(incremental detokenization, stop strings, logprobs, n > 1 fan-out) and the FastAPI server live here;
the engine core below only sees token ids.
"""

from __future__ import annotations

from treadle_frontend.async_llm import AsyncLLM
from treadle_frontend.beam_search import BeamSearchParams
from treadle_frontend.engine_client import EngineDeadError
from treadle_frontend.input_processor import TextPrompt, TokensPrompt
from treadle_frontend.llm import LLM
from treadle_frontend.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from treadle_frontend.pooling_params import PoolingParams
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams
from treadle_model_runner.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineDeadError",
    "LoRARequest",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "ScoringOutput",
    "ScoringRequestOutput",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
]
