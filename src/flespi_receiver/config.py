"""Settings: a TOML file, overridden key by key from `FLESPI_RECEIVER_*` environment variables."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flespi_receiver.config_sources import ENV_PREFIX, describe, merge, read_environment
from flespi_receiver.database_url import database_passwords, mask_database_url, parse_database_url
from flespi_receiver.errors import ConfigError
from flespi_receiver.fields import MESSAGE_COLUMNS, MessageFields, names_in
from flespi_receiver.identity import Identity

CONFIG_ENV = "FLESPI_RECEIVER_CONFIG"
DEFAULT_CONFIG = Path("config.toml")
MASK = "********"
MESSAGE_COLUMN_NAMES = frozenset({"id", "received_at", *MESSAGE_COLUMNS})


def _identifier(value: str) -> str:
    # the schema name is written into SQL as an identifier, so keep it to a safe alphabet
    if not value.replace("_", "a").isalnum() or not value.isascii() or value[0].isdigit():
        raise ValueError("must be letters, digits and underscores, not starting with a digit")
    if len(value) > 63:
        raise ValueError("must be at most 63 characters (PostgreSQL's identifier limit)")
    return value.lower()


def _channel(value: str) -> str:
    if value and not (value.replace("_", "a").isalnum() and value.isascii() and len(value) < 64):
        raise ValueError("must be letters, digits and underscores (or empty for no NOTIFY)")
    return value


def _postgres_url(value: str) -> str:
    if value:
        parse_database_url(value)  # its errors never quote the URL
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_size: int = Field(64 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(60.0, gt=0)
    # bytes per second a body must keep up after its first MIN_RATE_GRACE seconds; 0 = off
    min_body_rate: int = Field(8192, ge=0)
    # bodies received or stored at the same time; more wait (acquire_timeout, then 503)
    bodies_in_flight: int = Field(4, ge=1, le=1000)
    # request line plus headers: at most this many bytes (431), within this many seconds (408)
    max_header_size: int = Field(8192, ge=2048, le=1048576)
    header_timeout: float = Field(10.0, gt=0)
    # an idle kept-alive connection is closed after this many seconds
    keepalive_timeout: float = Field(75.0, gt=0)
    shutdown_timeout: float = Field(30.0, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)
    # which header a trusted proxy reports the client in; the other one is ignored
    client_address_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    auth_failures_per_minute: int = Field(20, ge=0)

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} not found")
        return value

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        return self


class MetricsSettings(_Section):
    enabled: bool = True
    # port 0: /metrics is served on the main server; otherwise on host:port of its own
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)


class DatabaseSettings(_Section):
    url: Annotated[
        SecretStr, AfterValidator(lambda s: SecretStr(_postgres_url(s.get_secret_value())))
    ] = SecretStr("")
    data_dir: Path = Path(".data/postgres")
    schema_name: Annotated[str, AfterValidator(_identifier)] = Field("flespi", alias="schema")
    pool_size: int = Field(4, ge=1, le=100)
    acquire_timeout: float = Field(10.0, gt=0)
    command_timeout: float = Field(60.0, gt=0)
    device_state: bool = True
    device_state_merge: bool = False
    notify_channel: Annotated[str, AfterValidator(_channel)] = "flespi_messages"


class FieldNamesSettings(_Section):
    """The parameter names of the known fields in a stream's messages. flespi's
    convert_message can rename them (position_latitude, PositionLatitude) or keep only some:
    the notation gives all names, a name set here wins for its column."""

    notation: Literal["dotted", "underscore", "pascal"] = "dotted"
    ident: str | None = Field(None, min_length=1)
    ts: str | None = Field(None, min_length=1)
    server_ts: str | None = Field(None, min_length=1)
    channel_id: str | None = Field(None, min_length=1)
    device_id: str | None = Field(None, min_length=1)
    latitude: str | None = Field(None, min_length=1)
    longitude: str | None = Field(None, min_length=1)

    def in_effect(self) -> dict[str, str]:
        """Column -> the parameter it is read from."""
        return names_in(self.notation, self.model_dump(exclude={"notation"}))


class StreamSettings(_Section):
    name: str = Field(min_length=1, max_length=200)
    path: str
    authorization: list[SecretStr] = Field(default_factory=list)
    allow_anonymous: bool = False
    on_invalid: Literal["quarantine", "reject"] = "quarantine"
    fields: FieldNamesSettings = FieldNamesSettings()
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    # what makes two messages one: their text as sent (the fastest), or their content however
    # spelled (identity.py; `flespi-receiver backfill` needs it)
    identity: Identity = "text"

    def message_fields(self, *, keep_keys: bool = False) -> MessageFields:
        """How this stream's messages are read; build it once per stream and keep it.
        `keep_keys`: merge mode's (MessageFields)."""
        return MessageFields(
            self.fields.in_effect(),
            content_identity=self.identity == "content",
            keep_keys=keep_keys,
        )

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in "{}?# "):
            raise ValueError("must be an absolute URI path such as /flespi, without {}?# or spaces")
        return value

    @field_validator("authorization")
    @classmethod
    def _non_empty_values(cls, values: list[SecretStr]) -> list[SecretStr]:
        if any(not v.get_secret_value().strip() for v in values):
            raise ValueError("values must not be empty")
        return values

    @model_validator(mode="after")
    def _credentials_or_explicit_anonymous(self) -> StreamSettings:
        if not self.authorization and not self.allow_anonymous:
            raise ValueError(
                f"stream {self.name!r} has no authorization values; add the Authorization header "
                'value flespi sends (authorization = ["Bearer <token>"]) or set '
                "allow_anonymous = true"
            )
        return self


