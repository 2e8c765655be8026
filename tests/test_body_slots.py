"""The memory for bodies in flight (body_slots.py): who gets room, in which order, and when a
body is told there will be none. BodySlots is the receiver's own bookkeeping, used directly."""

from __future__ import annotations

import asyncio

import pytest

from flespi_receiver.body_slots import BodySlots, Holding
from flespi_receiver.errors import BodyTooBusy


async def started(slots: BodySlots) -> Holding:
    holding = Holding()
    await slots.take(holding, 1)
    return holding


async def test_a_body_that_grows_is_served_before_bodies_that_start() -> None:
    slots = BodySlots(3)
    first, second = await started(slots), await started(slots)
    growing = asyncio.create_task(slots.take(first, 3))
    starting = asyncio.create_task(started(slots))
    await asyncio.sleep(0)
    # one slot is free, but the growing body waits for two: the new body waits behind it
    assert slots.free == 1
    assert not growing.done()
    assert not starting.done()
    slots.release(second)
    await growing
    assert first.slots == 3
    assert slots.free == 0
    assert not starting.done()
    slots.release(first)
    assert (await starting).slots == 1


async def test_bodies_all_waiting_to_grow_the_last_is_refused_and_the_first_goes_on() -> None:
    slots = BodySlots(2)
    first, second = await started(slots), await started(slots)
    growing = asyncio.create_task(slots.take(first, 2))
    await asyncio.sleep(0)
    with pytest.raises(BodyTooBusy):
        await slots.take(second, 2)
    assert second.slots == 1  # still its own until its reply is sent
    slots.release(second)
    await growing
    assert first.slots == 2


async def test_a_wait_that_times_out_leaves_the_queue_and_keeps_what_the_body_held() -> None:
    slots = BodySlots(2)
    first, second = await started(slots), await started(slots)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await slots.take(first, 2)
    assert first.slots == 1
    # the queue is empty again: a body that starts once a slot is free gets it at once
    slots.release(second)
    third = await started(slots)
    assert third.slots == 1
    assert slots.free == 0


async def test_room_past_every_slot_is_every_slot() -> None:
    slots = BodySlots(4)
    body = await started(slots)
    await slots.take(body, 9)
    assert body.slots == 4
    assert slots.free == 0
    slots.release(body)
    assert slots.free == 4
