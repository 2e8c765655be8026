"""Not open to the world: TLS, allowed networks, proxies that can't be spoofed, rotation, logs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
import time
from ipaddress import ip_address, ip_network
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import trustme
from multidict import CIMultiDict, CIMultiDictProxy

from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import StreamEmulator, encode_messages, sample_messages
from flespi_receiver.network import ClientAddressHeader, client_address, limiter_key

from conftest import ClientFactory
from helpers import (
    AUTH,
    TOKEN,
    config_file,
    count,
    flespi_message,
    log_of,
    memory_kib,
    receiver_process,
    wait_until_serving,
)

BODY = orjson.dumps([flespi_message(1)])
FLESPI_RANGE = "185.213.2.0/24"
XFF: ClientAddressHeader = "x-forwarded-for"


@pytest.mark.parametrize(
    ("peer", "headers", "header", "expected"),
    [
        ("127.0.0.1", {"X-Forwarded-For": "185.213.2.7"}, XFF, "185.213.2.7"),
        ("127.0.0.1", {"X-Forwarded-For": "10.9.9.9, 185.213.2.7"}, XFF, "185.213.2.7"),
        ("127.0.0.1", {"X-Forwarded-For": "185.213.2.7, 127.0.0.2"}, XFF, "185.213.2.7"),
        # a client's own X-Forwarded-For is left of what the proxy appended: never believed
        ("127.0.0.1", {"X-Forwarded-For": "185.213.2.7, 203.0.113.5"}, XFF, "203.0.113.5"),
        # Forwarded is ignored unless configured, whoever sent it
        (
            "127.0.0.1",
            {"Forwarded": "for=185.213.2.7", "X-Forwarded-For": "203.0.113.5"},
            XFF,
            "203.0.113.5",
        ),
        ("127.0.0.1", {"Forwarded": "for=185.213.2.7"}, XFF, "127.0.0.1"),
        (
            "127.0.0.1",
            {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'},
            "forwarded",
            "2001:db8::7",
        ),
        (
            "127.0.0.1",
            {"Forwarded": "for=185.213.2.7:1234, for=127.0.0.3", "X-Forwarded-For": "10.1.1.1"},
            "forwarded",
            "185.213.2.7",
        ),
        ("127.0.0.1", {"X-Forwarded-For": "garbage"}, XFF, "127.0.0.1"),
        ("127.0.0.1", {"X-Forwarded-For": "185.213.2.7, garbage"}, XFF, "127.0.0.1"),
        ("127.0.0.1", {}, XFF, "127.0.0.1"),
        ("192.0.2.1", {"X-Forwarded-For": "185.213.2.7"}, XFF, "192.0.2.1"),
        ("::ffff:127.0.0.1", {"X-Forwarded-For": "185.213.2.7"}, XFF, "185.213.2.7"),
    ],
    ids=[
        "xff",
        "xff-chain",
        "proxy-hop",
        "xff-spoofed-left",
        "forwarded-ignored",
        "forwarded-only-ignored",
        "forwarded-v6",
        "forwarded-chain",
        "garbage",
        "garbage-nearest",
        "none",
        "untrusted-peer",
        "v4-mapped-peer",
    ],
)
def test_client_address_believes_only_trusted_proxies(
    peer: str, headers: dict[str, str], header: ClientAddressHeader, expected: str
) -> None:
    trusted = [ip_network("127.0.0.0/8")]
    assert client_address(peer, headers, trusted, header) == ip_address(expected)


def test_every_x_forwarded_for_line_counts_in_order() -> None:
    headers = CIMultiDictProxy(
        CIMultiDict([("X-Forwarded-For", "185.213.2.7"), ("X-Forwarded-For", "203.0.113.5")])
    )
    trusted = [ip_network("127.0.0.0/8")]
    assert client_address("127.0.0.1", headers, trusted) == ip_address("203.0.113.5")


def test_failure_limit_counts_ipv6_clients_per_64() -> None:
    one = limiter_key(ip_address("2001:db8:1:2::1"))
    assert one == limiter_key(ip_address("2001:db8:1:2:ffff:ffff:ffff:ffff"))
    assert one != limiter_key(ip_address("2001:db8:1:3::1"))
    assert limiter_key(ip_address("192.0.2.1")) != limiter_key(ip_address("192.0.2.2"))


async def test_allowed_networks_refuse_other_addresses_before_reading(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra=f'allowed_networks = ["{FLESPI_RANGE}"]')
    reply = await client.post("/flespi", data=BODY, headers=AUTH)
    assert reply.status == 403
    # a client cannot claim to be flespi when the peer is not a trusted proxy
    spoofed = await client.post(
        "/flespi", data=BODY, headers={**AUTH, "X-Forwarded-For": "185.213.2.7"}
    )
    assert spoofed.status == 403
    assert await count(db) == 0


async def test_behind_a_trusted_proxy_the_forwarded_address_counts(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(
        extra=f'allowed_networks = ["{FLESPI_RANGE}"]\ntrusted_proxies = ["127.0.0.1/32"]'
    )
    ok = await client.post("/flespi", data=BODY, headers={**AUTH, "X-Forwarded-For": "185.213.2.7"})
    assert ok.status == 200
    other = await client.post("/flespi", data=BODY, headers={**AUTH, "X-Forwarded-For": "10.0.0.1"})
    assert other.status == 403
    assert await count(db) == 1


async def test_stream_networks_apply_to_their_stream(receiver: ClientFactory) -> None:
    streams = """
