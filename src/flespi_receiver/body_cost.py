"""What a body in flight holds in memory, in bytes, from what is known of it as it is worked on.

The receiver takes room for this in the memory for bodies in flight (body_slots.py) before the
body holds more, so that `max_body_size x bodies_in_flight` bounds it. The figures are upper
bounds of what was measured (peak RSS of the receiver over the body's size, `flespi-receiver
bench --memory-shapes`, tests/test_connections.py, tests/test_resent.py), with a margin for
the allocator.

A body of very many tiny messages (about 30 bytes each, no ident) measured alone, stored as it
arrives: its chunks plus about 41 bytes a message at its peak (the message's identity, 37
bytes, identity_set.py), 2.3 times its size, against 1 MiB + 3.9 times its size estimated here.
The margin is what bodies refused on their way hold until they are let go: four such bodies at
once peak at 11 MiB with slots of 3 MiB (tests/test_tiny_messages.py), 23 MiB with slots of
8 MiB. A piece of a body is at most 256 KiB (body.py): split, its elements are about 2.5 times
that, within PER_BODY. Message by message (the careful path), such a body holds about 360 bytes
a message once decoded: it needs more than every slot, and is stored with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from flespi_receiver.body import BodyReader
from flespi_receiver.fields import MessageFields
from flespi_receiver.large_element import LARGE_ELEMENT
from flespi_receiver.messages import Message, Rejected, judged_large_apart
from flespi_receiver.splitter import ElementSplitter

# every body: the next piece of data (at most 256 KiB, body.py; taken before room for it is
# asked) and its elements while they are judged, the decompressor's window, a chunk of rows
PER_BODY = 1024 * 1024
# a body stored while it arrives: its chunks (kept in case the careful path needs the whole),
# the piece being split, the rows on their way
STREAMED_PER_BYTE = 1.75
# per message: its identity, kept to count a copy of it later in the batch (identity_set.py)
STREAMED_PER_MESSAGE = 64
# per device: its latest message (or every message, merge mode) in the batch's fold
STREAMED_PER_DEVICE = 450
# an element over LARGE_ELEMENT is held twice more while it arrives and is judged (large_element.py)
LARGE_ELEMENT_COPIES = 2
# a body stored message by message (a message PostgreSQL refused, a body that is not an array):
# joined, then each message parsed apart (its text, its object, its columns)
CAREFUL_PER_BYTE = 3
CAREFUL_PER_MESSAGE = 1500


@dataclass(slots=True)
class Split:
    """How much of a body was split into elements so far: elements, bytes."""

    elements: int = 0
    size: int = 0

    async def piece(
        self,
        body: BodyReader,
        splitter: ElementSplitter,
        data: bytes,
        devices: int,
        fields: MessageFields,
    ) -> list[bytes | Message | Rejected]:
        """The elements `data` (the body's latest piece) completes, once the body holds room
        for what it will hold with it (`streamed`; `devices` in its fold), counted here.
        Raises BodyTooBusy when there was no room."""
        pending = splitter.pending + len(data)  # at most, once the piece is in
        await body.need(streamed(body.size, pending, self, devices))
        elements = await judged_large_apart(splitter.feed(data), fields)
        self.elements += len(elements)
        self.size += len(data)
        return elements

    def estimated_elements(self, body_size: int) -> int:
        """The elements of a body of `body_size` bytes, at the rate seen so far."""
        if not self.size:
            return self.elements
        return max(self.elements, self.elements * body_size // self.size)


def streamed(size: int, pending: int, split: Split, devices: int) -> int:
    """Bytes held by a body of `size` bytes so far, stored while it arrives, with `pending`
    bytes of an element not yet split, `devices` in its fold."""
    large = pending * LARGE_ELEMENT_COPIES if pending > LARGE_ELEMENT else 0
    return int(
        PER_BODY
        + size * STREAMED_PER_BYTE
        + large
        + split.elements * STREAMED_PER_MESSAGE
        + devices * STREAMED_PER_DEVICE
    )


def careful(size: int, split: Split) -> int:
    """Bytes held by a body of `size` bytes stored message by message."""
    elements = split.estimated_elements(size)
    return PER_BODY + size * CAREFUL_PER_BYTE + elements * CAREFUL_PER_MESSAGE
