"""Arguments a command can't use are usage errors: exit 2, one clear line, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import SCRIPT

ROOT = Path(__file__).parent.parent
CONFIG = str(ROOT / "config.example.toml")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["emulate", "http://127.0.0.1:9/flespi", "--batch-size", "0"], "--batch-size: 0 is out"),
        (["emulate", "notaurl"], "'notaurl' is not an http(s) URL"),
        (["emulate", "http://127.0.0.1:9/flespi", "--count", "-5"], "--count: -5 is out"),
        (["emulate", "http://127.0.0.1:9/flespi", "--resend-rate", "5"], "a share from 0 to 1"),
        (
            ["emulate", "http://127.0.0.1:9/flespi", "--max-attempts", "-1"],
            "--max-attempts: -1 is out",
        ),
        (["rejected", "list", "--limit", "0"], "--limit: 0 is out of range: use 1 or more"),
        (["rejected", "list", "--limit", "-1"], "--limit: -1 is out of range"),
        (["rejected", "show", "99999999999999999999"], "use 1..9223372036854775807"),
        (["check-config", "--config", str(ROOT)], "cannot be read (Is a directory)"),
        (["gaps", "--days", "0"], "--days: 0 is out of range: a number above 0"),
        (
            [
                "backfill",
                "--stream",
                "main",
                "--devices",
                "all",
                "--from",
                "0",
                "--to",
                "1",
                "--page-size",
                "0",
            ],
            "--page-size: 0 is out of range: use 1..100000",
        ),
        (
            [
                "backfill",
                "--stream",
                "main",
                "--devices",
                "all",
                "--from",
                "0",
                "--to",
                "1",
                "--api-url",
                "flespi.io",
            ],
            "'flespi.io' is not an http(s) URL",
        ),
        (
            ["rejected", "export", "--config", CONFIG, "--output", "/nonexistent/dir/x.jsonl"],
            "cannot be written (No such file or directory)",
        ),
    ],
)
def test_an_unusable_argument_is_a_usage_error(argv: list[str], said: str) -> None:
    result = subprocess.run(
        [str(SCRIPT), *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert result.stderr.count(said) == 1  # said once
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