[[streams]]
name = "main"
path = "/flespi"
authorization = ["Bearer test-token"]
allowed_networks = ["10.0.0.0/8"]
"""
    client = await receiver(streams=streams)
    assert (await client.post("/flespi", data=BODY, headers=AUTH)).status == 403


async def test_repeated_auth_failures_slow_wrong_tokens_never_the_right_one(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="auth_failures_per_minute = 3")
    wrong = {"Authorization": "Bearer guess"}
    for _ in range(3):
        assert (await client.post("/flespi", data=BODY, headers=wrong)).status == 401
    # further wrong tokens are told when to come back
    slowed = await client.post("/flespi", data=BODY, headers=wrong)
    assert slowed.status == 429
    assert 1 <= int(slowed.headers["Retry-After"]) <= 61
    # the right token from the same address is stored all the same
    assert (await client.post("/flespi", data=BODY, headers=AUTH)).status == 200
    assert await count(db) == 1


async def test_failure_limit_behind_a_proxy_counts_each_client_and_ipv6_per_64(
    receiver: ClientFactory,
) -> None:
    client = await receiver(extra='auth_failures_per_minute = 2\ntrusted_proxies = ["127.0.0.1"]')

    async def wrong_from(address: str) -> int:
        headers = {"Authorization": "Bearer guess", "X-Forwarded-For": address}
        return (await client.post("/flespi", data=BODY, headers=headers)).status

    assert [await wrong_from("2001:db8:0:1::1"), await wrong_from("2001:db8:0:1::2")] == [401, 401]
    # another address in the same /64 is the same client
    assert await wrong_from("2001:db8:0:1::ffff") == 429
    # another /64, another IPv4 client, and the proxy's other clients are not affected
    assert await wrong_from("2001:db8:0:2::1") == 401
    assert await wrong_from("203.0.113.5") == 401
    right = {**AUTH, "X-Forwarded-For": "2001:db8:0:1::1"}
    assert (await client.post("/flespi", data=BODY, headers=right)).status == 200


def https_config(
    tmp_path: Path, database_url: str, port: int, server: str = ""
) -> tuple[Path, ssl.SSLContext]:
    """A configuration serving HTTPS with a certificate made for the test (`server`: more
    [server] lines), and a client context that trusts it."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_pem.write_to_path(str(key))
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    config = config_file(tmp_path, database_url, port)
    config.write_text(
        config.read_text().replace(
            "[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n{server}'
        )
    )
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    return config, client_context


async def post_over_tls(
    port: int, context: ssl.SSLContext, process: subprocess.Popen[bytes]
) -> int:
    """The status of one batch posted over HTTPS, once the receiver listens."""
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(200):
            try:
                async with session.post(
                    f"https://127.0.0.1:{port}/flespi", data=BODY, headers=AUTH
                ) as reply:
                    return reply.status
            except aiohttp.ClientConnectorError:
                assert process.poll() is None
                await asyncio.sleep(0.05)
    raise AssertionError("receiver did not answer over TLS")


