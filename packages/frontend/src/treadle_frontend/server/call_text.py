"""The content around tagged call blocks, for the parsers whose calls sit between markers in the reply text
(call_glm45.py, call_granite.py, call_deepseek.py), with the rules the hermes and qwen3_coder readers follow:
- text is released as it comes, less its trailing whitespace, held until more text follows it;
- the whitespace around a block is not content: the run before a block separates the text before it from text
  after it (one run, not both), and the run after a block is dropped;
- when the reply ends, held whitespace is content only in a reply that made no calls.
Invariant: the text released is the same however the reply is split into pieces.
"""

from __future__ import annotations

from treadle_frontend.server.call_scanner import WHITESPACE
from treadle_frontend.server.tool_calls import Piece, add_text, tag_prefix


class ContentOut:
    """Releases a tagged-call reply's content into pieces (see the module docstring)."""

    def __init__(self) -> None:
        self._space = ""  # whitespace held back after the text released
        self._after_block = False  # no text since a block ended: the whitespace after it is not content
        # text was released (the whitespace before a block then separates it from text after the block)
        self._wrote = False

    def add(self, pieces: list[Piece], text: str) -> None:
        """Release `text` as content, holding back its trailing whitespace."""
        if self._after_block:
            text = text.lstrip(WHITESPACE)
            self._after_block = not text
        text = self._space + text
        kept = text.rstrip(WHITESPACE)
        self._space = text[len(kept) :]
        self._wrote = self._wrote or bool(kept)
        add_text(pieces, kept)

    def add_until(self, pieces: list[Piece], buf: str, tag: str) -> tuple[str, bool]:
        """Release `buf`'s text before `tag` (an end that could begin it held back); (what stays in the buffer: from
        the tag on, or the held end; whether the tag is there)."""
        at = buf.find(tag)
        cut = at if at >= 0 else len(buf) - tag_prefix(buf, tag)
        self.add(pieces, buf[:cut])
        return buf[cut:], at >= 0

    def block_opens(self) -> None:
        """A call block is committed: the whitespace before it is kept only to separate text around it."""
        if not self._wrote:
            self._space = ""

    def block_closes(self) -> None:
        """A call block ended: the whitespace right after it is not content."""
        self._after_block = True

    def finish(self, pieces: list[Piece], num_calls: int) -> None:
        """The reply ended: held whitespace is content only when it made no calls."""
        if self._space and not num_calls:
            add_text(pieces, self._space)
        self._space, self._after_block, self._wrote = "", False, False
