"""Configuration errors from the environment name the variable and say what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flespi_receiver.config import load_settings
from flespi_receiver.errors import ConfigError

from helpers import VALID_CONFIG as VALID


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flespi_receiver", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "FLESPI_RECEIVER_STREAMS",
            '[{"name":"a"',
            "environment variable FLESPI_RECEIVER_STREAMS: expected a JSON list, like "
            '[{"name": "main"',
        ),
        (
            "FLESPI_RECEIVER_SERVER__ALLOWED_NETWORKS",
            "10.0.0.0/8",
            "environment variable FLESPI_RECEIVER_SERVER__ALLOWED_NETWORKS: expected a JSON "
            'list, like ["10.0.0.0/8"]',
        ),
        (
            "FLESPI_RECEIVER_SERVER__PROT",
            "1",
            "environment variable FLESPI_RECEIVER_SERVER__PROT: server.prot: unknown key",
        ),
        (
            "FLESPI_RECEIVER_SERVER__PORT",
            "eighty",
            "environment variable FLESPI_RECEIVER_SERVER__PORT: server.port: Input should be "
            "a valid integer",
        ),
        (
            "FLESPI_RECEIVER_SERVR__PORT",
            "1",
            "environment variable FLESPI_RECEIVER_SERVR__PORT: unknown section 'servr'",
        ),
        (
            "FLESPI_RECEIVER_STREAMS",
            '[{"name": "a", "path": "/a"}]',
            "environment variable FLESPI_RECEIVER_STREAMS: streams.0: stream 'a' has no "
            "authorization values",
        ),
        (
            "FLESPI_RECEIVER_STREAMS",
            '{"name": "a"}',
            "environment variable FLESPI_RECEIVER_STREAMS: expected a JSON list, like "
            '[{"name": "main", "path": "/flespi", "authorization": ["Bearer <token>"]}]; got '
            "an object",
        ),
        (
            "FLESPI_RECEIVER_STREAMS",
            '[{"name": "a", "path": "/flespi", "allow_anonymous": true},'
            ' {"name": "b", "path": "/flespi", "allow_anonymous": true}]',
            "environment variable FLESPI_RECEIVER_STREAMS: streams: two streams have the same "
            "path '/flespi'",
        ),
        (
            "FLESPI_RECEIVER_SERVER_PORT",
            "1",
            "environment variable FLESPI_RECEIVER_SERVER_PORT sets nothing; did you mean "
            "FLESPI_RECEIVER_SERVER__PORT?",
        ),
        (
            "FLESPI_RECEIVER_STREAM",
            "[]",
            "environment variable FLESPI_RECEIVER_STREAM sets nothing; did you mean "
            "FLESPI_RECEIVER_STREAMS?",
        ),
        (
            "FLESPI_RECEIVER_BOGUS",
            "1",
            "environment variable FLESPI_RECEIVER_BOGUS sets nothing (a key inside a section is "
            "FLESPI_RECEIVER_<SECTION>__<KEY>)",
        ),
    ],
    ids=[
        "broken-json",
        "list-not-json",
        "unknown-key",
        "bad-type",
        "unknown-section",
        "invalid-stream",
        "object-not-list",
        "same-path-in-the-environment",
        "single-underscore",
        "misspelled-list",
        "sets-nothing",
    ],
)
def test_environment_errors_name_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(VALID)
    result = check_config(path, **{variable: value})
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}:" not in result.stderr  # the file is not to blame


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(VALID + "\n[server]\nprot = 1\n")
    result = check_config(path, FLESPI_RECEIVER_SERVER__PORT="eighty")
    assert result.returncode == 2
    assert f"{path}: server.prot: unknown key" in result.stderr
    assert "FLESPI_RECEIVER_SERVER__PORT: server.port" in result.stderr


def test_lists_from_the_environment_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(VALID)
    monkeypatch.setenv("FLESPI_RECEIVER_SERVER__ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    monkeypatch.setenv("FLESPI_RECEIVER_DATABASE__SCHEMA", "other")
    monkeypatch.setenv("FLESPI_RECEIVER_LOG", '{"level": "debug"}')
    settings = load_settings(path)
    assert [str(n) for n in settings.server.allowed_networks] == ["10.0.0.0/8"]
    assert settings.database.schema_name == "other"
    assert settings.log.level == "debug"


def test_variables_that_are_not_settings_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(VALID)
    monkeypatch.setenv("FLESPI_RECEIVER_CONFIG", str(path))
    monkeypatch.setenv("FLESPI_RECEIVER_TEST_DATABASE_URL", "postgresql://x@y/z")
    assert load_settings(path).streams[0].name == "main"
    with pytest.raises(ConfigError, match=r"config file .* not found"):
        load_settings(tmp_path / "absent.toml")
