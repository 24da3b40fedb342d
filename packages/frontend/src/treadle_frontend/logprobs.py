"""Logprob decoding: engine logprobs (parallel id/value lists) -> vLLM-shaped dicts with token text and bytes.

The engine sends, per position, `Logprobs(token_ids=[chosen, top1..topk], logprobs=[...], chosen_rank)`;
the top-k entries have ranks 1..k. The frontend turns each position into `{token_id: Logprob(logprob, rank,
decoded_token)}`. A token's text is decoded on its own (a lone byte of a multi-byte character decodes to
U+FFFD, as in vLLM); `token_bytes` recovers the token's exact bytes for byte-level BPE vocabularies
(GPT-2 byte alphabet) and SentencePiece byte tokens (`<0xAB>`), which is what OpenAI's `bytes` field wants.

OpenAI's two reply shapes are built here too: chat's `logprobs.content` list (`chat_logprobs`) and the
completions route's legacy block with its text offsets (`legacy_logprobs`, `TextOffsets`). They name each token by
its text, or, with vLLM's `return_tokens_as_token_ids`, as "token_id:{id}" (`TOKEN_IDS`; `bytes` are then that
string's bytes, as vLLM sends them; text offsets still count the text).

JSON cannot carry -inf or NaN, so `clamp_logprob` maps them (and anything below) to -9999.0.
"""

from __future__ import annotations

import codecs
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache, partial
from operator import itemgetter
from typing import Any, Protocol, TypeVar

from treadle_frontend.detokenizer import TokenDecoder
from treadle_frontend.outputs import Logprob, PromptLogprobs, SampleLogprobs

LOGPROB_FLOOR = -9999.0  # what -inf / NaN / very negative logprobs become in JSON
_V = TypeVar("_V")


def clamp_logprob(value: float) -> float:
    if math.isnan(value) or value < LOGPROB_FLOOR:
        return LOGPROB_FLOOR
    return float(value)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable alphabet for raw bytes, inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class _Memo(dict[int, _V]):
    """Values per token id, each computed by `compute` on its first read and kept: a read of a known id is a plain
    dict lookup (``memo[t]``, ``map(memo.__getitem__, ids)``), with no Python call."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[int], _V]) -> None:
        super().__init__()
        self.compute = compute

    def __missing__(self, token_id: int) -> _V:
        value = self[token_id] = self.compute(token_id)
        return value


def _decode_alone(decoder: TokenDecoder, token_id: int) -> str:
    """The token's text decoded on its own (a lone byte of a multi-byte character is U+FFFD)."""
    return decoder.decode([token_id], skip_special_tokens=False)


