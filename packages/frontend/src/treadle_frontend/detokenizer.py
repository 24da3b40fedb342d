"""Incremental detokenization: token ids arrive a few at a time; text leaves only when it is final.

A character may span tokens (byte-level BPE splits a 4-byte emoji or a 3-byte CJK character over several
tokens), and a tokenizer may decode a token differently depending on what precedes it (SentencePiece drops
a leading space at the start of a sequence). So each step decodes a short window twice:

    prefix_text = decode(ids[prefix_offset:read_offset])    # text already emitted, in its own context
    full_text   = decode(ids[prefix_offset:])                # the same context plus the new tokens

and emits `full_text[len(prefix_text):]` only when it does not end in U+FFFD (the replacement character a
decoder produces for an incomplete UTF-8 sequence). Then the window slides: prefix_offset = read_offset,
read_offset = len(ids). While the tail is incomplete nothing moves, so the next token completes it; while new
tokens make no text (skipped special tokens) only read_offset moves, so the window never starts at a token that
decodes to nothing (after which a SentencePiece decoder would drop the next token's leading space).

Invariants: the emitted deltas concatenate to `decode(output_ids)` of the whole output (for tokenizers whose
decode is context-free beyond the window), `flush()` at the end emits whatever is still held back (a genuine
U+FFFD the model produced is not lost), and each step costs O(window), not O(output length).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 6  # prompt tokens kept as left context for the first output tokens
_MAX_SILENT_WINDOW = 32  # tokens the window may grow to while new tokens make no text


class TokenDecoder:
    """Fast decode of id lists: the Rust tokenizer when the HF tokenizer has one, else `tokenizer.decode`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self._rust = backend if backend is not None and hasattr(backend, "decode") else None

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not ids:
            return ""
        if self._rust is not None:
            return str(self._rust.decode(ids, skip_special_tokens=skip_special_tokens))
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, holding back incomplete characters."""

    def __init__(
        self, decoder: TokenDecoder, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.decoder = decoder
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.ids: list[int] = context  # left context + every output token so far
        self.prefix_offset = 0  # window start: text before it was emitted long ago
        self.read_offset = len(context)  # tokens before it have been emitted as text
        self.output_text = ""  # everything emitted so far
        # (ids length, prefix_offset, read_offset) before the first of the `update_at_once` decodes since the window
        # last matched the incremental one's (None: it matches); see `_sync_window`
        self._replay_from: tuple[int, int, int] | None = None

    def update(self, new_token_ids: list[int]) -> str:
        """Appends tokens; returns the newly final text (may be empty while a character is incomplete)."""
        return "".join(self.update_each(new_token_ids))

    def update_each(self, new_token_ids: list[int]) -> list[str]:
        """`update`, as the text each token made final (one entry per token, "" while a character is incomplete)."""
        self._sync_window()
        deltas = []
        for tok in new_token_ids:
            self.ids.append(tok)
            deltas.append(self._step(final=False))
        self.output_text += "".join(deltas)
        return deltas

    def update_at_once(self, new_token_ids: list[int]) -> str:
        """Like `update`, in one decode of the window instead of two per token, for a caller that reads the text
        only when the request ends. Where that decode holds a U+FFFD (an incomplete or invalid UTF-8 sequence,
        which a byte-fallback decoder renders differently in a longer window) it redoes them one by one, so the
        text is always the incremental one."""
        state = (len(self.ids), self.prefix_offset, self.read_offset)
        self.ids.extend(new_token_ids)
        if self.read_offset >= len(self.ids):
            return ""
        delta = self._step(final=False)
        if delta and _REPLACEMENT not in delta:
            self.output_text += delta
            if self._replay_from is None:
                self._replay_from = state
            return delta
        length, self.prefix_offset, self.read_offset = state
        del self.ids[length:]
        return self.update(new_token_ids)

    def _sync_window(self) -> None:
        """Moves the window to where the incremental steps would have left it. One decode for many tokens leaves
        it starting before all of them, and a byte-fallback decoder renders an incomplete tail differently in a
        longer window (a lone byte after two 2-byte characters: 3 U+FFFD against the steps' 2), so before any
        step-by-step work the steps are replayed over those tokens (their text was emitted already and is the
        same: only the offsets are kept)."""
        if self._replay_from is None:
            return
        length, self.prefix_offset, self.read_offset = self._replay_from
        self._replay_from = None
        replayed = self.ids[length:]
        del self.ids[length:]
        for tok in replayed:
            self.ids.append(tok)
            self._step(final=False)

    def flush(self) -> str:
        """Emits the held-back tail as it decodes now (called once, when the request finishes)."""
        if self.read_offset >= len(self.ids):
            return ""
        delta = self._step(final=True)
        self.output_text += delta
        return delta

    def _step(self, final: bool) -> str:
        prefix_text = self.decoder.decode(
            self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens
        )
        full_text = self.decoder.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if not final and (full_text.endswith(_REPLACEMENT) or len(full_text) < len(prefix_text)):
            return ""  # an incomplete character (or a decoder that needs more context): wait
        # Text already emitted is final even if the new token changed how the context decodes (rare):
        # emit only what lies beyond it.
        delta = full_text[len(prefix_text) :]
        # Tokens that made no text (a skipped special token) stay in the window: a decoder that drops the leading
        # space of what it decodes (SentencePiece's) would drop the next token's space in a window starting there.
        if delta or len(self.ids) - self.prefix_offset > _MAX_SILENT_WINDOW:
            self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta
