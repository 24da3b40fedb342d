"""vLLM's score and rerank routes for an embedding (bi-encoder) model: relevance = cosine similarity of the two
texts' embeddings (embeddings.py; unit vectors, so their dot product).

    POST /score, /v1/score            {text_1, text_2}: str and str (one pair), str and list (1 to N), or two lists
                                      of one length (pairwise) -> data[i] = {index, object: "score", score}
    POST /rerank, /v1/rerank, /v2/rerank  {query, documents, top_n}: the documents by relevance, best first ->
                                      results[j] = {index, document: {text}, relevance_score}; top_n 0 = all
Each distinct text is embedded once.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from treadle_frontend.outputs import similarity
from treadle_frontend.server.common import ServerState
from treadle_frontend.server.embeddings import embed_inputs
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import RerankRequest, ScoreRequest


def _pairs(body: ScoreRequest) -> list[tuple[str, str]]:
    left = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
    right = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
    if not left or not right:
        raise APIError(400, "text_1 and text_2 must not be empty", param="text_1" if not left else "text_2")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise APIError(
            400,
            f"text_1 has {len(left)} texts and text_2 {len(right)}: give one text_1, or as many as text_2",
            param="text_2",
        )
    return list(zip(left, right, strict=True))


class ScoringHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _embed(
        self, texts: list[str], request: Request, param: str, body: Any
    ) -> tuple[str, dict[str, list[float]], int]:
        distinct = list(dict.fromkeys(texts))
        rid, vectors, tokens = await embed_inputs(
            self.state, list(distinct), request, param, add_special_tokens=body.add_special_tokens,
            priority=body.priority, prefix="score-", truncate=body.truncate_prompt_tokens,
        )  # fmt: skip
        return rid, dict(zip(distinct, vectors, strict=True)), tokens

    async def score(self, body: ScoreRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        pairs = _pairs(body)
        rid, vec, tokens = await self._embed([t for pair in pairs for t in pair], request, "text_1", body)
        data = [
            {"index": i, "object": "score", "score": similarity(vec[a], vec[b])}
            for i, (a, b) in enumerate(pairs)
        ]
        return JSONResponse({
            "id": rid, "object": "list", "created": int(time.time()), "model": st.model_name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })  # fmt: skip

    async def rerank(self, body: RerankRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if not body.documents:
            raise APIError(400, "documents must not be empty", param="documents")
        if body.top_n < 0:
            raise APIError(400, f"top_n must be >= 0 (0 = every document), got {body.top_n}", param="top_n")
        rid, vec, tokens = await self._embed([body.query, *body.documents], request, "documents", body)
        scores = [similarity(vec[body.query], vec[doc]) for doc in body.documents]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or None]
        results = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = {"text": body.documents[i]}
            results.append(result)
        return JSONResponse(
            {"id": rid, "model": st.model_name, "usage": {"total_tokens": tokens}, "results": results}
        )
