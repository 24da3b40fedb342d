"""Beam search as vLLM runs it: a loop in the frontend over one-token engine requests.

Each step, every live beam of every running prompt becomes one engine request whose prompt is the beam's tokens
(the prompt, then what the beam generated) and which asks for one token plus the logprobs of the 2 * beam_width
most likely next tokens (HF transformers' candidate count). The engine's prefix cache already holds a beam's
earlier tokens, so a step computes only the tokens past the beam's last full cached block: a decode step's work,
not a prefill's. Each (beam, candidate token) pair is a new candidate whose cum_logprob adds the token's logprob.
A candidate that ends in the tokenizer's EOS (unless ignore_eos) is finished and set aside, with its EOS kept in
`tokens`; of the others, the beam_width best are the next step's beams. After max_tokens steps (or when the
context is full) the finished and the live beams together are ranked by vLLM's (HF's) score,
`cum_logprob / len(tokens) ** length_penalty`, where len counts the prompt and not a final EOS, and the best
beam_width are the result, best first. Ties keep candidates in the order the engine listed them.

Each step's pruning follows vLLM's two searches: its LLM ranks the live candidates by that score, its server by
cum_logprob. Live candidates of one step are all as long, so the two agree unless ignore_eos lets a candidate
end in EOS mid-search (the score counts that EOS out of the length).

Logprobs are the engine's raw ones (the model's distribution), so temperature only changes which token each step
samples; like vLLM, that sampled token is a candidate too, even when it is not among the 2 * beam_width.

`BeamSearch` is one prompt's search; `run_searches` drives many through a blocking step function, one engine
batch a step (the offline `LLM.beam_search`); the API server drives each prompt from asyncio (server/beam.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from treadle_frontend.input_processor import InputProcessor, PromptType
from treadle_frontend.outputs import Logprob, RequestOutput
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams, logprobs_limit

# one step of one beam: token id -> its Logprob (the engine's top-k, and the token it sampled)
Candidates = dict[int, Logprob]


@dataclass(frozen=True, slots=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams, validated at creation (ValueError naming the field, its value and its range)."""

    # beams kept each step and sequences returned, >= 1 (2 * beam_width within the engine's max_logprobs)
    beam_width: int
    max_tokens: int  # most tokens a sequence generates, >= 1
    ignore_eos: bool = False  # EOS is an ordinary token: no beam finishes early
    temperature: float = 0.0  # the one-token requests' sampling temperature (0: greedy), >= 0
    length_penalty: float = 1.0  # score = cum_logprob / len(tokens) ** length_penalty
    include_stop_str_in_output: bool = False  # the server's replies keep a finished beam's EOS in token_ids

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be in [1, inf], got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be in [1, inf], got {self.max_tokens}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be in [0, inf], got {self.temperature}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def check_width(self, max_logprobs: int, vocab_size: int) -> None:
        """ValueError when the engine's max_logprobs (-1: the whole vocabulary) cannot return the 2 * beam_width
        candidates a step asks for (vLLM fails there too, in its logprobs check)."""
        limit = logprobs_limit(max_logprobs, vocab_size)
        if 2 * self.beam_width > limit:
            raise ValueError(
                f"beam_width {self.beam_width} is too wide: each step asks for the 2 * beam_width most likely next "
                f"tokens, and the engine returns at most {limit} logprobs (max_logprobs); use a beam_width of at "
                f"most {limit // 2}, or start the engine with a larger max_logprobs"
            )

    def step_params(self) -> SamplingParams:
        """One step of one beam: one token, and the logprobs of the 2 * beam_width most likely."""
        return SamplingParams(
            max_tokens=1,
            logprobs=2 * self.beam_width,
            temperature=self.temperature,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )


@dataclass(slots=True)
class BeamSearchSequence:
    tokens: list[int]  # the prompt's token ids, then the generated ones (a finished beam's EOS last)
    logprobs: list[Candidates]  # per generated token: that step's candidates, the token among them
    cum_logprob: float = 0.0  # sum of the generated tokens' logprobs (natural log)
    text: str | None = None  # set on returned sequences: LLM.beam_search decodes `tokens`, prompt included
    finish_reason: str | None = None  # "stop": ended with EOS; "length": max_tokens or the context ran out
    stop_reason: int | str | None = None  # the EOS token id of a beam that ended with it


@dataclass(slots=True)
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # beam_width of them (fewer if fewer were found), best first


def beam_score(
    tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float
) -> float:
    """vLLM's (HF's) ranking score: cum_logprob over the length ** length_penalty, the length counting the prompt
    and not a final EOS."""
    num_tokens = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (num_tokens**length_penalty)


def first_candidates(out: RequestOutput) -> Candidates | None:
    """The candidates of a one-token request's step; None when the engine returned none (the beam ends)."""
    done = out.outputs[0] if out.outputs else None
    return done.logprobs[0] if done is not None and done.logprobs else None


