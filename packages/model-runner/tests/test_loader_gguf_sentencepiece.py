"""SentencePiece (llama.cpp ``llama``) tokenizers rebuilt from GGUF metadata, against the sentencepiece package.

Each flavor (gguf_sentencepiece.py) trains a tiny SentencePiece BPE model on the spot (byte fallback,
user-defined symbols; Llama-like with the dummy prefix, Gemma-like without, one with remove_extra_whitespaces),
writes its GGUF tokenizer metadata as llama.cpp's converter does, and treadle's tokenizer.json must give
SentencePiece's own ids and decoded text on a few hundred random texts (ASCII, runs of spaces, leading and
trailing spaces, tabs, newlines, CJK, emoji through byte fallback, digits, user-defined symbols). With a dummy
prefix, text around a user-defined token is encoded piece by piece (llama.cpp's rule, gguf_sentencepiece.py), so
the reference is SentencePiece on each piece; without one that is SentencePiece on the whole text, checked too.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
from gguf_llama_cpp import write_llama_cpp_gguf
from gguf_sentencepiece import (
    GEMMA,
    LLAMA,
    SQUEEZED,
    TEMPLATE,
    WORDS,
    Flavor,
    add_sentencepiece_tokenizer,
    random_texts,
    train_sentencepiece,
    write_tokenizer_gguf,
)
from test_loader_gguf_families import _hf_config
from tokenizers import Tokenizer

from treadle_model_runner.loader import convert_gguf
from treadle_model_runner.loader.gguf_tokenizer import (
    build_tokenizer,
    tokenizer_config,
    write_tokenizer_files,
)
from treadle_model_runner.loader.gguf_weights import open_gguf


def _reference(sp: Any, flavor: Flavor, text: str) -> list[int]:
    """SentencePiece's ids for ``text`` with the flavor's user-defined symbols matched whole first (leftmost,
    longest) and the text between them encoded on its own."""
    symbols = sorted(flavor.user_symbols, key=len, reverse=True)
    spelled = [s.replace("▁", " ") for s in symbols]
    if not symbols:
        return list(sp.encode(text))
    ids, start = [], 0
    for match in re.finditer("|".join(map(re.escape, spelled)), text):
        ids += sp.encode(text[start : match.start()]) if match.start() > start else []
        ids.append(sp.piece_to_id(symbols[spelled.index(match.group())]))
        start = match.end()
    return ids + (sp.encode(text[start:]) if start < len(text) else [])


@pytest.fixture(scope="module", params=[LLAMA, GEMMA, SQUEEZED], ids=lambda f: f.name)
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Flavor, Any, Any]:
    """(flavor, its SentencePiece model, treadle's tokenizer.json for its GGUF file loaded by `tokenizers`)."""
    flavor: Flavor = request.param
    sp = train_sentencepiece(flavor)
    root = tmp_path_factory.mktemp(flavor.name)
    write_tokenizer_gguf(root / "t.gguf", sp, flavor)
    write_tokenizer_files(open_gguf(root / "t.gguf"), root, model_max_length=128)
    return flavor, sp, Tokenizer.from_file(str(root / "tokenizer.json"))


def test_ids_and_text_match_sentencepiece(trained: tuple[Flavor, Any, Any]) -> None:
    flavor, sp, tokenizer = trained
    for text in random_texts(flavor, 400):
        expected = _reference(sp, flavor, text)
        if not flavor.dummy_prefix:
            assert expected == sp.encode(text), f"{text!r}: user-defined symbols not atomic in SentencePiece"
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == expected, (
            text,
            [tokenizer.id_to_token(i) for i in ids],
            [sp.id_to_piece(i) for i in expected],
        )
        assert tokenizer.encode(text).ids == [sp.bos_id(), *expected]
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        assert decoded == sp.decode(expected), text
        # a round trip, except where the text changes (squeezed spaces; a dummy prefix after a user token)
        if not flavor.remove_extra_whitespaces and (not flavor.dummy_prefix or expected == sp.encode(text)):
            assert decoded == text


def test_control_tokens_match_whole_and_are_skipped_on_decode(trained: tuple[Flavor, Any, Any]) -> None:
    """SentencePiece never matches its control pieces in text; llama.cpp (parse_special) and HF tokenizers do."""
    flavor, sp, tokenizer = trained
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    ids = tokenizer.encode(f"{bos}hi{eos}", add_special_tokens=False).ids
    assert ids == [sp.bos_id(), *_reference(sp, flavor, "hi"), sp.eos_id()]
    assert tokenizer.decode(ids) == "hi"


def test_eos_is_appended_when_the_file_asks(tmp_path: Path) -> None:
    sp = train_sentencepiece(LLAMA)
    write_tokenizer_gguf(tmp_path / "t.gguf", sp, LLAMA, add_eos=True)
    reader = open_gguf(tmp_path / "t.gguf")
    assert build_tokenizer(reader).encode("hello world").ids == [
        sp.bos_id(),
        *sp.encode("hello world"),
        sp.eos_id(),
    ]
    assert tokenizer_config(reader, 128)["add_eos_token"] is True


def _sentencepiece_bpe(vocab: dict[str, int], scores: list[float], normal: set[str], text: str) -> list[int]:
    """SentencePiece BPE from its definition, for a Llama-like model: spaces as "▁" plus a dummy prefix; merge
    the adjacent pair whose concatenation is a normal piece of the highest score (the leftmost on ties) until
    none is left; a symbol that is no piece becomes its UTF-8 bytes."""
    symbols = list("▁" + text.replace(" ", "▁")) if text else []
    while True:
        best: tuple[float, int] | None = None
        for i in range(len(symbols) - 1):
            piece = symbols[i] + symbols[i + 1]
            if piece in normal and (best is None or scores[vocab[piece]] > best[0]):
                best = (scores[vocab[piece]], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids: list[int] = []
    for symbol in symbols:
        ids += [vocab[symbol]] if symbol in vocab else [vocab[f"<0x{b:02X}>"] for b in symbol.encode()]
    return ids


def test_merges_follow_scores_not_ids(tmp_path: Path) -> None:
    """A trained model's scores fall with its ids; Gemma's, llama.cpp notes, do not. With the scores of the
    merged pieces shuffled, treadle must still merge the best-scoring pair first: checked against SentencePiece
    BPE written from its definition (itself checked against sentencepiece on the unshuffled model)."""
    sp = train_sentencepiece(LLAMA)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merged = [i for i, p in enumerate(pieces) if len(p) > 1 and not (sp.is_byte(i) or sp.is_control(i))]
    normal = {pieces[i] for i in merged if pieces[i] not in LLAMA.user_symbols}
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    texts = random_texts(SQUEEZED, 400)  # no user-defined symbols
    for text in texts:
        assert _sentencepiece_bpe(vocab, scores, normal, text) == sp.encode(text), text
    shuffled = [scores[i] for i in merged]
    random.Random(0).shuffle(shuffled)
    for i, score in zip(merged, shuffled, strict=True):
        scores[i] = score
    write_tokenizer_gguf(tmp_path / "t.gguf", sp, LLAMA, scores)
    tokenizer = build_tokenizer(open_gguf(tmp_path / "t.gguf"))
    changed = 0
    for text in texts:
        expected = _sentencepiece_bpe(vocab, scores, normal, text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, text
        changed += expected != sp.encode(text)
    assert changed >= 10, "the shuffled scores must change how texts encode"


def test_merges_stored_in_the_file_are_used(tmp_path: Path) -> None:
    """Older converters wrote an HF tokenizer.json's merges with placeholder scores (all equal): the merges rule.
    Here they are those of shuffled scores (as in test_merges_follow_scores_not_ids), the stored scores all 0."""
    sp = train_sentencepiece(LLAMA)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    normal = [
        i for i, p in enumerate(pieces) if len(p) > 1 and not sp.is_byte(i) and p not in LLAMA.user_symbols
    ]
    normal = [i for i in normal if not sp.is_control(i)]
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    shuffled = [scores[i] for i in normal]
    random.Random(0).shuffle(shuffled)
    scores = [0.0] * len(scores)
    for i, score in zip(normal, shuffled, strict=True):
        scores[i] = score
    merges = [
        f"{pieces[i][:cut]} {pieces[i][cut:]}"
        for i in sorted(normal, key=lambda i: -scores[i])
        for cut in range(1, len(pieces[i]))
        if pieces[i][:cut] in vocab and pieces[i][cut:] in vocab
    ]
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    add_sentencepiece_tokenizer(writer, sp, LLAMA, scores=[0.0] * len(scores))
    writer.add_token_merges(merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = build_tokenizer(open_gguf(tmp_path / "t.gguf"))
    names = {pieces[i] for i in normal}
    changed = 0
    for text in random_texts(SQUEEZED, 400):
        expected = _sentencepiece_bpe(vocab, scores, names, text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, text
        changed += expected != sp.encode(text)
    assert changed >= 10, "the shuffled merges must change how texts encode"


def test_gemma3_gguf_converts_with_its_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """A tiny random Gemma 3 written as llama.cpp writes one (tokenizer model "llama", no dummy prefix): the
    converted directory's tokenizer, loaded as treadle loads it (PreTrainedTokenizerFast, what its
    tokenizer_config.json names), encodes like SentencePiece with BOS first, and carries the chat template."""
    import transformers as tf

    sp = train_sentencepiece(GEMMA)
    arch, config = _hf_config("gemma3")
    config.vocab_size = sp.vocab_size()
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    write_llama_cpp_gguf(
        tmp_path / "g.gguf", arch, hf, tokenizer=lambda w: add_sentencepiece_tokenizer(w, sp, GEMMA)
    )
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(tmp_path / "g.gguf", out)
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(str(out), local_files_only=True)
    pad, unk, bos, eos = (sp.id_to_piece(i) for i in GEMMA.special_ids)
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        pad,
        unk,
        bos,
        eos,
    )
    for text in random_texts(GEMMA, 60, seed=3):
        assert tokenizer(text).input_ids == [sp.bos_id(), *sp.encode(text)], text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello  world"}], tokenize=False)
    assert chat == "<start_of_turn>user\nhello  world<end_of_turn>\n" and tokenizer.chat_template == TEMPLATE
    ids = tokenizer(chat, add_special_tokens=False).input_ids
    assert (
        ids == sp.encode(chat) and tokenizer.decode(ids, skip_special_tokens=True) == "user\nhello  world\n"
    )


def test_unigram_files_are_refused(tmp_path: Path) -> None:
    """llama.cpp's "t5" tokenizer model is SentencePiece unigram, which needs a different algorithm."""
    writer = gguf.GGUFWriter(tmp_path / "t5.gguf", "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "<unk>", *WORDS])
    writer.add_token_scores([0.0] * (3 + len(WORDS)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"t5\.gguf has tokenizer model 't5' \(SentencePiece unigram"):
        build_tokenizer(open_gguf(tmp_path / "t5.gguf"))
