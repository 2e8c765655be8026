"""The memory for bodies in flight, in slots of `server.max_body_size` bytes each.

`server.bodies_in_flight` slots in all, so the memory bodies hold stays within
`max_body_size x bodies_in_flight`. A body takes one slot when it starts, and more while it is
worked on when what it holds grows past its slots (its chunks, what it keeps per message and per
device, a large element held several times: `body_cost.py`). A body that grows keeps its slots
while it waits for more and is served before bodies that have not started, so a new body never
takes the room a body in flight is waiting for. When every slot is held by bodies waiting to
grow, none can go on: the one that asked last gives its slots back with `BodyTooBusy` (503, the
sender retries), so the others do.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from flespi_receiver.errors import BodyTooBusy


@dataclass(eq=False, slots=True)
class Holding:
    """The slots one body holds."""

    slots: int = 0


@dataclass(eq=False, slots=True)
class _Waiter:
    holding: Holding
    wanted: int  # slots the body will hold in all once served
    future: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BodySlots:
    """`total` slots shared by the bodies in flight; FIFO within bodies that grow, then within
    bodies that start."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._growing: deque[_Waiter] = deque()
        self._starting: deque[_Waiter] = deque()

    async def take(self, holding: Holding, wanted: int) -> None:
        """Make the body hold `wanted` slots (at most every slot there is), waiting for them;
        a body in flight keeps the slots it holds meanwhile. Bound the wait with a timeout;
        slots served before a timeout or a cancellation are the body's: `release` them.
        Raises BodyTooBusy when room could never come (every slot held by bodies waiting to
        grow); the body then still holds what it held before."""
        wanted = min(wanted, self.total)
        if wanted <= holding.slots:
            return
        waiter = _Waiter(holding, wanted)
        queue = self._growing if holding.slots else self._starting
        queue.append(waiter)
        self._serve()
        try:
            served = await waiter.future
        except asyncio.CancelledError:
            waiter.future.cancel()
            if waiter in queue:
                queue.remove(waiter)
                self._serve()  # a waiter behind this one may fit now
            raise
        if not served:
            # raised here, not set on the future: a future holding the exception, held by
            # this frame, held by the exception's traceback, would keep the body's data
            # alive until the garbage collector finds the cycle
            raise BodyTooBusy

    def release(self, holding: Holding) -> None:
        """Give back every slot the body holds."""
        self.free += holding.slots
        holding.slots = 0
        self._serve()

    def _serve(self) -> None:
        """Hand out free slots in order (bodies that grow first, each in turn, none overtaking),
        then refuse a body that would wait for ever."""
        while True:
            self._hand_out()
            # the slots not free all held by bodies waiting to grow: nothing will free any.
            # The last to ask is refused; its slots come back when its reply is sent
            waiting = sum(waiter.holding.slots for waiter in self._growing)
            if not self._growing or waiting < self.total - self.free:
                return
            self._growing.pop().future.set_result(False)

    def _hand_out(self) -> None:
        for queue in (self._growing, self._starting):
            while queue:
                waiter = queue[0]
                needed = waiter.wanted - waiter.holding.slots
                if needed > self.free:
                    return
                queue.popleft()
                self.free -= needed
                waiter.holding.slots = waiter.wanted
                waiter.future.set_result(True)
