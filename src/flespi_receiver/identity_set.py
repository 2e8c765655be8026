"""A set of message identities (16 bytes each) in about 37 bytes an identity.

A Python set of bytes costs about 85 bytes per identity (the bytes object and its slot): for a
body of very many tiny messages that is as much as the body itself. Here the identities sit
one after another in one bytearray, and an open-addressing table of 4-byte positions finds
them: membership is decided by comparing the whole identity, so two identities that share
their first bytes are still two. Distinct: the identities of a batch's COPY rows so far.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from flespi_receiver.identity import IDENTITY_SIZE

# at most half the slots are taken: an absent identity is found absent in about 1.5 probes
_FIRST_BITS = 12


class IdentitySet:
    """Identities of IDENTITY_SIZE bytes (identity.py); `add` says whether one is new.

    The slot of an identity is Python's hash of it (SipHash under a key drawn at start unless
    PYTHONHASHSEED is set), so a sender can't choose identities that crowd one slot.
    """

    def __init__(self, identities: Iterable[bytes] = ()) -> None:
        self._identities = bytearray()
        # the low 32 bits of each identity's hash, in the same order: growing needs no rehash
        self._hashes = array("I")
        self._slots = array("I", bytes(4 << _FIRST_BITS))  # 0: empty, else 1 + position
        for identity in identities:
            self.add(identity)

    def __len__(self) -> int:
        return len(self._identities) // IDENTITY_SIZE

    def add(self, identity: bytes) -> bool:
        """Add `identity` (IDENTITY_SIZE bytes); False when the set held it already."""
        if len(identity) != IDENTITY_SIZE:
            raise ValueError(f"an identity is {IDENTITY_SIZE} bytes, not {len(identity)}")
        slots, held = self._slots, self._identities
        mask = len(slots) - 1
        digest = hash(identity) & 0xFFFFFFFF
        slot = digest & mask
        position = slots[slot]
        while position:
            start = (position - 1) * IDENTITY_SIZE
            if held[start : start + IDENTITY_SIZE] == identity:
                return False
            slot = (slot + 1) & mask
            position = slots[slot]
        held += identity
        self._hashes.append(digest)
        count = len(held) // IDENTITY_SIZE
        slots[slot] = count
        if 2 * count > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        """Twice the slots, every identity placed again."""
        slots = self._slots = array("I", bytes(8 * len(self._slots)))
        mask = len(slots) - 1
        for position, digest in enumerate(self._hashes, 1):
            slot = digest & mask
            while slots[slot]:
                slot = (slot + 1) & mask
            slots[slot] = position


class Distinct:
    """The identities of the rows a batch's COPY holds so far: a copy of a message within the
    batch is counted in `repeated`, not sent (it would fail the COPY on the unique key).

    A set up to SMALL identities (the fastest), then an IdentitySet: about 37 bytes an
    identity instead of 85, which a body of very many tiny messages needs to stay within a
    few times its size."""

    SMALL = 4096

    def __init__(self) -> None:
        self.identities: set[bytes] | None = set()
        self.compact: IdentitySet | None = None
        self.repeated = 0

    def first(self, identity: bytes) -> bool:
        """Whether this is the first message of the batch with this identity."""
        identities = self.identities
        if identities is not None:
            if identity in identities:
                self.repeated += 1
                return False
            identities.add(identity)
            if len(identities) > self.SMALL:
                self.compact, self.identities = IdentitySet(identities), None
            return True
        assert self.compact is not None
        if self.compact.add(identity):
            return True
        self.repeated += 1
        return False
