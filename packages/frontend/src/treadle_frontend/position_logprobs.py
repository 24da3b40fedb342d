"""PositionLogprobs: a completion's sampled-token logprobs, stored flat and read as vLLM's list of dicts.

vLLM hands back, per generated position, ``{token id: Logprob(logprob, rank, decoded_token)}`` holding the
sampled token and the top-k. Building those dicts (and every entry's text) as the tokens arrived was the
frontend's largest cost per token: at 256 requests asking 5 logprobs on an H200 it left the GPU idle half the
time (benchmarks/README.md, session 17). Here arriving positions are appended to flat lists, and a position's
dict is built when it is read, with each token's text from the request's memoized `TokenTexts` (so a reader
gets exactly what eager building gave). vLLM's `FlatLogprobs` flattens the same way, with the texts decoded as
the tokens arrive.

It is a read-only `Sequence` of those dicts (index, slice, iterate, ``len``, ``==`` and ``+`` with any sequence
of dicts); only the frontend appends to it. A slice or a `copy` is a new object: later appends to the original do
not show in it (a copy shares the flat lists, seeing only its own positions). Pickled (or deep-copied) it
becomes the plain list of dicts it stands for, so it never carries the tokenizer along. `PromptPositionLogprobs`
does the same for ``prompt_logprobs`` (None first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn, TypeGuard, TypeVar, overload

from treadle_frontend.logprobs import TokenTexts, position_dict
from treadle_frontend.outputs import Logprob

__all__ = ["PositionLogprobs", "PromptPositionLogprobs"]

_Item = TypeVar("_Item")


def _unaligned(token_ids: Sequence[int], logprobs: Sequence[float]) -> NoReturn:
    raise ValueError(
        f"a position's logprobs need one value per token: got {len(token_ids)} token ids and "
        f"{len(logprobs)} logprobs"
    )


def _is_items(other: object) -> TypeGuard[Sequence[Any]]:
    """A sequence another sequence of positions can compare or concatenate with (not text)."""
    return isinstance(other, Sequence) and not isinstance(other, str | bytes)


class _ReadsAsList(Sequence[_Item]):
    """What both sequences share with the list they stand for: ``==`` item by item, ``repr``, and pickling (and
    deep copies) as that plain list."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if not _is_items(other):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it stands for

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (list(self),)

    def __repr__(self) -> str:
        return repr(list(self))


