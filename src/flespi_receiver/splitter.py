"""Splitting a JSON array into the text of its elements: whole, or while the body arrives."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

from flespi_receiver.json_scan import split_array

# RFC 8259 lets a parser skip a UTF-8 byte order mark at the start of the text
BOM = b"\xef\xbb\xbf"
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])
# where one element ends and the next begins (or, inside one, a nested object), in any spelling
_BOUNDARY = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")
_LEADING = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\n\r]*")
# the start of an object up to its first key, a short and plain one: {"ident":
_FIRST_KEY = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"([^"\\]{1,64})"[ \t\n\r]*:')
# a boundary is searched again from its `}` when it may be cut by the end of what arrived, but
# never across more whitespace than this: a missed cut only makes a piece longer
_SEARCH_OVERLAP = 4096
# pieces of a body split as it arrives: the first small, so that PostgreSQL starts at once
FIRST_PIECE = 16 * 1024
PIECE = 64 * 1024
# failed cuts in a row before the splitter leaves the rest of a body to the end
_CUT_ATTEMPTS = 16


# msgspec reads nesting by recursion, within Python's recursion limit: raised while it reads,
# so that elements nested up to the 1024 levels stored (and a little more: the array and the
# caller's frames) are read, not refused
_DEEP_ENOUGH = 1024 + 200
_LIMIT_LOCK = threading.Lock()
_raised = 0  # readers inside deep_enough(), in every thread


@contextmanager
def deep_enough() -> Iterator[None]:
    """Python's recursion limit at least _DEEP_ENOUGH + 200 meanwhile (the frames below)."""
    global _raised, _limit_before
    with _LIMIT_LOCK:
        if _raised == 0:
            _limit_before = sys.getrecursionlimit()
            sys.setrecursionlimit(max(_limit_before, _DEEP_ENOUGH + 200))
        _raised += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _raised -= 1
            if _raised == 0:
                sys.setrecursionlimit(_limit_before)


_limit_before = sys.getrecursionlimit()


class NotExact(Exception):
    """The fast path can't take this body: decode it carefully."""


def without_bom(body: bytes | memoryview) -> bytes | memoryview:
    """The body without a leading UTF-8 byte order mark, not copied."""
    if body[:3] == BOM:
        return memoryview(body)[3:]
    return body


def split_elements(body: bytes | memoryview) -> list[msgspec.Raw] | None:
    """The fast split: the text of each element of the array, or None if it is not one.

    msgspec checks the JSON syntax without building objects, so this costs a fraction of a
    full parse; each element is then parsed on its own, as late as possible.
    """
    try:
        with deep_enough():
            return _ELEMENTS.decode(without_bom(body))
    except (msgspec.DecodeError, RecursionError):
        return None


