"""vLLM's score and rerank routes for an embedding (bi-encoder) model: relevance = cosine similarity of the two
texts' embeddings (embeddings.py; for normalized ones, their dot product).

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

from treadle_frontend.outputs import score_pairs, similarity
from treadle_frontend.server.common import ServerState
from treadle_frontend.server.embeddings import embed_inputs
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import RerankRequest, ScoreRequest


def _pairs(body: ScoreRequest) -> list[tuple[str, str]]:
    try:
        return score_pairs(body.text_1, body.text_2)
    except ValueError as e:
        raise APIError(400, str(e), param="text_2" if body.text_1 else "text_1") from None


class ScoringHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _embed(
        self, texts: list[str], request: Request, param: str, body: Any
    ) -> tuple[str, dict[str, list[float]], int]:
        distinct = list(dict.fromkeys(texts))
        rid, vectors, tokens = await embed_inputs(
            self.state, list(distinct), request, param, add_special_tokens=body.add_special_tokens,
            priority=body.priority, prefix="score-", truncate=body.truncate_prompt_tokens, model=body.model,
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
            "id": rid, "object": "list", "created": int(time.time()), "model": st.response_model(body.model), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })  # fmt: skip

    async def rerank(self, body: RerankRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if not body.documents:
            raise APIError(400, "documents must not be empty", param="documents")
        if not body.query:
            raise APIError(400, "query must not be empty", param="query")
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
        model = st.response_model(body.model)
        return JSONResponse(
            {"id": rid, "model": model, "usage": {"total_tokens": tokens}, "results": results}
        )