class PositionLogprobs(_ReadsAsList[dict[int, Logprob]]):
    """Per position: the token ids (the sampled token first, then the top-k), their logprobs and the sampled
    token's rank, in flat lists; ``self[i]`` builds position i's ``{token id: Logprob}``.

    A `copy` (or a slice from the start) shares the flat lists and sees only its first `_n` positions, so the
    request's CUMULATIVE output costs O(1) a step, not a copy of every position so far. Sharing is safe because the
    lists only grow past what a sharer sees: an object appends in place only while it sees the lists' whole length
    (its own copy of what it sees first otherwise), and `truncate` of shared lists copies first."""

    __slots__ = ("_ends", "_ids", "_n", "_ranks", "_shared", "_texts", "_values")

    def __init__(self, texts: TokenTexts | None) -> None:
        self._texts = texts  # None: decoded_token None (a request with detokenize=False)
        self._ids: list[int] = []  # every position's token ids, one after the other
        self._values: list[float] = []  # their logprobs, aligned with _ids
        self._ranks: list[int | None] = []  # per position: the sampled token's rank
        self._ends: list[int] = []  # per position: where its entries end in _ids
        self._n = 0  # positions this object holds: the first _n of the lists (others may see more)
        self._shared = False  # whether another object may hold these lists

    @classmethod
    def _of(
        cls,
        texts: TokenTexts | None,
        stored: tuple[list[int], list[float], list[int | None], list[int]],
        n: int,
        shared: bool,
    ) -> PositionLogprobs:
        """An object over lists given (no empty lists made first: a DELTA output makes one per request a step)."""
        out = cls.__new__(cls)
        out._texts, (out._ids, out._values, out._ranks, out._ends) = texts, stored
        out._n, out._shared = n, shared
        return out

    def _own(self) -> None:
        """Before writing: lists of this object's own when others may see past its positions."""
        n = self._n
        if n != len(self._ends):
            top = self._ends[n - 1] if n else 0
            self._ids, self._values = self._ids[:top], self._values[:top]
            self._ranks, self._ends = self._ranks[:n], self._ends[:n]
            self._shared = False

    def append_position(
        self, token_ids: Sequence[int], logprobs: Sequence[float], chosen_rank: int | None
    ) -> None:
        """Adds one position: token_ids[0] the sampled token, then the top-k; logprobs aligned with them."""
        if len(token_ids) != len(logprobs):
            _unaligned(token_ids, logprobs)
        self._own()
        self._ids.extend(token_ids)
        self._values.extend(logprobs)
        self._ranks.append(chosen_rank)
        self._ends.append(len(self._ids))
        self._n += 1

    def append_engine(self, items: Iterable[Any], cumulative: float | None) -> float | None:
        """Adds the engine's positions, each a `Logprobs` (token_ids, logprobs, chosen_rank) or an (ids, values[,
        rank]) tuple (None: skipped), as `append_position` would one by one; returns `cumulative` plus each added
        position's sampled-token logprob, added in order (None stays None). The per-step path: no list of the
        positions and no call per position."""
        self._own()
        ids, values, ranks, ends = self._ids, self._values, self._ranks, self._ends
        for item in items:
            if item is None:
                continue
            if isinstance(item, tuple):
                token_ids, logprobs, rank = item[0], item[1], item[2] if len(item) > 2 else None
            else:
                token_ids, logprobs, rank = item.token_ids, item.logprobs, item.chosen_rank
            if len(token_ids) != len(logprobs):
                _unaligned(token_ids, logprobs)
            ids += token_ids
            values += logprobs
            ranks.append(rank)
            ends.append(len(ids))
            self._n += 1
            if logprobs and cumulative is not None:
                cumulative += float(logprobs[0])
        return cumulative

    def __len__(self) -> int:
        return self._n

    def truncate(self, n: int) -> list[float]:
        """Keeps the first `n` positions; returns the sampled tokens' logprobs of those dropped."""
        dropped = [self._position(i)[1][0] for i in range(n, self._n)]
        if dropped:
            if self._shared:  # others may see the positions dropped here: drop them from lists of our own
                self._ids, self._values, self._ranks, self._ends = (
                    self._ids[:],
                    self._values[:],
                    self._ranks[:],
                    self._ends[:],
                )
                self._shared = False
            top = self._ends[n - 1] if n else 0
            del self._ids[top:], self._values[top:], self._ranks[n:], self._ends[n:]
            self._n = n
        return dropped

    @overload
    def __getitem__(self, index: int) -> dict[int, Logprob]: ...

    @overload
    def __getitem__(self, index: slice) -> PositionLogprobs: ...

    def __getitem__(self, index: int | slice) -> dict[int, Logprob] | PositionLogprobs:
        if isinstance(index, slice):
            return self._slice(index)
        n = self._n
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"position {index} out of range for {n} positions")
        return position_dict(self._texts, *self._position(i))

    def _position(self, i: int) -> tuple[list[int], list[float], int | None]:
        """Position i as stored: its token ids, their logprobs and the sampled token's rank."""
        start, end = self._ends[i - 1] if i else 0, self._ends[i]
        return self._ids[start:end], self._values[start:end], self._ranks[i]

    def __iter__(self) -> Iterator[dict[int, Logprob]]:
        # the positions in one walk along the flat lists (not self[i] each: its checks were a fifth of a position)
        ids, values, texts, ends, ranks, start = (
            self._ids,
            self._values,
            self._texts,
            self._ends,
            self._ranks,
            0,
        )
        for i in range(self._n):
            end = ends[i]
            yield position_dict(texts, ids[start:end], values[start:end], ranks[i])
            start = end

    def value_dicts(self) -> Iterator[dict[int, float]]:
        """Per position, ``{token id: its Logprob's logprob}`` in the position dict's order, without building the
        Logprobs: a whole-vocabulary position is 49k of them, each an object the garbage collector tracks."""
        all_ids, all_values, ends, start = self._ids, self._values, self._ends, 0
        for i in range(self._n):
            end = ends[i]
            ids, values = all_ids[start:end], all_values[start:end]
            start = end
            out = dict(zip(ids, values))  # noqa: B905  (aligned: append_position checks it)
            if ids:  # as position_dict: the chosen token keeps its own entry
                out[ids[0]] = values[0]
            yield out

    def _slice(self, index: slice) -> PositionLogprobs:
        first, stop, step = index.indices(self._n)
        if step != 1:
            out = PositionLogprobs(self._texts)
            for i in range(first, stop, step):
                out.append_position(*self._position(i))
            return out
        if stop <= first:
            return PositionLogprobs(self._texts)
        if first == 0:  # the first `stop` positions: the same lists, seen up to there
            self._shared = True
            return self._of(self._texts, (self._ids, self._values, self._ranks, self._ends), stop, True)
        base, top = self._ends[first - 1], self._ends[stop - 1]
        ends = [end - base for end in self._ends[first:stop]]
        stored = (self._ids[base:top], self._values[base:top], self._ranks[first:stop], ends)
        return self._of(self._texts, stored, stop - first, False)

    def copy(self) -> PositionLogprobs:
        """A snapshot: positions appended to self later do not show in it."""
        return self._slice(slice(None))

    def _stored(self) -> tuple[list[int], list[float], list[int | None], list[int]]:
        """This object's positions as stored (copies of the lists' first _n positions)."""
        n = self._n
        top = self._ends[n - 1] if n else 0
        return self._ids[:top], self._values[:top], self._ranks[:n], self._ends[:n]

    def __add__(self, other: Sequence[dict[int, Logprob]]) -> Any:
        if isinstance(other, PositionLogprobs):
            out = self._of(self._texts, self._stored(), self._n + other._n, False)
            ids, values, ranks, ends = other._stored()
            offset = len(out._ids)
            out._ids += ids
            out._values += values
            out._ranks += ranks
            out._ends += [end + offset for end in ends]
            return out
        return list(self) + list(other) if _is_items(other) else NotImplemented

    def __radd__(self, other: Sequence[dict[int, Logprob]]) -> Any:
        return list(other) + list(self) if _is_items(other) else NotImplemented

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PositionLogprobs) and self._stored() == other._stored():
            return True  # the same stored positions (different ones may still read the same: compared below)
        return super().__eq__(other)


class PromptPositionLogprobs(_ReadsAsList[dict[int, Logprob] | None]):
    """vLLM's ``prompt_logprobs``: None for the first prompt token (it has no context), then one position per
    prompt token, stored flat in ``positions`` as they arrive and built when read, like `PositionLogprobs`."""

    __slots__ = ("positions",)

    def __init__(self, texts: TokenTexts | None) -> None:
        self.positions = PositionLogprobs(texts)

    def __len__(self) -> int:
        return 1 + len(self.positions)

    @overload
    def __getitem__(self, index: int) -> dict[int, Logprob] | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[int, Logprob] | None]: ...

    def __getitem__(self, index: int | slice) -> dict[int, Logprob] | list[dict[int, Logprob] | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"position {index} out of range for {n} prompt positions")
        return None if i == 0 else self.positions[i - 1]

    def __iter__(self) -> Iterator[dict[int, Logprob] | None]:
        yield None
        yield from self.positions