class BeamSearch:
    """One prompt's search: its live beams and its finished ones. `max_steps` caps its steps (the caller fits
    max_tokens into the context left after the prompt); `prune_by_score` False prunes by cum_logprob (the server)."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: BeamSearchParams,
        eos_token_id: int | None,
        max_steps: int,
        prune_by_score: bool = True,
    ) -> None:
        self.params, self.eos_token_id, self.prune_by_score = params, eos_token_id, prune_by_score
        self.prompt_ids = list(prompt_ids)
        self.beams = [BeamSearchSequence(list(prompt_ids), [])]
        self.finished: list[BeamSearchSequence] = []
        self.steps_left = max_steps

    @property
    def is_done(self) -> bool:
        return not self.beams or self.steps_left <= 0

    def score(self, seq: BeamSearchSequence) -> float:
        return beam_score(seq.tokens, seq.cum_logprob, self.eos_token_id, self.params.length_penalty)

    def advance(self, steps: Sequence[Candidates | None]) -> None:
        """One step: `steps[i]` holds beam i's candidates (None: the engine gave none, and the beam ends)."""
        assert len(steps) == len(self.beams), f"{len(steps)} step results for {len(self.beams)} beams"
        live = []
        for beam, candidates in zip(self.beams, steps, strict=True):
            if candidates is None:
                continue
            for token, entry in candidates.items():
                seq = BeamSearchSequence(
                    [*beam.tokens, token], [*beam.logprobs, candidates], beam.cum_logprob + entry.logprob
                )
                if token == self.eos_token_id and not self.params.ignore_eos:
                    seq.finish_reason, seq.stop_reason = "stop", token
                    self.finished.append(seq)
                else:
                    live.append(seq)
        # stable: ties keep the engine's order
        live.sort(key=self.score if self.prune_by_score else _cum_logprob, reverse=True)
        self.beams = live[: self.params.beam_width]
        self.steps_left -= 1

    def best(self) -> list[BeamSearchSequence]:
        """The result: finished and live beams ranked together, the best beam_width first."""
        ranked = sorted(self.finished + self.beams, key=self.score, reverse=True)[: self.params.beam_width]
        for seq in ranked:
            seq.finish_reason = seq.finish_reason or "length"
        return ranked


def _cum_logprob(seq: BeamSearchSequence) -> float:
    return seq.cum_logprob


# (beams' tokens, the search each beam belongs to) -> each beam's candidates
StepFn = Callable[[list[list[int]], list["BeamSearch"]], list[Candidates | None]]


def run_searches(
    searches: list[BeamSearch],
    step: StepFn,
    concurrency_limit: int | None = None,
    on_done: Callable[[BeamSearch], None] | None = None,
) -> None:
    """Runs `searches` to their end, at most `concurrency_limit` at once (None: all), every live beam of every
    running search in one `step` call; a finished search's place goes to the next waiting one."""
    if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or concurrency_limit < 1):
        raise ValueError(f"concurrency_limit must be >= 1 (or None for no limit), got {concurrency_limit!r}")
    waiting, running = deque(searches), list[BeamSearch]()
    limit = concurrency_limit or len(searches)
    while waiting or running:
        while waiting and len(running) < limit:
            running.append(waiting.popleft())
        live = [search for search in running if not search.is_done]
        batch = [beam.tokens for search in live for beam in search.beams]
        results = step(batch, [search for search in live for _ in search.beams]) if batch else []
        start = 0
        for search in running:
            if not search.is_done:
                num_beams = len(search.beams)
                search.advance(results[start : start + num_beams])
                start += num_beams
        for search in [s for s in running if s.is_done]:
            running.remove(search)
            if on_done is not None:
                on_done(search)


def beam_search_offline(
    processor: InputProcessor,
    run: Callable[[list[tuple[str | None, list[int]]], SamplingParams, list[Any]], list[RequestOutput]],
    prompts: Sequence[PromptType] | str | dict[str, Any],
    params: BeamSearchParams,
    use_tqdm: bool = False,
    concurrency_limit: int | None = None,
    loras: Sequence[Any] | None = None,
) -> list[BeamSearchOutput]:
    """LLM.beam_search: `run` is the LLM's batch of engine requests (encoded prompts, params, each one's LoRA
    request -> final outputs, in order); `loras`: each prompt's LoRA request (None: the base model for all). A prompt
    the context cannot hold raises ValueError naming it; a prompt that leaves less room than max_tokens stops its
    beams where the context ends ("length"), as `LLM.generate` does."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    params.check_width(processor.model.max_logprobs, processor.model.vocab_size)
    items: list[PromptType] = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    eos_token_id = getattr(processor.tokenizer, "eos_token_id", None)
    searches = []
    for i, prompt in enumerate(items):
        try:
            _, ids = processor.encode_prompt(prompt)
            room = processor.fit_length(ids, SamplingParams(max_tokens=params.max_tokens)).max_tokens
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}" if len(items) > 1 else str(e)) from None
        searches.append(BeamSearch(ids, params, eos_token_id, room or 0))
    step_params = params.step_params()
    lora_of = {
        id(search): lora for search, lora in zip(searches, loras or [None] * len(searches), strict=True)
    }

    def step(batch: list[list[int]], owners: list[BeamSearch]) -> list[Candidates | None]:
        encoded: list[tuple[str | None, list[int]]] = [(None, ids) for ids in batch]
        outs = run(encoded, step_params, [lora_of[id(search)] for search in owners])
        return [first_candidates(out) for out in outs]

    if use_tqdm:  # one tick a prompt (vLLM's counts token steps, and turns off with a concurrency_limit)
        from tqdm.auto import tqdm

        with tqdm(total=len(searches), desc="Beam search", unit="prompt", dynamic_ncols=True) as bar:
            run_searches(searches, step, concurrency_limit, lambda _: bar.update(1))
    else:
        run_searches(searches, step, concurrency_limit)
    outputs = []
    for search in searches:
        best = search.best()
        for seq in best:  # vLLM's LLM: the whole sequence, prompt and special tokens included
            seq.text = processor.decoder.decode(seq.tokens, False)
        outputs.append(BeamSearchOutput(best))
    return outputs
