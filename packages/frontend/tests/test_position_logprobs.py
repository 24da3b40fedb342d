"""PositionLogprobs reads back exactly the dicts eager decoding built, and behaves as a read-only sequence."""

from __future__ import annotations

import copy
import pickle
import random
from typing import Any

import pytest

from treadle_frontend.detokenizer import TokenDecoder
from treadle_frontend.logprobs import TokenTexts
from treadle_frontend.outputs import Logprob
from treadle_frontend.position_logprobs import PositionLogprobs, PromptPositionLogprobs


def _positions(rng: random.Random, vocab: int, n: int) -> list[tuple[list[int], list[float], int]]:
    out = []
    for _ in range(n):
        k = rng.randrange(0, 6)
        top = rng.sample(range(vocab), k)
        chosen = rng.choice(top) if top and rng.random() < 0.5 else rng.randrange(vocab)
        values = sorted((rng.uniform(-12.0, 0.0) for _ in range(k)), reverse=True)
        chosen_value = values[top.index(chosen)] if chosen in top else rng.uniform(-20.0, -12.0)
        rank = top.index(chosen) + 1 if chosen in top else rng.randrange(k + 1, vocab)
        out.append(([chosen, *top], [chosen_value, *values], rank))
    return out


def _eager(texts: TokenTexts, ids: list[int], values: list[float], rank: int | None) -> dict[int, Logprob]:
    """The reference: one position's dict built entry by entry, the chosen token first (kept once, its own rank)."""
    out: dict[int, Logprob] = {}
    for i, (tok, value) in enumerate(zip(ids, values, strict=True)):
        if tok not in out:
            out[tok] = Logprob(logprob=value, rank=rank if i == 0 else i, decoded_token=texts.text(tok))
    return out


@pytest.fixture
def texts(tokenizer: Any) -> TokenTexts:
    return TokenTexts(tokenizer, TokenDecoder(tokenizer))


def test_reads_back_what_eager_decoding_builds(texts: TokenTexts) -> None:
    rng = random.Random(random.randrange(1 << 30))
    vocab = len(texts.tokenizer)
    positions = _positions(rng, vocab, 40)
    flat = PositionLogprobs(texts)
    for ids, values, rank in positions:
        flat.append_position(ids, values, rank)
    eager = [_eager(texts, ids, values, rank) for ids, values, rank in positions]
    assert len(flat) == len(eager) == 40
    assert list(flat) == eager and flat == eager and eager == list(flat)
    assert [flat[i] for i in range(-40, 0)] == eager
    for i, (ids, _, rank) in enumerate(positions):  # the sampled token's rank, even when also in the top-k
        assert flat[i][ids[0]].rank == rank
    first = flat[0][positions[0][0][0]]
    assert isinstance(first, Logprob) and first.decoded_token == texts.text(positions[0][0][0])
    with pytest.raises(IndexError):
        flat[40]
    with pytest.raises(IndexError):
        flat[-41]


def test_slices_copies_and_concatenation(texts: TokenTexts) -> None:
    rng = random.Random(random.randrange(1 << 30))
    positions = _positions(rng, len(texts.tokenizer), 12)
    flat = PositionLogprobs(texts)
    for ids, values, rank in positions:
        flat.append_position(ids, values, rank)
    eager = list(flat)
    for sl in (
        slice(3, 9),
        slice(None, 5),
        slice(7, None),
        slice(5, 2),
        slice(None, None, 3),
        slice(-4, None),
    ):
        part = flat[sl]
        assert isinstance(part, PositionLogprobs) and list(part) == eager[sl], sl
    snapshot, tail = flat.copy(), flat[10:]
    flat.append_position(*positions[0])
    assert len(snapshot) == 12 and len(tail) == 2 and len(flat) == 13  # later appends do not show
    joined = flat[:4] + flat[4:]
    assert isinstance(joined, PositionLogprobs) and joined == flat and list(joined) == list(flat)
    assert flat[:2] + eager[2:5] == eager[:5] and eager[:2] + flat[2:5] == eager[:5]
    assert flat != eager and flat[:12] != flat[:11]


