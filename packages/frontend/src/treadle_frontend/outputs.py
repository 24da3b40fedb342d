"""RequestOutput / CompletionOutput: what `LLM.generate` and `AsyncLLM.generate` hand back (vLLM's shapes).

`out[0].outputs[0].text` is the generated text of the first completion of the first prompt. A RequestOutput
groups the `n` completions of one prompt; each CompletionOutput carries its `index` among them, so a DELTA
stream of an `n > 1` request can interleave completions and a consumer sorts them by `index`.

Logprobs follow vLLM: per generated position a dict token id -> `Logprob(logprob, rank, decoded_token)`,
holding the sampled token and the top-k; `prompt_logprobs[0]` is None (the first prompt token has no context).
A completion's `logprobs` is a `PositionLogprobs` and `prompt_logprobs` a `PromptPositionLogprobs`: read-only
sequences of those dicts, stored flat and built as they are read (position_logprobs.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from treadle_frontend.position_logprobs import PositionLogprobs

# Per position: token id -> its Logprob (the sampled token plus the top-k alternatives).
SampleLogprobs = Sequence[dict[int, "Logprob"]]
PromptLogprobs = Sequence[dict[int, "Logprob"] | None]


class Logprob(NamedTuple):
    """A tuple of atomic values, so that the garbage collector stops tracking it (and the position dicts holding
    only these) after its first pass: a long logprobs run keeps ~7 objects a token alive, and tracked they made
    every full collection slower (treadle_engine_core.heap)."""

    logprob: float  # natural log probability after the sampler's processing
    rank: int | None = None  # 1-based rank among the vocabulary (1 = most likely)
    decoded_token: str | None = None  # the token's text on its own


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n completions this is
    text: str  # generated text (cumulative or delta, per the request's output kind)
    token_ids: list[int]  # generated token ids (cumulative or delta, like text)
    cumulative_logprob: float | None  # sum of the sampled tokens' logprobs; None when logprobs weren't asked
    logprobs: PositionLogprobs | None  # per generated position; None when not asked
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str  # the caller's request id (the parent id for n > 1)
    prompt: str | None  # the prompt text, when the request came as text
    prompt_token_ids: list[int]  # the prompt as the engine saw it
    prompt_logprobs: PromptLogprobs | None  # per prompt position; None when not asked
    outputs: list[CompletionOutput]  # one per completion (only the changed ones for DELTA)
    finished: bool  # every completion of this request has finished
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None  # timings, when the frontend tracked them
    embedding: list[float] | None = None  # the prompt's embedding, when SamplingParams.pooling asked for it

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"outputs={self.outputs!r}, finished={self.finished})"
        )


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float  # time.time() when the frontend received the request
    first_token_time: float | None = None  # time.time() of the first generated token
    last_token_time: float | None = None  # time.time() of the latest generated token
    finished_time: float | None = None  # time.time() when the request finished
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds between output steps


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]  # L2-normalised, hidden_size floats


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """vLLM's shape for LLM.embed: `out.outputs.embedding`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass(slots=True)
class ScoringOutput:
    score: float  # cosine similarity of the two texts' embeddings


@dataclass(slots=True)
class ScoringRequestOutput:
    """vLLM's shape for LLM.score: `out.outputs.score`."""

    request_id: str
    outputs: ScoringOutput
    finished: bool = True


def similarity(a: list[float], b: list[float]) -> float:
    """The score of two embeddings: their cosine similarity (vLLM's; for unit vectors, their dot product)."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norms if norms else 0.0


def score_pairs(text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's score pairing: one text_1 against each text_2, or two lists of one length, pairwise. ValueError
    naming the mismatch otherwise."""
    left = [text_1] if isinstance(text_1, str) else list(text_1)
    right = [text_2] if isinstance(text_2, str) else list(text_2)
    if not left or not right:
        raise ValueError("text_1 and text_2 must not be empty")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise ValueError(
            f"text_1 has {len(left)} texts and text_2 {len(right)}: give one text_1, or as many as text_2"
        )
    return list(zip(left, right, strict=True))
