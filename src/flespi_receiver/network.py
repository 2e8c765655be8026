"""Who is asking: the client behind trusted proxies, allowed networks, failed-auth limits."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def _parse(value: str) -> Address | None:
    value = value.strip().strip('"')
    if value.startswith("["):  # [2001:db8::1]:4711
        value = value[1 : value.find("]")]
    elif value.count(":") == 1:  # 192.0.2.1:4711
        value = value.split(":", 1)[0]
    try:
        return ip_address(value)
    except ValueError:
        return None


def _in(address: Address, networks: Iterable[Network]) -> bool:
    return any(address in network for network in networks)


def _forwarded_chain(headers: Mapping[str, str]) -> list[str]:
    """Addresses a proxy chain reported, nearest last: RFC 7239 Forwarded, else X-Forwarded-For."""
    forwarded = headers.get("Forwarded")
    if forwarded:
        chain = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    chain.append(value)
        return chain
    return [part for part in headers.get("X-Forwarded-For", "").split(",") if part.strip()]


def client_address(
    peer: str | None, headers: Mapping[str, str], trusted_proxies: list[Network]
) -> Address | None:
    """The address of the client: the peer itself, unless the peer is a trusted proxy.

    Behind trusted proxies the forwarded chain is read from the nearest hop backwards and the
    first address that is not itself a trusted proxy is the client. Headers from anyone else
    are ignored, so a client can't claim another address.
    """
    address = _parse(peer) if peer else None
    if address is None or not _in(address, trusted_proxies):
        return address
    for hop in reversed(_forwarded_chain(headers)):
        forwarded = _parse(hop)
        if forwarded is None:
            return address  # an unreadable hop: trust nothing beyond the proxy we know
        if not _in(forwarded, trusted_proxies):
            return forwarded
        address = forwarded
    return address


def allowed(address: Address | None, networks: list[Network]) -> bool:
    """No networks configured means every address is allowed."""
    if not networks:
        return True
    return address is not None and _in(address, networks)


class FailureLimiter:
    """Counts failed authentications per address; too many in a minute and the address waits.

    Bounded: it remembers at most `max_addresses` addresses, forgetting the oldest first.
    """

    WINDOW = 60.0

    def __init__(self, per_minute: int, max_addresses: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.WINDOW:
            failures.popleft()
        return failures

    def retry_after(self, key: str) -> int:
        """Seconds this address must wait before its credentials are checked again, or 0."""
        if self.per_minute <= 0:
            return 0
        now = time.monotonic()
        failures = self._recent(key, now)
        if len(failures) < self.per_minute:
            return 0
        return max(1, int(failures[0] + self.WINDOW - now) + 1)

    def failed(self, key: str) -> None:
        now = time.monotonic()
        failures = self._recent(key, now)
        failures.append(now)
        self._failures.pop(key, None)
        self._failures[key] = failures  # most recent last
        while len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]
