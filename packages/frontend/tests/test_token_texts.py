"""Token texts are memoized per tokenizer, and the fast logprob paths read exactly what entry-by-entry decoding gave.

A memo shared across tokenizers (two models in one process), keyed by anything but (tokenizer, id), or filled with
a token's text in context instead of on its own would hand out wrong `decoded_token`s, chat `token`s or `bytes`.
"""

from __future__ import annotations

import math
import random
from operator import itemgetter
from typing import Any

import pytest
from tiny_assets import build_metaspace_tokenizer

from treadle_frontend.detokenizer import TokenDecoder
from treadle_frontend.logprobs import TOKEN_IDS, TokenNames, TokenTexts, chat_logprobs, clamp_logprob
from treadle_frontend.outputs import Logprob
from treadle_frontend.position_logprobs import PositionLogprobs
from treadle_model_runner.outputs import Logprobs


@pytest.fixture(scope="module")
def metaspace() -> Any:
    return build_metaspace_tokenizer()


def _alone(tokenizer: Any, token_id: int) -> str:
    """The reference: the token decoded on its own, specials kept."""
    return TokenDecoder(tokenizer).decode([token_id], skip_special_tokens=False)


def test_two_tokenizers_in_one_process_keep_their_own_texts(tokenizer: Any, metaspace: Any) -> None:
    """The same ids read in turn through two tokenizers' TokenTexts (and their positions' dicts) give each its own
    tokenizer's text and bytes, whichever read an id first."""
    rng = random.Random(random.randrange(1 << 30))
    common = min(len(tokenizer), len(metaspace))
    ids = [rng.randrange(common) for _ in range(400)]
    a, b = TokenTexts(tokenizer), TokenTexts(metaspace)
    differ = [t for t in range(common) if _alone(tokenizer, t) != _alone(metaspace, t)]
    assert len(differ) > common // 2, "the two vocabularies must disagree for this test to mean anything"
    flat_a, flat_b = PositionLogprobs(a), PositionLogprobs(b)
    for i in range(0, len(ids), 4):
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        chunk = ids[i : i + 4]
        for texts in (first, second):
            assert [texts.text(t) for t in chunk] == [_alone(texts.tokenizer, t) for t in chunk]
            texts.token_bytes(chunk[0])
        values = [-0.5 * j for j in range(len(chunk))]
        flat_a.append_position(chunk, values, 1)
        flat_b.append_position(chunk, values, 1)
    for flat, tok in ((flat_a, tokenizer), (flat_b, metaspace)):
        for position in flat:
            assert all(e.decoded_token == _alone(tok, t) for t, e in position.items())
    for texts in (
        a,
        b,
    ):  # bytes: those of the token's own text, where that is whole UTF-8 (not a <0xNN> byte)
        pieces = texts.tokenizer.convert_ids_to_tokens(differ)
        whole = [t for t, p in zip(differ, pieces, strict=True) if "\ufffd" not in _alone(texts.tokenizer, t)
                 and not p.startswith("<0x")]  # fmt: skip
        assert len(whole) > 20
        for t in whole:
            assert bytes(texts.token_bytes(t)).decode() == _alone(texts.tokenizer, t), t


def test_byte_fallback_and_word_start_pieces_decode_on_their_own(metaspace: Any) -> None:
    """SentencePiece-style pieces: a lone <0xNN> byte reads as U+FFFD (its bytes the one byte), a word-start piece
    without its space (decoded on its own, not in the context it came in), however often and in whatever order."""
    texts = TokenTexts(metaspace)
    vocab = metaspace.get_vocab()
    byte_ids = [vocab[f"<0x{b:02X}>"] for b in (0xE2, 0x80, 0xF0, 0x41)]
    word, other = [i for p, i in sorted(vocab.items()) if p.startswith("▁") and len(p) > 2][:2]
    # the word's space shows only after another word
    in_context = TokenDecoder(metaspace).decode([other, word], False)
    order = [*byte_ids, word, *reversed(byte_ids), word, byte_ids[0]]
    flat = PositionLogprobs(texts)
    flat.append_position(order, [-float(i) for i in range(len(order))], 2)
    [position] = list(flat)
    assert position[byte_ids[0]].decoded_token == "\ufffd" and texts.text(byte_ids[1]) == "\ufffd"
    assert texts.text(byte_ids[3]) == "A"
    assert [texts.token_bytes(t) for t in byte_ids] == [(0xE2,), (0x80,), (0xF0,), (0x41,)]
    assert position[word].decoded_token == _alone(metaspace, word)
    alone = position[word].decoded_token
    assert not alone.startswith(" ") and in_context.endswith(" " + alone)
    for t in range(len(metaspace)):
        assert texts.text(t) == _alone(metaspace, t), t


