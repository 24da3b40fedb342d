"""A GGUF file's SentencePiece vocabulary (llama.cpp tokenizer model ``llama``) as an HF ``tokenizers`` pipeline.

Theory: llama.cpp's converter writes a SentencePiece BPE model (Llama 1/2, Mistral 7B, Phi-3, Gemma 1-3) as three
arrays in id order and no merges: the pieces (``tokenizer.ggml.tokens``, a space spelled "▁"), their scores and a
type each (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte ``<0xNN>``). Tokens the HF release
lists as added tokens become control (if special) or user-defined, the latter with "▁" written back as a space.

SentencePiece BPE encodes a text so: spaces become "▁", with one more in front (the dummy prefix,
``tokenizer.ggml.add_space_prefix``: true where the file is silent, false in Gemma files); the text is cut into
characters; then, again and again, the adjacent pair whose concatenation is a piece with the highest score is
merged (the leftmost on ties); a character that is no piece is written as its UTF-8 bytes (``<0xNN>``, byte
fallback). That is BPE whose merges are every cut of a normal piece into two pieces, ranked by the piece's score:
what ``sentencepiece_merges`` lists (equal scores ranked by id, the file's order). Files that older converters
made from an HF tokenizer.json carry its merges (``tokenizer.ggml.merges``) and placeholder scores: their merges
are used as they are. Where the file says ``tokenizer.ggml.remove_extra_whitespaces``, runs of spaces collapse to
one and leading/trailing ones go first. The decoder reverses it all: "▁" back to spaces, byte pieces joined into
UTF-8, the dummy prefix's space dropped.

Control, unknown and user-defined tokens are matched whole in the raw text before any of this (gguf_tokenizer.py),
as llama.cpp does; the dummy prefix then goes in front of each piece of text between them (llama.cpp's rule, and
what HF's legacy Llama/Mistral/Phi-3 tokenizers do), where SentencePiece, which knows its user-defined symbols
inside one normalized text, adds it once at the start. Without a dummy prefix (Gemma) the two agree.

Invariants: token ids equal GGUF positions; unused pieces are never produced by a merge (SentencePiece would
merge into one and split it back; rare enough to leave out).
"""

from __future__ import annotations

from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers

from treadle_model_runner.loader.gguf_weights import gguf_value

SPACE = "\u2581"  # SentencePiece's spelling of a space
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that encode as SentencePiece does: each cut (left, right) of a normal piece into two tokens,
    the highest-scoring piece's cuts first (equal scores: the lower id first)."""
    vocab = set(tokens)
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[token_id]), token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _unknown_token(reader: Any, tokens: list[str], types: list[int]) -> str | None:
    # llama.cpp's default for a SentencePiece vocabulary is id 0
    unk_id = gguf_value(reader, "tokenizer.ggml.unknown_token_id", 0)
    if 0 <= int(unk_id) < len(tokens):
        return tokens[int(unk_id)]
    return next((t for t, kind in zip(tokens, types, strict=True) if kind == TOKEN_UNKNOWN), None)


def adds_space_prefix(reader: Any) -> bool:
    """Whether a "▁" goes in front of the text (llama.cpp's default for SentencePiece files: yes)."""
    return bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))


def build_sentencepiece_tokenizer(reader: Any, tokens: list[str], types: list[int]) -> Tokenizer:
    """The BPE model, normalizer and decoder of the file's SentencePiece vocabulary (``tokens`` and ``types``
    read from it); special and added tokens are the caller's."""
    scores: list[float] = list(gguf_value(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    stored = gguf_value(reader, "tokenizer.ggml.merges", None)
    if stored:
        merges = [(m[: m.index(" ", 1)], m[m.index(" ", 1) + 1 :]) for m in stored]
    else:
        merges = sentencepiece_merges(tokens, scores, types)
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=_unknown_token(reader, tokens, types),
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    space_prefix = adds_space_prefix(reader)
    squeeze = bool(gguf_value(reader, "tokenizer.ggml.remove_extra_whitespaces", False))
    steps: list[Any] = []
    if squeeze:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if space_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode: list[Any] = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix or squeeze:
        # SentencePiece drops a leading space of the decoded text in both cases
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer
