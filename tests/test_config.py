"""Configuration: the file, the environment over it, and errors that name the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from flespi_receiver.config import load_settings
from flespi_receiver.errors import ConfigError

from helpers import VALID_CONFIG as VALID


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flespi_receiver", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )


def test_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config.example.toml")
    assert settings.streams[0].path == "/flespi"
    assert settings.database.schema_name == "flespi"


def test_environment_overrides_single_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLESPI_RECEIVER_DATABASE__POOL_SIZE", "9")
    monkeypatch.setenv("FLESPI_RECEIVER_SERVER__PORT", "9090")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.database.pool_size == 9
    assert settings.server.port == 9090
    # keys not overridden keep their file values
    assert settings.database.url.get_secret_value().startswith("postgresql://flespi:")


def test_streams_from_the_environment_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "FLESPI_RECEIVER_STREAMS",
        '[{"name": "env", "path": "/in", "authorization": ["Bearer t"]}]',
    )
    settings = load_settings(tmp_path / "absent.toml")
    assert [(s.name, s.path) for s in settings.streams] == [("env", "/in")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID + "\n[server]\nprot = 1\n", "server.prot: unknown key"),
        (VALID + "\n[server]\nport = 'eighty'\n", "server.port: Input should be a valid integer"),
        (VALID.replace("postgresql://", "mysql://"), "database.url: must start with postgresql://"),
        (VALID.replace("5432", "99999"), "database.url: has a port that is not a number"),
        (VALID + '\n[log]\nlevel = "loud"\n', "log.level"),
        (VALID.replace('path = "/flespi"', ""), "streams.0.path: is required"),
        (
            VALID + '\n[[streams]]\nname = "two"\npath = "/flespi"\nauthorization = ["x"]\n',
            "two streams have the same path '/flespi'",
        ),
        (
            VALID.replace('authorization = ["Bearer very-secret-token"]', ""),
            "streams.0: stream 'main' has no authorization values",
        ),
        (
            VALID.replace('path = "/flespi"', 'path = "flespi"'),
            "streams.0.path: must be an absolute",
        ),
        (VALID + '\n[database]\nschema = "x"\n', "not valid TOML"),
        (VALID.replace("[database]", "[database]\nschema = 'x; drop'"), "database.schema: must be"),
        (VALID.split("[[streams]]")[0], "streams: is required"),
        ("this is = not toml [", "not valid TOML"),
    ],
    ids=[
        "unknown-key",
        "bad-type",
        "bad-url-scheme",
        "bad-url-port",
        "bad-level",
        "missing-path",
        "duplicate-path",
        "no-credentials",
        "relative-path",
        "duplicate-table",
        "bad-schema",
        "no-streams",
        "syntax",
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert expected in str(error.value)


def test_anonymous_stream_needs_to_say_so(tmp_path: Path) -> None:
    text = VALID.replace('authorization = ["Bearer very-secret-token"]', "allow_anonymous = true")
    assert load_settings(write(tmp_path, text)).streams[0].allow_anonymous


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, VALID))
    assert result.returncode == 0, result.stderr
    assert "very-secret-token" not in result.stdout + result.stderr
    assert "db-secret" not in result.stdout + result.stderr
    shown = orjson.loads(result.stdout)
    assert shown["database"]["url"] == "postgresql://flespi:********@db.example:5432/flespi"
    assert shown["streams"][0]["authorization"] == ["********"]


def test_check_config_exits_2_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, VALID + "\n[server]\nport = -1\n"))
    assert result.returncode == 2
    assert "server.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_explained(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nowhere.toml")
    assert result.returncode == 2
    assert "nowhere.toml not found" in result.stderr