class ColumnSettings(_Section):
    """One message parameter exposed as a typed column of the messages_typed view."""

    name: Annotated[str, AfterValidator(_identifier)]
    parameter: str = Field(min_length=1, max_length=1000)
    type: Literal["text", "bigint", "double precision", "boolean", "timestamptz"]
    index: bool = False

    @field_validator("name")
    @classmethod
    def _not_a_messages_column(cls, value: str) -> str:
        if value in MESSAGE_COLUMN_NAMES:
            raise ValueError(f"{value!r} is already a column of messages")
        return value


class PartitioningSettings(_Section):
    """Native time partitioning of messages by partition_ts."""

    interval: Literal["none", "day", "week", "month"] = "none"
    ahead: int = Field(3, ge=1, le=366)
    # drop partitions whose whole range is older than this, e.g. "90 days"; "" keeps all
    retention: str = ""

    @field_validator("retention")
    @classmethod
    def _interval(cls, value: str) -> str:
        if value and not re.fullmatch(r"\d+ (day|week|month|year)s?", value.strip()):
            raise ValueError('must be like "90 days", "12 weeks", "6 months" or "1 year"')
        return value.strip()


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """All receiver settings; build with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    columns: list[ColumnSettings] = Field(default_factory=list)
    partitioning: PartitioningSettings = PartitioningSettings()
    streams: list[StreamSettings] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges the environment over the file itself, knowing each key's source
        return (init_settings,)

    @model_validator(mode="after")
    def _unique_columns(self) -> Settings:
        names = [c.name for c in self.columns]
        if len(names) != len(set(names)):
            raise ValueError("two [[columns]] have the same name")
        return self

    @model_validator(mode="after")
    def _unique_streams(self) -> Settings:
        for attr in ("path", "name"):
            seen: set[str] = set()
            for stream in self.streams:
                value = getattr(stream, attr)
                if value in seen:
                    raise ValueError(f"two streams have the same {attr} {value!r}")
                seen.add(value)
        return self


def config_path(cli_path: str | None) -> Path:
    """The config file: --config, else $FLESPI_RECEIVER_CONFIG, else ./config.toml."""
    return Path(cli_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _read_config_file(path: Path) -> str:
    """The file's text; ConfigError when anyone may write it or it changes while being read."""
    before = path.stat()
    if before.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"{path} is writable by every user of this host, and it holds credentials; "
            f"make it private: chmod o-w {path}"
        )
    data = path.read_bytes()
    after = path.stat()
    if (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size) or len(
        data
    ) != after.st_size:
        raise ConfigError(
            f"{path} changed while it was read (still being written?); write the new file "
            "next to it and rename it into place, then reload again"
        )
    return data.decode("utf-8")


def load_settings(path: Path) -> Settings:
    """Read the TOML file (if it exists) and the `FLESPI_RECEIVER_*` environment over it;
    raise ConfigError naming the variable, or the file and key, of each bad value."""
    overrides = read_environment(os.environ, Settings)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            text = _read_config_file(path)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(
                f"config file {path} cannot be read ({exc.strerror}); pass --config with the "
                "path of a readable TOML file"
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif not overrides.data:
        raise ConfigError(
            f"config file {path} not found; pass --config PATH, set {CONFIG_ENV}, "
            "or copy config.example.toml to config.toml"
        )
    try:
        return Settings(**merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(describe(exc, path, overrides)) from None


def mask_url(url: str) -> str:
    """The URL with every password masked (`mask_database_url`), fit for logs and output."""
    return mask_database_url(url)


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold: the streams' authorization values, the database
    passwords; for `REDACTOR`, which keeps them out of the log wherever they appear.

    A database password that is part of a name the receiver shows (`names_shown`: the user
    `flespi` with the password `flespi`) is left out: masking it would mask that name in every
    line, and the log shows it anyway; `passwords_shown` names it for a warning. It is still
    masked inside every database URL (`mask_url`)."""
    tokens = [v.get_secret_value() for s in settings.streams for v in s.authorization]
    shown = set(passwords_shown(settings))
    passwords = database_passwords(settings.database.url.get_secret_value())
    return tokens + [p for p in passwords if p not in shown]


def names_shown(settings: Settings) -> list[str]:
    """Names the log and `check-config` show that are no secret: the database URL's user,
    hosts and database, the schema, the NOTIFY channel, the streams' names and paths."""
    database = settings.database
    streams = [part for s in settings.streams for part in (s.name, s.path)]
    try:
        url = parse_database_url(database.url.get_secret_value())
        names = [unquote(url.user), url.hosts, unquote(url.path)]
    except ValueError:  # no URL (the embedded server), or one the settings refused
        names = []
    return [*names, database.schema_name, database.notify_channel, *streams]


def passwords_shown(settings: Settings) -> list[str]:
    """The database passwords that are part of a name the receiver shows (`names_shown`)."""
    shown = names_shown(settings)
    passwords = database_passwords(settings.database.url.get_secret_value())
    return [p for p in passwords if any(p in name for name in shown)]


def masked_view(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, with every secret masked."""
    view = settings.model_dump(mode="json", by_alias=True)
    view["database"]["url"] = mask_url(settings.database.url.get_secret_value())
    for stream, settings_of_stream in zip(view["streams"], settings.streams, strict=True):
        stream["fields"]["in_effect"] = settings_of_stream.fields.in_effect()
        stream["authorization"] = [MASK for _ in stream["authorization"]]
    return view
