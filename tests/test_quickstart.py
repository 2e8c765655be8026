"""The README's quick start, walked as written: `make run`, the curl, then the commands."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from flespi_receiver.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).parent.parent
SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def quick_start() -> list[tuple[str, str | None]]:
    """(command, expected output or None) of the sh blocks before "## What we promise"."""
    text = (ROOT / "README.md").read_text().split("## What we promise")[0]
    steps: list[tuple[str, str | None]] = []
    for block in SH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("# ") and steps:
                steps[-1] = (steps[-1][0], line[2:].strip())
            elif line.strip():
                steps.append((line.split("  #")[0].strip(), None))
    return steps


def test_the_quick_start_is_what_this_test_walks() -> None:
    commands = [command.split()[0] for command, _ in quick_start()]
    assert commands[:3] == ["make", "make", "curl"]
    assert all(c == ".venv/bin/flespi-receiver" for c in commands[3:])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """In a folder like a fresh clone (the project's files, its .venv), with one change: the
    port, 8080 in the README, is a free one here so the test runs beside anything."""
    for name in ("Makefile", "pyproject.toml", "config.example.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)  # copy2 keeps the times make compares
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    env = {**os.environ, "FLESPI_RECEIVER_SERVER__PORT": str(port)}
    env.pop("FLESPI_RECEIVER_CONFIG", None)
    steps = quick_start()
    assert steps[0][0] == "make run"
    log = tmp_path / "make-run.log"
    with log.open("wb") as output:  # a file, not a pipe: a full pipe would block the receiver
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, then only polled
            ["make", "run"],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        for command, expected in steps[1:]:
            if command == "make test":
                continue  # this suite is it
            argv = shlex.split(command.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
            result = None
            for _ in range(600):  # the first start runs initdb: wait for the receiver
                result = await asyncio.to_thread(
                    subprocess.run, argv, cwd=tmp_path, env=env, capture_output=True, check=False
                )
                if result.returncode == 0 or argv[0] != "curl":
                    break
                assert server.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            assert result is not None
            assert result.returncode == 0, (command, result.stderr)
            if expected and expected.startswith("{"):
                assert orjson.loads(result.stdout) == orjson.loads(expected), command
            if "SELECT ident, ts, latitude FROM messages" in command:
                assert b"352625333222111" in result.stdout
                assert b"49.07" in result.stdout
            if " status" in command:
                assert re.search(rb"main +1 +1 ", result.stdout), result.stdout
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says
        await asyncio.to_thread(server.wait, 60)
    # ... "stops the receiver and the database cleanly"
    assert EmbeddedPostgres(tmp_path / ".data" / "postgres").postmaster() is None
