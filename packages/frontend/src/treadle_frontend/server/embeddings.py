"""POST /v1/embeddings (OpenAI's shape): each input's embedding from the served decoder model.

An embedding pools the input's final hidden states as the server's `--pooler-config` says (vLLM's): by default the
last token's, L2-normalised (what decoder embedding models such as Qwen3-Embedding and e5-mistral use; vLLM's
default for them); MEAN their mean; CLS the first token's; `normalize: false` leaves the vector as pooled, and a
request's own `normalize` (vLLM's extra) overrides the server's. Each input runs through the engine as a
prompt-only request (`max_tokens` 0, `SamplingParams.pooling`), so it may fill max_model_len; the token its
prefill samples is dropped. Inputs: a string, a list of strings, a token-id list, or a list of
token-id lists. `encoding_format` "base64" sends the float32 bytes (little-endian), as the openai SDK asks for by
default. `dimensions` is refused: the models served have no Matryoshka training, so a cut vector would not be an
embedding.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from treadle_frontend.input_processor import embedding_params
from treadle_frontend.server.common import ServerState, check_priority, new_id, prompt_list, truncate_prompt
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import EmbeddingRequest
from treadle_frontend.server.streams import collect_all, until_disconnect
from treadle_model_runner.sampling_params import RequestOutputKind


async def embed_inputs(
    st: ServerState,
    items: list[str | list[int]],
    request: Request,
    param: str,
    *,
    add_special_tokens: bool = True,
    priority: int = 0,
    prefix: str = "embd-",
    truncate: int | None = None,
    model: str | None = None,
    normalize: bool | None = None,
) -> tuple[str, list[list[float]], int]:
    """(request id, each item's embedding, prompt tokens in all): the engine runs one pooling request per item
    (under the LoRA adapter `model` names, if it names one), pooled as --pooler-config says; `normalize`: the
    request's own choice (None: the pooler's)."""
    ip = st.llm.input_processor
    params = embedding_params(ip.model.pooler, normalize).clone(output_kind=RequestOutputKind.FINAL_ONLY)
    encoded = []
    for item in items:
        if isinstance(item, str) and not item:
            raise APIError(400, f"{param} must not contain empty strings", param=param)
        text, ids = ip.encode_prompt(item, add_special_tokens=add_special_tokens)
        limit = ip.model.max_model_len
        if truncate is not None:  # the last tokens
            text, ids = None, truncate_prompt(ids, truncate, limit)
        if len(ids) > limit:  # vLLM's words for a pooling input
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids)} tokens in the input for embedding generation. Please reduce the "
                                "length of the input.", param=param)  # fmt: skip
        encoded.append((text, ids))
    check_priority(st, priority)
    rid = new_id(prefix)
    lora = st.lora_request(model)
    gens = [
        st.llm.generate(text or ids, params.clone(), f"{rid}-{i}", prompt_token_ids=ids, priority=priority,
                        lora_request=lora)
        for i, (text, ids) in enumerate(encoded)
    ]  # fmt: skip
    finals = await until_disconnect(request, collect_all(gens))
    if any(out.embedding is None for out in finals):
        raise APIError(500, "the engine returned no embedding", code="internal_error")
    return rid, [list(out.embedding or []) for out in finals], sum(len(ids) for _, ids in encoded)


class EmbeddingsHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, body: EmbeddingRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported: this model has no Matryoshka embeddings",
                           param="dimensions")  # fmt: skip
        rid, vectors, num_tokens = await embed_inputs(
            st,
            prompt_list(body.input, "input"),
            request,
            "input",
            add_special_tokens=body.add_special_tokens,
            priority=body.priority,
            truncate=body.truncate_prompt_tokens,
            model=body.model,
            normalize=body.normalize,
        )
        data = []
        for i, vector in enumerate(vectors):
            sent: Any = vector
            if body.encoding_format == "base64":
                sent = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": sent})
        return JSONResponse({
            "id": rid,
            "object": "list",
            "created": int(time.time()),
            "model": st.response_model(body.model),
            "data": data,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        })  # fmt: skip
