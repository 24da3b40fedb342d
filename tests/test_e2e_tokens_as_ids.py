"""vLLM's per-request `return_tokens_as_token_ids` on the shared real server (openai SDK): the logprob tokens are
"token_id:{id}" of the ids the engine took and produced (the prompt's, echoed, and `return_token_ids`' generated
ones), and the prompt's top-logprobs keys are the ids vLLM's `prompt_logprobs` field reports for each position."""

from __future__ import annotations

from typing import Any

import openai
from e2e_helpers import MODEL_NAME

PROMPT = [5, 17, 33, 60, 8, 120]


def test_completion_tokens_are_the_engines_ids(oai_lax: openai.OpenAI) -> None:
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True, "prompt_logprobs": 2}
    out = oai_lax.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                     echo=True, extra_body=extra)  # fmt: skip
    choice = out.choices[0]
    fields: Any = choice.model_extra
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    assert fields["prompt_token_ids"] == PROMPT and len(fields["token_ids"]) == 6
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in PROMPT + fields["token_ids"]]
    prompt_tops = choice.logprobs.top_logprobs[1 : len(PROMPT)]
    for position, top in zip(fields["prompt_logprobs"][1:], prompt_tops, strict=True):
        assert top == {f"token_id:{t}": entry["logprob"] for t, entry in position.items()}


def test_streamed_chat_tokens_are_the_engines_ids(oai: openai.OpenAI) -> None:
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True, extra_body=extra))  # fmt: skip
    ids = [t for chunk in chunks for c in chunk.choices for t in (c.model_extra or {}).get("token_ids") or []]
    entries = [e for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert len(ids) == 6 and [e.token for e in entries] == [f"token_id:{t}" for t in ids]
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2 for e in entries)
    assert all(t.token.startswith("token_id:") for e in entries for t in e.top_logprobs)
