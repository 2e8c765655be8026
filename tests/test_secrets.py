"""No secret is printed: database URLs in every form asyncpg and libpq read, tokens inside
malformed header lines, and every log line (the libraries' included) is one JSON object."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from flespi_receiver.database_url import MASK, mask_database_url, parse_database_url
from flespi_receiver.embedded import free_port

from helpers import (
    SCRIPT,
    TOKEN,
    config_file,
    log_of,
    receiver_process,
    wait_until_serving,
)

SECRET = "S3cr3tPw"

READABLE = {
    "userinfo": f"postgresql://flespi:{SECRET}@db.example.com:5432/flespi",
    "postgres-scheme": f"postgres://flespi:{SECRET}@db.example.com/flespi",
    "encoded-slash": f"postgresql://flespi:{SECRET}%2Fx@db.example.com/flespi",
    "encoded-hash-and-at": f"postgresql://flespi:{SECRET}%23%40@db.example.com/flespi",
    "query-password": f"postgresql://flespi@db.example.com/flespi?password={SECRET}",
    "query-sslpassword": (
        f"postgresql://flespi@db.example.com/flespi?sslmode=require&sslpassword={SECRET}"
    ),
    "socket-host-in-query": f"postgresql:///flespi?host=/run/postgresql&password={SECRET}",
    "encoded-parameter-name": f"postgresql://flespi@db.example.com/flespi?pass%77ord={SECRET}",
    "twice": f"postgresql://u:{SECRET}@h/db?password={SECRET}&password={SECRET}",
    "multi-host": f"postgresql://flespi:{SECRET}@h1:5432,h2:5433/flespi",
    "ipv6": f"postgresql://flespi:{SECRET}@[2001:db8::1]:5432/flespi",
    "empty-user": f"postgresql://:{SECRET}@db.example.com/flespi",
    # not read as a password by libpq or asyncpg, but meant as one
    "upper-case-parameter": f"postgresql://flespi@db.example.com/flespi?PASSWORD={SECRET}",
}
UNREADABLE = {
    "unencoded-slash": f"postgresql://flespi:{SECRET[:4]}/{SECRET[4:]}@db.example.com/flespi",
    "unencoded-hash": f"postgresql://flespi:{SECRET[:4]}#{SECRET[4:]}@db.example.com/flespi",
    "unencoded-at": f"postgresql://flespi:{SECRET[:4]}@{SECRET[4:]}@db.example.com/flespi",
    "unencoded-question-mark": f"postgresql://flespi:{SECRET[:4]}?{SECRET[4:]}@db.example.com/x",
    "query-without-equals": f"postgresql://flespi@db.example.com/flespi?{SECRET}",
    "unencoded-question-mark-after-digits": (
        f"postgresql://admin:2024?x={SECRET}@127.0.0.1:5432/flespi"
    ),
    "unencoded-question-mark-in-user": f"postgresql://u:5432?{SECRET}=@db.example.com/flespi",
}


def leaks(text: str) -> bool:
    """Any piece of the secret, as written or split by a bad URL."""
    return any(piece in text for piece in (SECRET, SECRET[:4], SECRET[4:]))


@pytest.mark.parametrize("url", READABLE.values(), ids=READABLE.keys())
def test_every_readable_url_form_is_masked(url: str) -> None:
    masked = mask_database_url(url)
    assert not leaks(masked), masked
    assert MASK in masked
    parse_database_url(url)  # accepted by the configuration


@pytest.mark.parametrize("url", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_url_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ValueError, match="postgresql://") as refused:
        parse_database_url(url)
    assert not leaks(str(refused.value))
    assert not leaks(mask_database_url(url))


def test_masking_keeps_what_is_not_secret() -> None:
    url = "postgresql://flespi:pw@db.example.com:5432/flespi?sslmode=require&password=pw"
    assert mask_database_url(url) == (
        f"postgresql://flespi:{MASK}@db.example.com:5432/flespi?sslmode=require&password={MASK}"
    )
    assert mask_database_url("postgresql://flespi@h/db") == "postgresql://flespi@h/db"


def check_config(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "check.toml"
    config.write_text(
        '[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer x1"]\n'
    )
    return subprocess.run(
        [str(SCRIPT), "check-config", "--config", str(config)],
        env={**os.environ, "FLESPI_RECEIVER_DATABASE__URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("form", ["userinfo", "query-password", "socket-host-in-query"])
def test_check_config_prints_no_password(tmp_path: Path, form: str) -> None:
    done = check_config(tmp_path, READABLE[form])
    assert done.returncode == 0, done.stderr
    assert not leaks(done.stdout + done.stderr)
    assert MASK in orjson.loads(done.stdout)["database"]["url"]


@pytest.mark.parametrize("form", ["unencoded-slash", "unencoded-hash", "unencoded-at"])
def test_check_config_refuses_an_unreadable_url_without_echoing_it(
    tmp_path: Path, form: str
) -> None:
    done = check_config(tmp_path, UNREADABLE[form])
    assert done.returncode == 2
    assert "percent-encoded" in done.stderr
    assert not leaks(done.stdout + done.stderr)


SHOWN_PASSWORD = "the database password is also part of a name the log shows"


def test_a_password_that_is_also_a_name_is_masked_in_urls_and_named_in_a_warning(
    tmp_path: Path,
) -> None:
    # the docker-compose default: user, password, database and schema are all `flespi`
    done = check_config(tmp_path, "postgresql://flespi:flespi@db.example.com:5432/flespi")
    assert done.returncode == 0, done.stderr
    shown = orjson.loads(done.stdout)
    # the names stay readable; only the URL's password is masked
    assert shown["database"]["url"] == f"postgresql://flespi:{MASK}@db.example.com:5432/flespi"
    assert shown["database"]["schema"] == "flespi"
    assert shown["streams"][0]["path"] == "/flespi"
    assert SHOWN_PASSWORD in done.stderr
    # a password found in no name is masked wherever it appears, without a warning, also
    # where the URL repeats it in a parameter that is no password
    again = f"{READABLE['userinfo']}?application_name={SECRET}&options=-c%20x%3D{SECRET}"
    done = check_config(tmp_path, again)
    assert done.returncode == 0, done.stderr
    assert SHOWN_PASSWORD not in done.stderr
    assert not leaks(done.stdout + done.stderr)


def with_password_in_query(url: str) -> tuple[str, str]:
    """The test database's URL with its password moved into ?password=, and that password."""
    parts = urlsplit(url)
    assert parts.password
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    query = f"password={parts.password}"
    return urlunsplit(parts._replace(netloc=netloc, query=query)), parts.password