def _token_bytes(
    tokenizer: Any, byte_level: bool, text: Callable[[int], str], token_id: int
) -> tuple[int, ...]:
    """The token's bytes: its piece's for a byte-level vocabulary or a <0xNN> byte token, else its text's."""
    piece = None
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # an id outside the vocabulary: fall back to the decoded text
        piece = None
    if isinstance(piece, str):
        if byte_level and all(c in _byte_decoder() for c in piece):
            return tuple(_byte_decoder()[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return (int(piece[3:5], 16),)
            except ValueError:
                pass
    return tuple(text(token_id).encode("utf-8"))


class TokenTexts:
    """Decodes single tokens (text and bytes), memoized per token id. One per tokenizer (the InputProcessor's): the
    memos belong to this object, so two tokenizers in a process never share a text. The memos hold no reference
    back to it (no cycle: it goes with its InputProcessor)."""

    def __init__(self, tokenizer: Any, decoder: TokenDecoder | None = None) -> None:
        self.tokenizer = tokenizer
        self.decoder = decoder or TokenDecoder(tokenizer)
        text_memo: _Memo[str] = _Memo(partial(_decode_alone, self.decoder))
        # tuples, not lists: a reply's entries that hold them are then dicts the garbage collector does not track
        # (a whole-vocabulary position builds 49k of them; tracked, every full collection walked them all)
        bytes_memo: _Memo[tuple[int, ...]] = _Memo(
            partial(_token_bytes, tokenizer, self._is_byte_level(tokenizer), text_memo.__getitem__)
        )
        # A token's text and its bytes (JSON writes the tuple as OpenAI's list of ints): the memos' own lookups, so
        # reading a known token (every logprob entry read) runs no Python code
        self.text: Callable[[int], str] = text_memo.__getitem__
        self.token_bytes: Callable[[int], tuple[int, ...]] = bytes_memo.__getitem__

    @staticmethod
    def _is_byte_level(tokenizer: Any) -> bool:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        decoder = getattr(backend, "decoder", None)
        return decoder is not None and "ByteLevel" in type(decoder).__name__ + repr(decoder)[:200]

    def texts(self, token_ids: Iterable[int]) -> Iterator[str]:
        """`text` of each id, lazily."""
        return map(self.text, token_ids)


class TokenNames(Protocol):
    """How a reply's logprob entries name a token: `text` (the entry's `token`, a top_logprobs key) and `bytes`."""

    def text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> tuple[int, ...]: ...


class TokenIdNames:
    """vLLM's return_tokens_as_token_ids: every token named "token_id:{id}", which any id has, even one whose text is
    not valid UTF-8 on its own or equals another token's; its bytes are the name's."""

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"

    def token_bytes(self, token_id: int) -> tuple[int, ...]:
        return tuple(self.text(token_id).encode())


TOKEN_IDS = TokenIdNames()


# Logprob(*entry) without its Python-level __new__, callable from C (map)
_new_logprob = partial(tuple.__new__, Logprob)


def position_dict(
    texts: TokenTexts | None, token_ids: Sequence[int], logprobs: Sequence[float], chosen_rank: int | None
) -> dict[int, Logprob]:
    """One position's logprobs as {token_id: Logprob}, the chosen token first (then the top-k, ranks 1..k);
    `texts` None (a request with detokenize=False) leaves every decoded_token None, as vLLM does. Built in bulk:
    a whole-vocabulary position holds V entries."""
    if not token_ids:
        return {}
    ranks = itertools.chain((chosen_rank,), range(1, len(token_ids)))
    decoded: Iterable[str | None] = itertools.repeat(None) if texts is None else texts.texts(token_ids)
    # zip without its strict keyword (the lists are aligned, append_position checks it): parsing the keyword cost
    # a fifth of a 6-entry position
    entries = list(map(_new_logprob, zip(logprobs, ranks, decoded)))  # noqa: B905
    out = dict(zip(token_ids, entries))  # noqa: B905
    # the chosen token, also in the top-k, keeps its own entry (first, its rank)
    out[token_ids[0]] = entries[0]
    return out


def prompt_logprobs_json(
    texts: TokenTexts, positions: Sequence[dict[int, Logprob] | None] | None
) -> list[Any] | None:
    """vLLM's `prompt_logprobs` field: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}}, with -inf clamped like every logprob here."""
    if positions is None:
        return None
    return [
        None if pos is None else {
            str(t): {"logprob": clamp_logprob(e.logprob), "rank": e.rank, "decoded_token": texts.text(t)}
            for t, e in pos.items()
        }
        for pos in positions
    ]  # fmt: skip


def chat_logprobs(
    texts: TokenNames, token_ids: list[int], positions: SampleLogprobs, num_top: int
) -> list[dict[str, Any]]:
    """Chat completions' `logprobs.content`: per sampled token its text, logprob, bytes and `num_top` top
    alternatives (OpenAI's shape; -1: every token the position holds, the whole vocabulary)."""
    # a PositionLogprobs reads its values without building the Logprobs (position_logprobs.py)
    value_dicts = getattr(positions, "value_dicts", None)
    per_position: Iterable[dict[int, float]] = (
        value_dicts()
        if value_dicts is not None
        else ({t: e.logprob for t, e in pos.items()} for pos in positions)
    )
    content = []
    text, token_bytes, floor = texts.text, texts.token_bytes, LOGPROB_FLOOR
    for tok, values in zip(token_ids, per_position, strict=False):
        lp = values.get(tok)
        ranked = sorted(values.items(), key=itemgetter(1), reverse=True)
        tops = [
            # clamp_logprob inlined: NaN compares False, so it too becomes the floor
            {"token": text(t), "logprob": float(v) if v >= floor else floor, "bytes": token_bytes(t)}
            for t, v in (ranked if num_top < 0 else ranked[:num_top])
        ]
        content.append(
            {
                "token": text(tok),
                "logprob": clamp_logprob(lp) if lp is not None else floor,
                "bytes": token_bytes(tok),
                "top_logprobs": tops,
            }
        )
    return content


class TextOffsets:
    """Each token's text_offset: the characters of the text wholly before the token's first byte, counted by
    decoding the tokens' bytes incrementally (a token that starts inside a multi-byte character, as byte-level
    tokens of CJK text do, points at that character). Offsets never decrease, stay within the decoded text, and
    are the same whether the tokens arrive at once or in stream chunks (keep one tracker per choice)."""

    def __init__(self, texts: TokenTexts, start: int) -> None:
        self.texts, self.chars = texts, start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token_ids: list[int]) -> list[int]:
        offsets = []
        for tok in token_ids:
            offsets.append(self.chars)
            self.chars += len(self._utf8.decode(bytes(self.texts.token_bytes(tok))))
        return offsets


def legacy_logprobs(
    texts: TokenNames,
    token_ids: list[int],
    positions: SampleLogprobs | PromptLogprobs,
    num_top: int,
    offsets: TextOffsets,
) -> dict[str, list[Any]]:
    """OpenAI's completions logprobs block for `token_ids` (named by `texts`), with text offsets from `offsets`."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for tok, pos in zip(token_ids, positions, strict=False):
        tokens.append(texts.text(tok))
        if pos is None:
            token_lps.append(None)
            tops.append(None)
            continue
        lp = pos.get(tok)
        token_lps.append(clamp_logprob(lp.logprob) if lp is not None else -9999.0)
        top: dict[str, float] = {}
        for tid, entry in sorted(pos.items(), key=lambda kv: kv[1].rank or 10**9):
            if tid == tok or (entry.rank is not None and entry.rank <= num_top):
                top.setdefault(texts.text(tid), clamp_logprob(entry.logprob))
        tops.append(top)
    return {
        "tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
        "text_offset": offsets.take(token_ids[: len(tokens)]),
    }  # fmt: skip