def test_pickles_as_the_list_it_stands_for(texts: TokenTexts) -> None:
    rng = random.Random(random.randrange(1 << 30))
    flat = PositionLogprobs(texts)
    for ids, values, rank in _positions(rng, len(texts.tokenizer), 5):
        flat.append_position(ids, values, rank)
    for copied in (pickle.loads(pickle.dumps(flat)), copy.deepcopy(flat)):
        assert type(copied) is list and copied == list(flat)
    assert len(pickle.dumps(flat)) < 4096  # the tokenizer does not travel


def test_prompt_logprobs_start_with_none(texts: TokenTexts) -> None:
    rng = random.Random(random.randrange(1 << 30))
    positions = _positions(rng, len(texts.tokenizer), 9)
    prompt = PromptPositionLogprobs(texts)
    assert len(prompt) == 1 and list(prompt) == [None] and prompt[0] is None and prompt == [None]
    for ids, values, rank in positions:
        prompt.positions.append_position(ids, values, rank)
    eager = [None, *(_eager(texts, ids, values, rank) for ids, values, rank in positions)]
    assert len(prompt) == 10 and list(prompt) == eager and prompt == eager and eager == prompt
    assert (
        [prompt[i] for i in range(-10, 0)] == eager
        and prompt[2:5] == eager[2:5]
        and prompt[::4] == eager[::4]
    )
    with pytest.raises(IndexError):
        prompt[10]
    copied = pickle.loads(pickle.dumps(prompt))
    assert type(copied) is list and copied == eager and prompt != eager[:-1]


def test_rejects_unaligned_positions(texts: TokenTexts) -> None:
    flat = PositionLogprobs(texts)
    with pytest.raises(ValueError, match="2 token ids and 1 logprobs"):
        flat.append_position([5, 6], [-0.5], 1)
    assert len(flat) == 0 and list(flat) == [] and flat == []


def test_copies_share_the_lists_and_keep_their_own_positions(texts: TokenTexts) -> None:
    """A copy (or a slice from the start) costs O(1): it shares the flat lists (the request's CUMULATIVE output
    copied every position every step). Against plain lists of dicts, through random interleavings of appends (to
    the original and to copies), copies, slices, truncation and concatenation, every object still reads its own."""
    rng = random.Random(random.randrange(1 << 30))
    vocab = len(texts.tokenizer)
    flat = PositionLogprobs(texts)
    for ids, values, rank in _positions(rng, vocab, 3):
        flat.append_position(ids, values, rank)
    snapshot = flat.copy()
    assert snapshot._ids is flat._ids and flat[:2]._ids is flat._ids  # shared, not copied
    live: list[tuple[PositionLogprobs, list[dict[int, Logprob]]]] = [
        (flat, list(flat)),
        (snapshot, list(flat)),
    ]
    for _ in range(300):
        obj, ref = live[rng.randrange(len(live))]
        op = rng.random()
        if op < 0.45:
            ids, values, rank = _positions(rng, vocab, 1)[0]
            if rng.random() < 0.5:
                obj.append_position(ids, values, rank)
            else:
                obj.append_engine([(ids, values, rank)], None)
            ref.append(_eager(texts, ids, values, rank))
        elif op < 0.65:
            live.append((obj.copy(), list(ref)))
        elif op < 0.75:
            stop = rng.randrange(len(ref) + 1)
            live.append((obj[:stop], ref[:stop]))
        elif op < 0.8 and ref:
            first = rng.randrange(len(ref))
            live.append((obj[first:], ref[first:]))
        elif op < 0.9:
            keep = rng.randrange(len(ref) + 1)
            dropped = obj.truncate(keep)
            assert dropped == [next(iter(pos.values())).logprob for pos in ref[keep:]]
            del ref[keep:]
        elif len(live) > 1:
            other, other_ref = live[rng.randrange(len(live))]
            live.append((obj + other, ref + other_ref))
        if len(live) > 12:
            live.pop(rng.randrange(1, len(live)))
        for held, expected in live:
            assert len(held) == len(expected) and list(held) == expected, "a copy saw another object's writes"
            assert [dict(zip(p, (e.logprob for e in p.values()), strict=True)) for p in expected] == list(
                held.value_dicts()
            )
    for held, expected in live:
        assert held == expected and pickle.loads(pickle.dumps(held)) == expected