def _reference_chat(
    texts: TokenNames, token_ids: list[int], positions: Any, num_top: int
) -> list[dict[str, Any]]:
    """chat_logprobs as it was written entry by entry (one text / bytes / clamp call each)."""
    content = []
    for tok, pos in zip(token_ids, positions, strict=False):
        values = {t: e.logprob for t, e in pos.items()}
        lp = values.get(tok)
        ranked = sorted(values.items(), key=itemgetter(1), reverse=True)
        tops = [
            {"token": texts.text(t), "logprob": clamp_logprob(v), "bytes": texts.token_bytes(t)}
            for t, v in (ranked if num_top < 0 else ranked[:num_top])
        ]
        content.append({
            "token": texts.text(tok), "logprob": clamp_logprob(lp) if lp is not None else -9999.0,
            "bytes": texts.token_bytes(tok), "top_logprobs": tops,
        })  # fmt: skip
    return content


def _special_values(rng: random.Random, k: int) -> list[float]:
    pool = [float("-inf"), float("nan"), -1e5, -9999.0, -0.0, 0.0, -3.25]
    return [rng.choice(pool) if rng.random() < 0.3 else rng.uniform(-20.0, 0.0) for _ in range(k)]


@pytest.mark.parametrize("num_top", [0, 2, 5, -1])
def test_chat_logprobs_match_the_entry_by_entry_reference(
    tokenizer: Any, metaspace: Any, num_top: int
) -> None:
    rng = random.Random(random.randrange(1 << 30))
    for names, tok in (
        (TokenTexts(tokenizer), tokenizer),
        (TokenTexts(metaspace), metaspace),
        (TOKEN_IDS, None),
    ):
        texts = names if isinstance(names, TokenTexts) else TokenTexts(tokenizer)
        flat = PositionLogprobs(texts)
        sampled = []
        for _ in range(30):
            k = rng.randrange(0, 7)
            top = rng.sample(range(len(tok or tokenizer)), k)
            chosen = rng.choice(top) if top and rng.random() < 0.5 else rng.randrange(len(tok or tokenizer))
            flat.append_position([chosen, *top], _special_values(rng, k + 1), rng.randrange(1, 50))
            sampled.append(chosen)
        dicts = list(flat)
        got, want = (
            chat_logprobs(names, sampled, flat, num_top),
            _reference_chat(names, sampled, dicts, num_top),
        )
        assert chat_logprobs(names, sampled, dicts, num_top) == got  # plain dicts take the other path
        assert len(got) == len(want) == 30
        for g, w in zip(got, want, strict=True):  # == fails on NaN; the floor replaced them all
            assert g == w and not any(math.isnan(e["logprob"]) for e in g["top_logprobs"])
            assert all(type(e["logprob"]) is float for e in [g, *g["top_logprobs"]])


def test_append_engine_stores_what_append_position_did() -> None:
    """The per-step path (Logprobs objects, 2- and 3-tuples, None skipped) equals append_position one by one, and
    the cumulative logprob is the same left-to-right float sum."""
    rng = random.Random(random.randrange(1 << 30))
    items: list[Any] = []
    for _ in range(50):
        k = rng.randrange(0, 5)
        ids, values, rank = (
            [rng.randrange(1000) for _ in range(k + 1)],
            _special_values(rng, k + 1),
            rng.randrange(1, 9),
        )
        kind = rng.randrange(4)
        items.append(
            Logprobs(ids, values, rank) if kind == 0 else (ids, values, rank) if kind == 1
            else (ids, values) if kind == 2 else None
        )  # fmt: skip
    fast, slow = PositionLogprobs(None), PositionLogprobs(None)
    start = rng.uniform(-5.0, 0.0)
    total = start
    for item in items:
        if item is None:
            continue
        ids, values, rank = (item.token_ids, item.logprobs, item.chosen_rank) if isinstance(item, Logprobs) else (
            item[0], item[1], item[2] if len(item) > 2 else None)  # fmt: skip
        slow.append_position(ids, values, rank)
        total += float(values[0])
    cumulative = fast.append_engine(items[:20], start)
    assert cumulative is not None
    cumulative = fast.append_engine(items[20:], cumulative)
    assert list(fast) == list(slow) and len(fast) == len(slow) and fast == slow
    assert cumulative == total or (math.isnan(cumulative) and math.isnan(total))
    assert all(isinstance(e, Logprob) and e.decoded_token is None for pos in fast for e in pos.values())
    assert fast.append_engine(items, None) is None
    with pytest.raises(ValueError, match="one value per token"):
        PositionLogprobs(None).append_engine([Logprobs([1, 2], [-0.5], 1)], 0.0)