async def test_https_with_a_certificate_made_for_the_test(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config, client_context = https_config(tmp_path, database_url, port)
    with receiver_process(config) as process:
        assert await post_over_tls(port, client_context, process) == 200
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                await plain.post(f"http://127.0.0.1:{port}/flespi", data=BODY, headers=AUTH)
    assert await count(db) == 1


def closed_by_receiver(raw: socket.socket) -> bool:
    raw.settimeout(10)
    try:
        return raw.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_idle_connections_to_the_tls_port_hold_little_and_close_after_header_timeout(
    tmp_path: Path, database_url: str
) -> None:
    # asyncio gave each accepted TLS connection a 256 KiB buffer at once and waited 60 s for
    # its handshake: about 300 KiB a stranger's idle connection, for a minute
    port = free_port()
    config, client_context = https_config(tmp_path, database_url, port, "header_timeout = 1\n")
    connections = 300
    with receiver_process(config) as process:
        assert await post_over_tls(port, client_context, process) == 200
        before = memory_kib(process.pid)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        await asyncio.sleep(0.5)
        grown = memory_kib(process.pid) - before
        started = time.monotonic()
        closed = await asyncio.to_thread(lambda: all(closed_by_receiver(raw) for raw in held))
        waited = time.monotonic() - started
        for raw in held:
            raw.close()
        assert process.poll() is None
    assert closed
    assert waited < 5, f"closed {waited:.1f} s after, header_timeout is 1 s"
    assert grown / connections < 128, f"{grown / connections:.0f} KiB a connection"


async def test_a_client_ending_tls_without_close_notify_writes_no_log_line(
    tmp_path: Path, database_url: str
) -> None:
    # a refused request over TLS, then the client's FIN without close_notify: asyncio warned
    # once per connection ("returning true from eof_received() has no effect when using
    # ssl"), a line a stranger could have written without limit
    port = free_port()
    config, client_context = https_config(tmp_path, database_url, port)

    def refused_then_fin() -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        tls = client_context.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"POST /flespi HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]")
        time.sleep(0.02)
        tls.shutdown(socket.SHUT_WR)  # TCP's FIN, no close_notify
        tls.settimeout(5)
        with contextlib.suppress(OSError):
            while tls.recv(4096):
                pass
        tls.close()

    with receiver_process(config) as process:
        assert await post_over_tls(port, client_context, process) == 200
        for _ in range(20):
            await asyncio.to_thread(refused_then_fin)
        await asyncio.sleep(0.3)
        process.terminate()
        assert process.wait(20) == 0
    events = [orjson.loads(line) for line in log_of(config).read_text().splitlines()]
    assert not [e for e in events if e.get("logger") == "asyncio"], events[-3:]


async def test_sighup_rotates_credentials_under_load_without_failing_a_request(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    original = config.read_text()
    url = f"http://127.0.0.1:{port}/flespi"
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        emulator = StreamEmulator(url, authorization=TOKEN)
        load = asyncio.create_task(
            emulator.run(encode_messages(sample_messages(3000, seed=9)), batch_size=20)
        )
        await asyncio.sleep(0.3)
        config.write_text(
            original.replace('["Bearer test-token"]', '["Bearer test-token", "Bearer new"]')
        )
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        config.write_text("this is [not valid")  # refused: the previous settings stay
        process.send_signal(signal.SIGHUP)
        stats = await load
        assert stats.non_200 == 0
        assert stats.connection_errors == 0
        async with aiohttp.ClientSession() as session:
            new = {"Authorization": "Bearer new"}
            async with session.post(url, data=BODY, headers=new) as reply:
                assert reply.status == 200
            config.write_text(original.replace('["Bearer test-token"]', '["Bearer new"]'))
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            async with session.post(url, data=BODY, headers=AUTH) as reply:
                assert reply.status == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    lines = log_of(config).read_text().splitlines()
    events = [orjson.loads(line) for line in lines]
    assert any(e["event"] == "reload refused: the old configuration stays" for e in events)
    assert sum(e["event"] == "configuration reloaded" for e in events) == 2
    assert await count(db) == 3001
    # log lines never carry a secret: not the tokens, not the database password
    password = database_url.split(":")[2].split("@")[0]
    for line in lines:
        assert "test-token" not in line
        assert "Bearer new" not in line
        assert password not in line
