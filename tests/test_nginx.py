"""deploy/nginx.conf, run by a real nginx in front of a real receiver: the client address a
client makes up is never believed, the failure limit counts the real client, and the right
token always passes. Skipped where nginx is not installed (apt-get install nginx-light)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import trustme

from flespi_receiver.embedded import free_port

from helpers import (
    AUTH,
    config_file,
    count,
    flespi_message,
    log_events,
    receiver_process,
    wait_until_serving,
)

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (apt-get install nginx-light; .ci/run installs it when it can)",
)
RECIPE = Path(__file__).parent.parent / "deploy" / "nginx.conf"
BODY = orjson.dumps([flespi_message(1)])


@contextmanager
def nginx_in_front(tmp_path: Path, receiver_port: int) -> Iterator[tuple[int, ssl.SSLContext]]:
    """The shipped server block, with a test certificate, listening on a free port."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "nginx-cert.pem", tmp_path / "nginx-key.pem"
    certificate.private_key_pem.write_to_path(str(key))
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    port = free_port()
    server = (
        RECIPE.read_text()
        .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;")
        .replace("/etc/letsencrypt/live/receiver.example.com/fullchain.pem", str(cert))
        .replace("/etc/letsencrypt/live/receiver.example.com/privkey.pem", str(key))
        .replace(
            "proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{receiver_port};"
        )
    )
    assert f"127.0.0.1:{port}" in server
    assert str(cert) in server
    (tmp_path / "server.conf").write_text(server)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"{kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "main.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/nginx-error.log;\nevents {{}}\n"
        f"http {{\naccess_log off;\n{temp}include {tmp_path}/server.conf;\n}}\n"
    )
    assert NGINX is not None
    process = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "main.conf")])
    context = ssl.create_default_context()
    authority.configure_trust(context)
    try:
        yield port, context
    finally:
        process.terminate()
        process.wait(10)


async def wait_for_nginx(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):
        try:
            async with session.post(url, data=b"[]") as reply:
                if reply.status in (401, 403, 429):
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("nginx did not start")


async def test_through_nginx_no_client_can_choose_its_address(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(
        config.read_text().replace(
            "[server]\n",
            '[server]\ntrusted_proxies = ["127.0.0.1/32"]\nallowed_networks = ["127.0.0.1/32"]\n'
            "auth_failures_per_minute = 3\n",
        )
    )
    spoofed = {"X-Forwarded-For": "185.213.2.10", "Forwarded": "for=185.213.2.10"}
    with receiver_process(config) as process, nginx_in_front(tmp_path, port) as (front, tls):
        await wait_until_serving(port, process)
        url = f"https://127.0.0.1:{front}/flespi"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
            await wait_for_nginx(session, url)
            # made-up addresses are dropped by nginx: the receiver sees the real client, which
            # is allowed (a believed 185.213.2.10 would be refused with 403)
            async with session.post(url, data=BODY, headers={**AUTH, **spoofed}) as reply:
                assert reply.status == 200
                assert reply.headers["X-Request-Id"] != ""
            # a new made-up address for every guess: still one client to the failure limit
            statuses = []
            for i in range(5):
                wrong = {"Authorization": "Bearer guess", "X-Forwarded-For": f"203.0.113.{i}"}
                async with session.post(url, data=BODY, headers=wrong) as reply:
                    statuses.append(reply.status)
            assert statuses[-1] == 429
            # and the right token still passes
            async with session.post(url, data=BODY, headers=AUTH) as reply:
                assert reply.status == 200
        process.terminate()
        assert process.wait(20) == 0
    assert await count(db) == 1  # the second 200 was the same batch again: a duplicate
    clients = {e["client"] for e in log_events(config) if e["event"] == "batch"}
    assert clients == {"127.0.0.1"}
