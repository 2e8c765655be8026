"""Who is asking: the client behind trusted proxies, allowed networks, failed-auth limits."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Literal

from multidict import CIMultiDictProxy

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def _parse(value: str) -> Address | None:
    value = value.strip().strip('"')
    if value.startswith("["):  # [2001:db8::1]:4711
        value = value[1 : value.find("]")]
    elif value.count(":") == 1:  # 192.0.2.1:4711
        value = value.split(":", 1)[0]
    try:
        address = ip_address(value)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:192.0.2.1 from a dual-stack socket
    return address


def _in(address: Address, networks: Iterable[Network]) -> bool:
    return any(address in network for network in networks)


def _forwarded_for(headers: CIMultiDictProxy[str] | Mapping[str, str]) -> list[str]:
    """The `for=` values of every RFC 7239 `Forwarded` header line, nearest hop last."""
    chain = []
    for line in _lines(headers, "Forwarded"):
        for element in line.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    chain.append(value)
    return chain


def _x_forwarded_for(headers: CIMultiDictProxy[str] | Mapping[str, str]) -> list[str]:
    """The addresses of every `X-Forwarded-For` header line, nearest hop last."""
    return [
        part
        for line in _lines(headers, "X-Forwarded-For")
        for part in line.split(",")
        if part.strip()
    ]


def _lines(headers: CIMultiDictProxy[str] | Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, CIMultiDictProxy):
        return headers.getall(name, [])
    value = headers.get(name)
    return [value] if value is not None else []


ClientAddressHeader = Literal["x-forwarded-for", "forwarded"]


def client_address(
    peer: str | None,
    headers: CIMultiDictProxy[str] | Mapping[str, str],
    trusted_proxies: list[Network],
    header: ClientAddressHeader = "x-forwarded-for",
) -> Address | None:
    """The address of the client: the peer itself, unless the peer is a trusted proxy.

    Behind trusted proxies the client is the right-most address of `header` (all its lines
    joined, in order) that is not itself a trusted proxy: each proxy appends the address it
    saw, so everything left of the first untrusted address may be made up by the client.
    Only `header` is read; the other one is ignored, whatever it claims. An unreadable hop
    stops the walk at the last trusted address. Without trusted proxies in front, headers are
    never read.
    """
    address = _parse(peer) if peer else None
    if address is None or not _in(address, trusted_proxies):
        return address
    chain = _forwarded_for(headers) if header == "forwarded" else _x_forwarded_for(headers)
    for hop in reversed(chain):
        forwarded = _parse(hop)
        if forwarded is None:
            return address  # an unreadable hop: trust nothing beyond the proxy we know
        if not _in(forwarded, trusted_proxies):
            return forwarded
        address = forwarded
    return address


def limiter_key(address: Address | None) -> str:
    """What the failure limit counts: an IPv4 address, or the /64 an IPv6 address is in.

    One IPv6 host usually owns a whole /64 and can pick any address in it.
    """
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, 64), strict=False))
    return str(address)


def allowed(address: Address | None, networks: list[Network]) -> bool:
    """No networks configured means every address is allowed."""
    if not networks:
        return True
    return address is not None and _in(address, networks)


class FailureLimiter:
    """Counts failed authentications per key (`limiter_key`); too many in a minute and further
    wrong credentials from that key get 429 instead of 401. The right credentials always pass.

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
        """Seconds until this key's failures drop below the limit, or 0 when below it."""
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
