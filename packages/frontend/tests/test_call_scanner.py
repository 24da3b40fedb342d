"""call_scanner: when a call's head is read, and where its arguments and object end, on every prefix."""

from __future__ import annotations

import pytest

from treadle_frontend.server.call_scanner import CallScanner, Head, read_head

HEAD = ' {\n "name" : "get_\\"w\\"", "parameters":{'


def test_head_is_read_once_complete() -> None:
    assert read_head(HEAD) == ('get_"w"', len(HEAD) - 1)
    for cut in range(len(HEAD)):  # every shorter prefix could still become one
        assert read_head(HEAD[:cut]) is Head.MORE, cut


@pytest.mark.parametrize(
    "text",
    ['{"arguments": {}, "name": "f"}', '{"name": 3', '{"name": "f", "arguments": "{}"}', '[{"name"', "x"],
)
def test_other_shapes_are_not_streamed(text: str) -> None:
    assert read_head(text) is Head.NO
    scanner = CallScanner()
    assert scanner.feed(text) == ("", None) and not scanner.streamable and scanner.name is None


def test_arguments_and_object_end_in_any_pieces() -> None:
    text = '{"name": "f", "arguments": {"s": "}{\\"", "n": [1, {}]}, "x": "}"} tail'
    args = '{"s": "}{\\"", "n": [1, {}]}'
    for cut in range(len(text) + 1):
        scanner = CallScanner()
        got1, end1 = scanner.feed(text[:cut])
        got2, end2 = scanner.feed(text[cut:]) if end1 is None else ("", None)
        assert scanner.name == "f" and got1 + got2 == args, cut
        assert (end1 if end1 is not None else cut + (end2 or 0)) == len(text) - len(" tail"), cut
