"""N-gram (prompt lookup) proposer: drafts for speculative decoding from the request's own tokens.

Theory (vLLM's ngram method). Let t = prompt + output, T = len(t). For the longest n in
[prompt_lookup_min, prompt_lookup_max] such that the suffix t[T-n:] also occurs at an earlier start s
(s + n <= T - 1, overlaps allowed), take the EARLIEST such s and propose the tokens that followed it,
t[s+n : s+n+k], at most k of them and never past the end of t. No such n: no drafts.

Batched. Every step the scheduler asks for drafts of all decoding requests at once. Each request owns a row
of a host buffer `[rows, width]` (int32) mirroring its tokens; a step only copies the tokens appended since
the last one. The match is a few vectorized passes over the rows: `ok[r, c]` starts as "token c equals the
last token" (for c < T_r - 1) and the j-th pass ANDs "token c - j equals the j-th token from the end", so after
pass j `ok[r, c]` says the suffix of length j + 1 ends at c as well. `argmax` over c then gives the earliest
end. Cost O(rows x width x prompt_lookup_max) element operations, about 1 ms for 256 requests of 2k tokens
(tests/test_spec_ngram.py::test_proposer_cost prints it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from treadle_model_runner.config import SpeculativeConfig

_MIN_WIDTH = 256  # initial buffer width (tokens per row); doubled on demand up to max_model_len


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        self.num_speculative_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.max_model_len = max_model_len
        self.buf = np.zeros((8, _MIN_WIDTH), dtype=np.int32)  # [rows, width]: each row mirrors one request
        self.lengths = np.zeros(8, dtype=np.int64)  # tokens mirrored per row (0: a free row)
        self.rows: dict[str, int] = {}  # request id -> its row
        self.free_rows: list[int] = list(range(7, -1, -1))  # lowest row last (popped first)

    # ---- rows -------------------------------------------------------------------------------------
    def remove(self, request_id: str) -> None:
        """Forget a request that left the engine (its row is reused)."""
        row = self.rows.pop(request_id, None)
        if row is not None:
            self.lengths[row] = 0
            self.free_rows.append(row)

    def _sync(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Mirror the tokens appended since last time into the request's row; returns the row."""
        row = self.rows.get(request_id)
        if row is None:
            if not self.free_rows:
                self._grow_rows()
            row = self.rows[request_id] = self.free_rows.pop()
        have, n = int(self.lengths[row]), len(token_ids)
        if n > have:
            if n > self.buf.shape[1]:
                self._grow_width(n)
            self.buf[row, have:n] = token_ids[have:n]
            self.lengths[row] = n
        return row

    def _grow_rows(self) -> None:
        old = self.buf.shape[0]
        self.buf = np.concatenate([self.buf, np.zeros_like(self.buf)])
        self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        self.free_rows.extend(range(2 * old - 1, old - 1, -1))

    def _grow_width(self, need: int) -> None:
        width = max(need, min(2 * self.buf.shape[1], self.max_model_len))
        wider = np.zeros((self.buf.shape[0], width), dtype=self.buf.dtype)
        wider[:, : self.buf.shape[1]] = self.buf
        self.buf = wider

    # ---- proposing --------------------------------------------------------------------------------
    def propose(
        self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], max_drafts: Sequence[int]
    ) -> list[list[int]]:
        """Drafts for each request (parallel lists): at most min(num_speculative_tokens, max_drafts[i]) tokens,
        none past max_model_len. `token_ids[i]` is request i's prompt + output (append-only between calls)."""
        rows = [self._sync(rid, toks) for rid, toks in zip(request_ids, token_ids, strict=True)]
        if not rows:
            return []
        best_n, best_end = self._match(np.asarray(rows))
        out: list[list[int]] = []
        buf, k = self.buf, self.num_speculative_tokens
        for i, row in enumerate(rows):
            n = int(best_n[i])
            length = int(self.lengths[row])
            limit = min(k, max_drafts[i], self.max_model_len - length)
            if n == 0 or limit <= 0:
                out.append([])
                continue
            start = int(best_end[i]) + 1
            out.append(buf[row, start : min(start + limit, length)].tolist())
        return out

    def would_draft(
        self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], max_drafts: Sequence[int]
    ) -> bool:
        """Whether `propose` would draft for any of them now."""
        return any(self.propose(request_ids, token_ids, max_drafts))

    def _match(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per request: (longest matched n in [min_n, max_n], or 0; the end index of its earliest occurrence)."""
        num = len(rows)
        if int(rows.max()) == num - 1:  # the rows are exactly 0..num-1 (ids are unique): a view, no copy
            toks, lengths, pick = self.buf[:num], self.lengths[:num], rows
        else:
            toks, lengths, pick = self.buf[rows], self.lengths[rows], np.arange(num)
        width = int(lengths.max())
        toks = toks[:, :width]  # [num, width]
        best_n = np.zeros(num, dtype=np.int64)
        best_end = np.zeros(num, dtype=np.int64)
        if width < 2:
            return best_n, best_end
        ar = np.arange(num)
        # ok[r, c]: the suffix matched so far also ends at token c, an earlier occurrence (c < T_r - 1)
        ok = toks[:, :-1] == toks[ar, lengths - 1][:, None]  # [num, width - 1]
        ok &= np.arange(width - 1) < (lengths - 1)[:, None]
        for n in range(1, min(self.max_n, width - 1) + 1):
            if n > 1:  # extend every match one token to the left: token c - j against the j-th from the end
                j = n - 1
                ok[:, j:] &= toks[:, : width - 1 - j] == toks[ar, np.maximum(lengths - 1 - j, 0)][:, None]
                ok[:, j - 1] = False  # an n-gram cannot end before index n - 1
            if n >= self.min_n:
                first = ok.argmax(axis=1)  # the earliest end (all False: 0, filtered by `has`)
                has = ok[ar, first]
                if not has.any():
                    break  # no suffix of length n recurs, so no longer one does
                best_n[has] = n
                best_end[has] = first[has]
        return best_n[pick], best_end[pick]
