"""PostgreSQL connection URLs read the way asyncpg (and libpq) read them, and masked for output.

A URL is split with `urllib.parse` exactly as asyncpg splits it: the user and password are
what comes before the first `@` of the authority, the password after the first `:` of that;
`password` and `sslpassword` may also come as query parameters. Error messages never quote
any part of the URL: a badly written URL may put the password anywhere in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "********"
SCHEMES = ("postgresql", "postgres")
# query parameters whose value is a secret (libpq's and asyncpg's names)
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
EXAMPLE = "postgresql://user:password@host:5432/dbname"


class InvalidDatabaseUrl(ValueError):
    """The URL can't be read as a PostgreSQL URL; the message names the problem, not the URL."""


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """The parts of a URL as written (still percent-encoded), to rebuild it with masks."""

    scheme: str
    user: str  # "" when none
    has_password: bool
    hosts: str  # host[:port][,host[:port]...], "" when given as ?host=
    path: str
    query: list[tuple[str, str]]  # raw name=value pairs, in order

    def masked(self) -> str:
        """The URL with every password replaced by MASK."""
        auth = ""
        if self.user or self.has_password:
            auth = self.user + (f":{MASK}" if self.has_password else "") + "@"
        pairs = [
            f"{name}={MASK}" if _secret(name) else f"{name}={value}" for name, value in self.query
        ]
        query = "?" + "&".join(pairs) if pairs else ""
        return f"{self.scheme}://{auth}{self.hosts}{self.path}{query}"


def parse_database_url(url: str) -> DatabaseUrl:
    """Split `url` as asyncpg does; raise InvalidDatabaseUrl for what asyncpg would misread."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidDatabaseUrl(f"is not a URL; write it as {EXAMPLE}") from None
    if parts.scheme not in SCHEMES:
        raise InvalidDatabaseUrl(f"must start with postgresql:// (for example {EXAMPLE})")
    if "#" in url:
        raise InvalidDatabaseUrl(_encode_hint("#", "%23"))
    auth, at, hosts = parts.netloc.partition("@")
    if not at:
        auth, hosts = "", parts.netloc
    if "@" in hosts:
        raise InvalidDatabaseUrl(_encode_hint("@", "%40"))
    if "@" in parts.path:
        raise InvalidDatabaseUrl(_encode_hint("/", "%2F"))
    user, colon, _ = auth.partition(":")
    raw_pairs = [pair for pair in parts.query.split("&") if pair] if parts.query else []
    try:
        parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidDatabaseUrl(
            "has a query that is not name=value pairs joined by &; percent-encode any ?, & or "
            f"= inside a password (for example {EXAMPLE}?sslmode=require)"
        ) from None
    if not at and "@" in parts.query:
        # `user:pass?word@host`: a ? in the password made the host part the query
        raise InvalidDatabaseUrl(_encode_hint("?", "%3F"))
    query = [(name, value) for name, _, value in (pair.partition("=") for pair in raw_pairs)]
    names = {unquote(name) for name, _ in query}
    if not hosts and "host" not in names:
        raise InvalidDatabaseUrl(f"must name a host ({EXAMPLE}, or ?host=/run/postgresql)")
    for host in hosts.split(",") if hosts else []:
        _check_port(host)
    return DatabaseUrl(parts.scheme, user, bool(colon), hosts, parts.path, query)


def _check_port(host: str) -> None:
    port = host.rsplit("]", 1)[1] if host.startswith("[") else host
    if ":" in port:
        number = port.rsplit(":", 1)[1]
        if number and not (number.isascii() and number.isdigit() and int(number) <= 65535):
            raise InvalidDatabaseUrl(
                "has a port that is not a number from 0 to 65535 (if it is part of the "
                f"password, percent-encode the password's special characters: {EXAMPLE})"
            )


def _encode_hint(character: str, encoded: str) -> str:
    return (
        f"is not readable: a {character!r} in the user name or password must be "
        f"percent-encoded as {encoded} (for example {EXAMPLE})"
    )


def mask_database_url(url: str) -> str:
    """`url` fit for logs and output: passwords masked; a URL that can't be read is hidden."""
    if not url:
        return url
    try:
        return parse_database_url(url).masked()
    except InvalidDatabaseUrl:
        return f"<an unreadable database URL, {MASK}>"


def database_passwords(url: str) -> list[str]:
    """The passwords written in `url` (user info, ?password=, ?sslpassword=), decoded."""
    try:
        parsed = parse_database_url(url)
    except InvalidDatabaseUrl:
        return []
    found = []
    if parsed.has_password:
        auth = urlsplit(url).netloc.partition("@")[0]
        found.append(unquote(auth.partition(":")[2]))
    found += [unquote(v) for n, v in parsed.query if _secret(n)]
    return [p for p in found if p]


def _secret(name: str) -> bool:
    """A query parameter holding a password. libpq and asyncpg read only the lower-case
    names, but `PASSWORD=` is a password a user meant to give: it is masked too."""
    return unquote(name).strip().lower() in SECRET_PARAMETERS
