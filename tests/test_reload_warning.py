"""SIGHUP names each changed setting that only a restart applies, and then applies nothing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from flespi_receiver.config_diff import settings_needing_restart
from flespi_receiver.embedded import free_port

from conftest import SettingsFactory
from helpers import config_file, log_events, receiver_process, wait_until_serving


async def test_sighup_warns_about_settings_it_cannot_apply(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    original = config.read_text()
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        changed = original.replace(f"port = {port}", f"port = {free_port()}")
        changed = changed.replace("acquire_timeout = 2", "acquire_timeout = 3")
        changed = changed.replace('"Bearer test-token"]', '"Bearer test-token", "Bearer new"]')
        config.write_text(changed)
        process.send_signal(signal.SIGHUP)
        for _ in range(100):
            refusals = [e for e in log_events(config) if e.get("level") == "error"]
            if refusals:
                break
            await asyncio.sleep(0.05)
        await wait_until_serving(port, process)  # still on the old port
        # all or nothing: the new token, reloadable on its own, is not applied either
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/flespi",
                data=b"[]",
                headers={"Authorization": "Bearer new"},
            ) as reply,
        ):
            assert reply.status == 401
    (refusal,) = refusals
    assert refusal["event"] == "reload refused: the old configuration stays"
    assert "database.acquire_timeout, server.port" in refusal["error"]


def test_what_needs_a_restart(make_settings: SettingsFactory) -> None:
    base = make_settings()
    assert settings_needing_restart(base, make_settings()) == []
    rotated = make_settings(
        streams='[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer x"]\n'
        'allowed_networks = ["10.0.0.0/8"]\n'
    )
    assert settings_needing_restart(base, rotated) == []
    moved = make_settings(
        streams='[[streams]]\nname = "main"\npath = "/moved"\nauthorization = ["Bearer x"]\n'
        '[[streams]]\nname = "b"\npath = "/b"\nauthorization = ["Bearer x"]\n',
        extra="host = '0.0.0.0'",
        database='notify_channel = ""',
    )
    assert settings_needing_restart(base, moved) == [
        "database.notify_channel",
        "server.host",
        "streams (added: b)",
        "streams[main].path",
    ]
