"""Stop strings: end a request at the first occurrence of any stop string, and never stream a part of one.

The checker scans only the region new text could have completed: the last `num_new_chars + max_len - 1`
characters. On a match at index i the text is cut at i (or at the end of the stop string when
`include_stop_str_in_output`), and the request finishes with `stop_reason` = that string.

Hold-back: while a request runs, the longest suffix of its text that is a proper prefix of some stop string
may still become a stop string, so it is withheld from streaming. It is released as soon as the next text
rules the match out, or at the end of the request. With this rule no character of a stop string is ever sent
unless `include_stop_str_in_output` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StopMatch:
    stop: str  # the stop string found
    truncate_to: int  # the text length to keep
    end: int  # where the stop string ends in the text (the token reaching it ends the request)


class StopStringChecker:
    def __init__(self, stops: list[str], include_in_output: bool) -> None:
        self.stops = [s for s in stops if s]
        self.include_in_output = include_in_output
        self.max_len = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, num_new_chars: int) -> StopMatch | None:
        """The earliest stop string that ends within the last `num_new_chars` characters, if any."""
        if not self.stops or num_new_chars <= 0:
            return None
        start = max(0, len(text) - num_new_chars - self.max_len + 1)
        best: StopMatch | None = None
        best_index = len(text) + 1
        for stop in self.stops:
            i = text.find(stop, start)
            if i != -1 and i < best_index:
                best_index = i
                cut = i + len(stop) if self.include_in_output else i
                best = StopMatch(stop, cut, i + len(stop))
        return best

    def holdback(self, text: str) -> int:
        """Characters at the end of `text` that could still grow into a stop string."""
        if not self.stops:
            return 0
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
