"""Incremental detokenization: deltas concatenate to the full decode, whatever the chunking."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from treadle_frontend.detokenizer import IncrementalDetokenizer, TokenDecoder

TEXTS = [
    "Hello 😀 東京 café",
    "北京是中国的首都。🎉🚀",
    "naïve señor Zürich",
    "plain ascii text here",
    "🚀" * 5,
]


def _stream(
    tokenizer: Any, prompt: list[int], ids: list[int], chunks: list[int], skip: bool = True
) -> list[str]:
    det = IncrementalDetokenizer(TokenDecoder(tokenizer), prompt, skip)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(det.update(ids[i : i + size]))
        i += size
    deltas.append(det.update(ids[i:]))
    deltas.append(det.flush())
    return deltas


def test_multibyte_characters_never_split(tokenizer: Any) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 1
        deltas = _stream(tokenizer, [], ids, [1] * len(ids))
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas), deltas
        # every delta is a whole-character piece of the text
        assert "".join(deltas[: len(deltas) // 2]) == text[: len("".join(deltas[: len(deltas) // 2]))]


def test_held_back_until_character_completes(tokenizer: Any) -> None:
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) >= 2, "the emoji must span tokens for this test"
    det = IncrementalDetokenizer(TokenDecoder(tokenizer), [], True)
    assert det.update(ids[:1]) == ""
    assert det.update(ids[1:]) == "😀"


def test_genuine_replacement_char_flushed_at_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("ab😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas = _stream(tokenizer, [], ids, [1] * len(ids))
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith("\ufffd")


def test_skip_special_tokens(tokenizer: Any) -> None:
    ids = [*tokenizer.encode("Hello", add_special_tokens=False), tokenizer.eos_token_id]
    ids += tokenizer.encode(" world", add_special_tokens=False)
    assert "".join(_stream(tokenizer, [], ids, [1] * len(ids), skip=True)) == "Hello world"
    assert "".join(_stream(tokenizer, [], ids, [1] * len(ids), skip=False)) == "Hello<|im_end|> world"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_chunking_matches_full_decode(tokenizer: Any, data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(TEXTS)) + data.draw(st.text(max_size=12))
    prompt = tokenizer.encode(data.draw(st.sampled_from(["", "Q: ", "東"])), add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    deltas = _stream(tokenizer, prompt, ids, chunks)
    assert "".join(deltas) == tokenizer.decode(ids)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_at_once_matches_incremental(tokenizer: Any, data: st.DataObject) -> None:
    """`update_at_once` (one decode for many tokens, for FINAL_ONLY requests) gives the incremental text, for
    byte-level and SentencePiece tokenizers, with and without a prompt, incomplete characters included."""
    tok = data.draw(st.sampled_from([tokenizer, _metaspace()]))
    text = data.draw(st.sampled_from(TEXTS)) + data.draw(st.text(alphabet="ab é😀 東🦀ß", max_size=10))
    prompt = tok.encode(data.draw(st.sampled_from(["", "Q: hi", "東"])), add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    ids = ids[: data.draw(st.integers(1, len(ids)))]  # may cut inside a character
    at_once = IncrementalDetokenizer(TokenDecoder(tok), prompt, True)
    split = data.draw(st.integers(0, len(ids)))
    got = at_once.update_at_once(ids[:split]) + at_once.update_at_once(ids[split:]) + at_once.flush()
    assert got == "".join(_stream(tok, prompt, ids, [1] * len(ids)))


def test_at_once_then_an_incomplete_byte_matches_incremental() -> None:
    """The case hypothesis found (CI of a2d13c3): SentencePiece byte-fallback tokens for two "ß" and a lone 0xC3, the
    first 14 tokens in one decode. The decoder renders an invalid byte run as one U+FFFD per byte, so the flushed
    tail depends on where the window starts: it must start where the step-by-step path leaves it."""
    tok = _metaspace()
    ids = tok.encode("naïve señor Zürichßßß", add_special_tokens=False)[:15]
    assert tok.convert_ids_to_tokens(ids[-5:]) == ["<0xC3>", "<0x9F>", "<0xC3>", "<0x9F>", "<0xC3>"]
    at_once = IncrementalDetokenizer(TokenDecoder(tok), [], True)
    got = at_once.update_at_once(ids[:14]) + at_once.update_at_once(ids[14:]) + at_once.flush()
    assert got == "".join(_stream(tok, [], ids, [1] * len(ids))) == "naïve señor Zürichßß\ufffd\ufffd"


def test_random_token_sequences(tokenizer: Any) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tokenizer, [], ids, [1] * len(ids))) == tokenizer.decode(ids)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_metaspace_tokenizer_chunking(data: st.DataObject) -> None:
    tok = _metaspace()
    # 🦀 and ß are not in the training corpus: they become <0x..> byte-fallback tokens, one per UTF-8 byte
    text = data.draw(st.sampled_from(TEXTS)) + data.draw(st.text(alphabet="ab é😀 東🦀ß", max_size=10))
    prompt = tok.encode("Q: hi", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    deltas = _stream(tok, prompt, ids, chunks)
    # with a prompt before it, the output's leading space is real text (SentencePiece strips it only at the
    # very start of a sequence): compare against decoding in context
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(deltas) == expected
    assert all("\ufffd" not in d for d in deltas)


_METASPACE: list[Any] = []


def _metaspace() -> Any:
    if not _METASPACE:
        from tiny_assets import build_metaspace_tokenizer

        _METASPACE.append(build_metaspace_tokenizer())
    return _METASPACE[0]


def test_skipped_special_tokens_keep_the_next_space() -> None:
    """A SentencePiece-style decoder drops the leading space of whatever it decodes; a skipped special token
    (EOS, a tool-call marker) at the start of the decode window must not make the next token lose its space."""
    tok = _metaspace()
    a, b = tok.encode("hello", add_special_tokens=False), tok.encode("world", add_special_tokens=False)
    ids = [*a, tok.eos_token_id, *b]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert "".join(_stream(tok, [], ids, [1] * len(ids))) == "hello world"
    rng = random.Random(0)
    specials = [tok.bos_token_id, tok.eos_token_id]
    pieces = [i for i in range(3, len(tok)) if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(100):
        ids = [rng.choice(specials) if rng.random() < 0.3 else rng.choice(pieces) for _ in range(20)]
        prompt = tok.encode(rng.choice(["", "Q: hi"]), add_special_tokens=False)
        chunks = [rng.randint(1, 3) for _ in range(10)]
        full, before = tok.decode(prompt + ids, skip_special_tokens=True), tok.decode(prompt)
        assert "".join(_stream(tok, prompt, ids, chunks)) == full[len(before) :], ids