BAD_LINES = {
    "nul": b"Authorization: " + TOKEN.encode() + b"\x00\r\n",
    "bare-cr": b"Authorization: " + TOKEN.encode() + b"\rX-Other: 1\r\n",
    "vertical-tab": b"Authorization: " + TOKEN.encode() + b"\x0b\r\n",
    "obs-fold": b"Authorization: " + TOKEN.encode() + b"\r\n x\r\n",
    "bare-lf": b"X-First: 1\nAuthorization: " + TOKEN.encode() + b"\x7f\r\n",
}


async def test_no_secret_in_the_log_and_every_line_is_json(
    tmp_path: Path, database_url: str
) -> None:
    url, password = with_password_in_query(database_url)
    port = free_port()
    config = config_file(tmp_path, url, port)
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        for line in BAD_LINES.values():
            raw = socket.create_connection(("127.0.0.1", port))
            raw.settimeout(5)
            raw.sendall(
                b"POST /flespi HTTP/1.1\r\nHost: x\r\n" + line + b"Content-Length: 2\r\n\r\n[]"
            )
            reply = await asyncio.to_thread(raw.recv, 65536)
            raw.close()
            assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.0 400"), reply
        # bytes after a body reach the HTTP parser, whose error would quote them: not repeated
        # (sent with the request in one write, so that they arrive with it: bytes that come
        # only after a reply that closes the connection are never parsed, nor logged)
        raw = socket.create_connection(("127.0.0.1", port))
        raw.settimeout(5)
        request = b"POST /flespi HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"
        raw.sendall(request + b"\x01" * 200_000)
        await asyncio.to_thread(raw.recv, 65536)
        raw.close()
        process.terminate()
        assert process.wait(20) == 0
    text = log_of(config).read_text()
    events = [orjson.loads(line) for line in text.splitlines()]  # each line is one JSON object
    assert max(len(line) for line in text.splitlines()) < 20_000
    assert any(e["event"] == "serving" for e in events)
    # each malformed request, and the bytes after a body, are a `batch` line of 400
    refused = [e for e in events if e["event"] == "batch" and e["status"] == 400]
    assert len(refused) == len(BAD_LINES) + 1
    token = TOKEN.split(" ", 1)[1]
    assert token not in text
    serving = next(e for e in events if e["event"] == "serving")
    assert f"password={MASK}" in serving["database"]
    if password in serving["database"].replace(f"password={MASK}", ""):
        # a password that is also the user's name (postgres:postgres) can't be told apart
        # from that name in the text: it is masked in URLs, and a warning says so
        assert any(e["event"].startswith(SHOWN_PASSWORD) for e in events)
    else:
        assert password not in text
