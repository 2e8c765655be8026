"""Where settings come from: the TOML file and `FLESPI_RECEIVER_*` environment variables.

Each key is traced to its source, so that an error names the variable, or the file and key,
that holds the bad value, and says what was expected.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError

from flespi_receiver.errors import ConfigError

ENV_PREFIX = "FLESPI_RECEIVER_"
NESTED = "__"
# what a variable holding a list or a table looks like, by key
EXAMPLES = {
    "allowed_networks": '["10.0.0.0/8"]',
    "trusted_proxies": '["10.0.0.0/8"]',
    "authorization": '["Bearer <token>"]',
    "streams": '[{"name": "main", "path": "/flespi", "authorization": ["Bearer <token>"]}]',
    "columns": '[{"name": "speed", "parameter": "position.speed", "type": "bigint"}]',
}

Location = tuple[str, ...]
# FLESPI_RECEIVER_* variables that are not settings: the config file's path, the tests' database
NOT_SETTINGS = frozenset({"FLESPI_RECEIVER_CONFIG", "FLESPI_RECEIVER_TEST_DATABASE_URL"})


@dataclass
class Overrides:
    """Settings from the environment as nested data, and the variable behind each key."""

    data: dict[str, Any] = field(default_factory=dict)
    variables: dict[Location, str] = field(default_factory=dict)


def _field(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    """The field of `model` named or aliased `key`: its name in the data, and its type."""
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.alias or name, info.annotation
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_structured(annotation: Any) -> bool:
    return get_origin(annotation) in (list, dict) or _is_model(annotation)


def _json(variable: str, key: str, value: str, annotation: Any) -> Any:
    expected = "a JSON object" if _is_model(annotation) else "a JSON list"
    example = EXAMPLES.get(key)
    like = f", like {example}" if example else ""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ConfigError(
            f"environment variable {variable}: expected {expected}{like}; not valid JSON ({exc})"
        ) from None
    if not isinstance(parsed, dict if _is_model(annotation) else list):
        # the value itself is not repeated: it may hold a secret
        kinds: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
        got = kinds.get(type(parsed), "a value")
        raise ConfigError(f"environment variable {variable}: expected {expected}{like}; got {got}")
    return parsed


def _suggestion(variable: str, model: type[BaseModel]) -> str:
    """ "; did you mean X?" with the closest variable name that sets something, or ""."""
    names = []
    for name, info in model.model_fields.items():
        names.append(name.upper())
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names += [f"{name.upper()}{NESTED}{inner.upper()}" for inner in section.model_fields]
    wrong = variable.upper().removeprefix(ENV_PREFIX)
    close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.75)
    hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
    return hint + f" (a key inside a section is {ENV_PREFIX}<SECTION>{NESTED}<KEY>)"


def read_environment(environ: Mapping[str, str], model: type[BaseModel]) -> Overrides:
    """`FLESPI_RECEIVER_<SECTION>__<KEY>` (or `FLESPI_RECEIVER_<KEY>` for a whole list or
    section, as JSON) into nested data; NOT_SETTINGS are left alone. Raises ConfigError for
    a list that is not JSON, a variable naming an unknown section, or any other variable
    that sets nothing (a misspelling), with the closest name that does."""
    found = Overrides()
    for variable in sorted(environ):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        value = environ[variable]
        path = variable[len(ENV_PREFIX) :].lower().split(NESTED)
        top = _field(model, path[0])
        if top is None:
            if variable.upper() in NOT_SETTINGS:
                continue
            if len(path) > 1:
                sections = ", ".join(
                    n for n, i in model.model_fields.items() if _is_model(i.annotation)
                )
                raise ConfigError(
                    f"environment variable {variable}: unknown section {path[0]!r} "
                    f"(the sections are {sections})"
                )
            raise ConfigError(
                f"environment variable {variable} sets nothing{_suggestion(variable, model)}"
            )
        name, annotation = top
        if len(path) == 1:
            parsed = (
                _json(variable, name, value, annotation) if _is_structured(annotation) else value
            )
            found.data[name] = parsed
            found.variables[(name,)] = variable
            continue
        if not _is_model(annotation):
            raise ConfigError(
                f"environment variable {variable}: {name} is set whole, as "
                f"{ENV_PREFIX}{name.upper()} holding a JSON list, like "
                f"{EXAMPLES.get(name, '[...]')}"
            )
        key = NESTED.join(path[1:])
        inner = _field(annotation, key)
        if inner is None:
            # left in the data: validation reports it as unknown, naming this variable
            found.data.setdefault(name, {})[key] = value
            found.variables[(name, key)] = variable
            continue
        key, inner_type = inner
        parsed = _json(variable, key, value, inner_type) if _is_structured(inner_type) else value
        found.data.setdefault(name, {})[key] = parsed
        found.variables[(name, key)] = variable
    return found


def merge(file_data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """The file's data with the environment's keys on top (a list is replaced whole)."""
    merged = dict(file_data)
    for key, value in overrides.data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _source(loc: Location, path: Path, overrides: Overrides) -> str:
    for end in range(len(loc), 0, -1):
        variable = overrides.variables.get(loc[:end])
        if variable is not None:
            return f"environment variable {variable}"
    return str(path)


def describe(error: ValidationError, path: Path, overrides: Overrides) -> str:
    """One line per error: where the value came from, the key, what is wrong or expected."""
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not loc:
            # a check across a list ("two streams have the same path"): the list it names
            lists = {"streams": ("streams",), "[[columns]]": ("columns",)}
            loc = next((at for word, at in lists.items() if word in message), loc)
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config.example.toml)"
        elif item["type"] == "missing":
            message = "is required"
        elif item["type"] in ("list_type", "dict_type", "model_type"):
            example = EXAMPLES.get(loc[-1])
            message += f", like {example}" if example else ""
        lines.append(f"  {_source(loc, path, overrides)}: {key}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)