class ElementSplitter:
    """The fast split of a body that is still arriving: whole elements as soon as they are in.

    The array is cut into pieces of about PIECE bytes, each just after the `}` of a `},{`
    (whitespace allowed around the comma). Such a cut may fall inside a string or a nested
    array (a list of objects in a message), but then the piece is not valid JSON and the next
    one is tried: a piece that decodes holds whole elements. Each byte is searched once for
    cuts. Raises NotExact, maybe after some elements, for a body that is not a JSON array.

    A piece is decoded where it lies: the `[` or `,` before it and the byte after it are made
    `[` and `]` for the time of the decoding, so that the text of a large element is held
    twice at most (what arrived, and the element's own bytes), never a third time.
    """

    def __init__(self) -> None:
        # what arrived after the last whole element, from the "[" or "," before the next one
        self._rest = bytearray()
        self._opened = False  # the array's "[" has been seen
        self._preferred: re.Pattern[bytes] | None = None
        self._searched = 0  # no boundary before this position of _rest
        self._pieces = 0
        self._failed_cuts = 0  # in a row: bounded, so that the cost stays linear

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The elements completed by `data`, a piece at a time."""
        self._rest += data
        if not self._opened and not self._open():
            return
        start = 1  # the first byte after the separator
        try:
            while (piece := self._next_piece(start)) is not None:
                elements, start = piece
                yield from elements
        finally:
            del self._rest[: start - 1]
            self._searched = max(0, self._searched - (start - 1))

    @property
    def pending(self) -> int:
        """Bytes held after the last whole element: the size of the element in progress."""
        return len(self._rest)

    def finish(self) -> list[bytes]:
        """The elements after the last cut; the body has ended."""
        if not self._opened:
            raise NotExact
        elements = self._decode(0, None)
        self._rest = bytearray()
        if elements is None:
            raise NotExact
        return elements

    def _decode(self, opening: int, closing: int | None) -> list[bytes] | None:
        """The elements of _rest[opening + 1 : closing] (to the end of the body: None), or None
        when that is not a JSON array's content: a cut inside a string or a nested array.
        What msgspec can't read (an element that is not valid JSON: a lone surrogate, NaN,
        nesting past the limit) is split by its structure alone, so that each element is
        judged on its own and a bad one costs only itself."""
        rest = self._rest
        saved = rest[opening], rest[closing] if closing is not None else 0
        rest[opening] = 0x5B  # [
        if closing is not None:
            rest[closing] = 0x5D  # ]
        view = memoryview(rest)
        piece = view[opening : None if closing is None else closing + 1]
        try:
            try:
                with deep_enough():
                    raws = _ELEMENTS.decode(piece)
            except (msgspec.DecodeError, RecursionError):
                split = split_array(bytes(piece))
                return None if isinstance(split, str) else split
            # copied out before the views go: _rest grows and shrinks afterwards
            elements = [bytes(raw) for raw in raws]
            del raws
            return elements
        finally:
            piece.release()
            view.release()
            rest[opening] = saved[0]
            if closing is not None:
                rest[closing] = saved[1]

    def _next_piece(self, start: int) -> tuple[list[bytes], int] | None:
        """The whole elements from `start` to the next good cut, and where the next piece
        starts; None: wait for more of the body."""
        after = max(start + (PIECE if self._pieces else FIRST_PIECE), self._searched)
        while self._failed_cuts < _CUT_ATTEMPTS:
            boundary = self._find_cut(after)
            if boundary is None:
                return None
            cut, next_start = boundary
            elements = self._decode(start - 1, cut + 1)
            if elements is None:
                self._failed_cuts += 1
                after = cut + 1
                continue
            self._failed_cuts = 0
            self._pieces += 1
            return elements, next_start
        return None  # cut inside elements again and again: the rest is split whole at the end

    def _find_cut(self, after: int) -> tuple[int, int] | None:
        """The `}` of the next boundary after `after` and where the element after it starts.
        Messages of one stream mostly begin with the same key and nested objects seldom do:
        a boundary followed by the first message's first key is tried first, as it is most
        likely between two messages."""
        found = None
        if self._preferred is not None:
            found = self._preferred.search(self._rest, after, after + PIECE)
        if found is None:
            found = _BOUNDARY.search(self._rest, after)
        if found is None:
            last_brace = self._rest.rfind(b"}", max(after, len(self._rest) - _SEARCH_OVERLAP))
            self._searched = last_brace if last_brace != -1 else len(self._rest)
            return None
        comma = self._rest.index(b",", found.start())
        return found.start(), comma + 1

    def _open(self) -> bool:
        leading = _LEADING.match(self._rest)
        start = leading.end() if leading else 0
        if start == len(self._rest):
            return False  # only whitespace so far
        if self._rest[start] != ord("["):
            raise NotExact
        del self._rest[:start]  # the "[" stays, as the separator before the first element
        self._opened = True
        first_key = _FIRST_KEY.match(self._rest, 1)
        if first_key:
            key = re.escape(first_key.group(1))
            self._preferred = re.compile(
                rb"\}[ \t\n\r]*,[ \t\n\r]*\{[ \t\n\r]*\"" + key + rb"\"[ \t\n\r]*:"
            )
        return True
