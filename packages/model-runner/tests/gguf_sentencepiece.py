"""Test helper (no tests here): tiny SentencePiece BPE models trained on the spot, their GGUF tokenizer metadata
written the way llama.cpp's converter writes a ``llama`` tokenizer, and the texts to compare them on.

The writer re-implements the converter's facts (convert_hf_to_gguf.py ``_create_vocab_sentencepiece``,
``_set_vocab_sentencepiece`` and gguf-py's SpecialVocab), independently of treadle's reader: one entry per
SentencePiece id with its piece, score and type as the model says (unknown, control, unused, byte, else normal:
SentencePiece's own user-defined symbols come out normal); then the HF release's added tokens overwrite theirs
(here the user-defined symbols, listed as Gemma's tokenizer_config.json lists its own): control when special,
else user-defined with "▁" written back as a space, score -1000; then the special ids, add_bos/add_eos and the
chat template; Gemma's converter adds ``add_space_prefix`` false.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import sentencepiece as spm

TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)
WORDS = ["hello", "world", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "izer",
         "sentence", "piece", "model", "東京", "北京", "中国", "café", "naïve", "Zürich", "it's", "don't", "a", "is",
         "of", "and", "12", "345", "2024", "3.14", "(x)", "[y]", "-", "--", "!", "?", "...", "=="]  # fmt: skip
# characters the corpus never shows: byte fallback
RARE = ["😀", "🚀", "🦙", "語", "ß", "Ω", "€", "\u200d", "\x00"]


@dataclass(frozen=True)
class Flavor:
    """How a model's SentencePiece tokenizer was trained and what its HF release says about it."""

    name: str
    arch: str  # llama.cpp architecture the file is written for
    dummy_prefix: bool  # SentencePiece add_dummy_prefix
    special_ids: tuple[int, int, int, int]  # pad, unk, bos, eos (-1: none)
    user_symbols: tuple[str, ...]  # SentencePiece user_defined_symbols, all listed as HF added tokens
    special_symbols: tuple[str, ...] = ()  # of those, the ones the HF release marks special (-> control)
    remove_extra_whitespaces: bool = False


LLAMA = Flavor("llama", "llama", True, (-1, 0, 1, 2), ("<start_of_turn>", "<end_of_turn>", "<tool>"))
# Gemma's layout: pad 0, eos 1, bos 2, unk 3; turn markers special, a whitespace run a user-defined token
GEMMA = Flavor("gemma", "gemma3", False, (0, 3, 2, 1), ("<start_of_turn>", "<end_of_turn>", "<tool>", "▁▁▁▁"),
               special_symbols=("<start_of_turn>", "<end_of_turn>"))  # fmt: skip
SQUEEZED = Flavor("squeezed", "llama", True, (-1, 0, 1, 2), (), remove_extra_whitespaces=True)


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.2:
            line = " " * rng.randint(1, 5) + line
        if rng.random() < 0.2:
            line += "\t" + rng.choice(WORDS)
        lines.append(line)
    return lines


def train_sentencepiece(flavor: Flavor, vocab_size: int = 420) -> spm.SentencePieceProcessor:
    """A SentencePiece BPE model with byte fallback, trained in memory (a few ms) as Llama's and Gemma's were:
    identity normalization, digits split, whitespace-only pieces allowed."""
    pad, unk, bos, eos = flavor.special_ids
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, user_defined_symbols=list(flavor.user_symbols), add_dummy_prefix=flavor.dummy_prefix,
        remove_extra_whitespaces=flavor.remove_extra_whitespaces, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=pad, unk_id=unk, bos_id=bos, eos_id=eos, minloglevel=2,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


def add_sentencepiece_tokenizer(
    writer: Any,
    sp: spm.SentencePieceProcessor,
    flavor: Flavor,
    scores: list[float] | None = None,
    add_eos: bool = False,
) -> None:
    """The converter's ``llama`` tokenizer metadata for ``sp`` (see the module docstring); ``scores`` replaces
    the model's own, ``add_eos`` is the HF config's add_eos_token."""
    tokens, types = [], []
    scores = list(scores) if scores is not None else [sp.get_score(i) for i in range(sp.vocab_size())]
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.id_to_piece(i))
        types.append(kind)
    for symbol in flavor.user_symbols:
        i = sp.piece_to_id(symbol)
        special = symbol in flavor.special_symbols
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        tokens[i] = symbol if special else symbol.replace("▁", " ")
        scores[i] = -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    pad, unk, bos, eos = flavor.special_ids
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    if pad >= 0:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(add_eos)
    writer.add_chat_template(TEMPLATE)
    if flavor.arch.startswith("gemma"):
        writer.add_add_space_prefix(False)
    if flavor.remove_extra_whitespaces:
        writer.add_remove_extra_whitespaces(True)


def write_tokenizer_gguf(
    path: Path,
    sp: spm.SentencePieceProcessor,
    flavor: Flavor,
    scores: list[float] | None = None,
    add_eos: bool = False,
) -> None:
    """A GGUF file holding only the tokenizer metadata (enough for the tokenizer builder)."""
    writer = gguf.GGUFWriter(path, flavor.arch)
    add_sentencepiece_tokenizer(writer, sp, flavor, scores, add_eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_texts(flavor: Flavor, count: int, seed: int = 0) -> list[str]:
    """Texts mixing corpus words, characters the vocabulary lacks, digits, runs of spaces, tabs, newlines,
    leading/trailing spaces and (one text in three) the flavor's user-defined symbols."""
    rng = random.Random(seed)
    parts = WORDS + RARE + ["0", "7", "99", "\t", "\n", "\n\n", " ", "  ", "   ", "    ", "     "]
    texts = [
        "",
        " ",
        "  ",
        "\n",
        "hello",
        " hello",
        "hello ",
        "  hello  world  ",
        "a\tb\nc",
        "😀",
        "東京 😀 x",
    ]
    while len(texts) < count:
        pieces = [rng.choice(parts) for _ in range(rng.randint(1, 10))]
        if flavor.user_symbols and rng.random() < 1 / 3:
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(flavor.user_symbols).replace("▁", " "))
        sep = rng.choice(["", " "])
        texts.append(sep.join(pieces))
    return texts
