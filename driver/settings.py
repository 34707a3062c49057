"""Every setting of the daemon in one pydantic-settings object, built once at
start. Precedence: flags > env `QPI_*` (and the legacy QPI names) > TOML > defaults."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from frontends.qpi.tls import normalise

_config_file: ContextVar[Path | None] = ContextVar("qpi_config_file", default=None)
# `config check` outside systemd: the token is the unit's credential, absent in a shell.
_token_elsewhere: ContextVar[bool] = ContextVar("qpi_token_elsewhere", default=False)

# Names QPI deployments already use that differ from `QPI_<FIELD>`: pydantic aliases.
LEGACY_ENV = {"QPI_ADDR": "orchestrator_url"}
CREDENTIAL_NAME = "qpi-access-token"


def _default_data_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "qpi-driver"


class Settings(BaseSettings):
    """The daemon's configuration. Field `x` is flag `--x`, env `QPI_X`, TOML key `x`."""

    model_config = SettingsConfigDict(
        env_prefix="QPI_",
        extra="forbid",
        validate_default=True,
        env_nested_delimiter=None,
        populate_by_name=True,  # flags and TOML keys are the field names
    )

    # Orchestrator and identity
    orchestrator_url: str | None = Field(
        None, description="orchestrator base URL (env QPI_ADDR); unset = embedded local one",
        # An alias drops the prefix: both names of the variable are spelt out.
        validation_alias=AliasChoices("QPI_ORCHESTRATOR_URL", *(
            name for name, field in LEGACY_ENV.items() if field == "orchestrator_url")),
    )
    access_token: SecretStr | None = Field(None, description="access token from the orchestrator")
    access_token_file: Path | None = Field(
        None, description="file holding the token (systemd LoadCredential=)"
    )
    ca_fingerprint: str | None = Field(None, description="SHA-256 of the orchestrator root CA")
    driver_name: str = Field(default_factory=socket.gethostname, description="this node's name")
    insecure_tcp: bool = Field(False, description="plain tcp:// NNG, development only")
    wire_format: Literal["msgpack", "json"] = Field("msgpack", description="preferred codec")
    connect_timeout_s: float = Field(10.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0, description="cap of the reconnect backoff")
    disabled_retry_s: float = Field(5.0, gt=0, description="retry period while disabled (403)")
    event_rate_limit: float = Field(
        100.0, ge=0, description="events per second sent to an orchestrator that does not "
        "announce its own limit (QPI's --event-rate-limit, default 100); 0 = no limit"
    )

    # Executor
    executor: str = Field("aer", description="executor name: aer, gpu or an installed plugin")
    executor_options: dict[str, Any] = Field(default_factory=dict)

    # Limits
    max_qubits: int | None = Field(None, gt=0, description="default: what the executor reports")
    max_shots: int = Field(1_000_000, gt=0, description="per circuit")
    max_circuits: int = Field(1_000, gt=0, description="experiments per job")
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_queued_jobs: int = Field(1_000, gt=0)
    max_circuit_bytes: int = Field(1024 * 1024, ge=64, description="OpenQASM text per circuit")
    job_timeout_s: float = Field(3600.0, gt=0, description="per-job cap; jobs may ask for less")
    drain_timeout_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for a job")
    result_retention_s: float = Field(7 * 86400.0, gt=0, description="keep delivered results")
    result_max_rows: int = Field(200_000, gt=0, description="cap of the result store")
    batch_max_jobs: int = Field(64, gt=0, description="queued jobs run together in one call")
    batch_max_seconds: float = Field(
        0.25, gt=0, description="work per batch, by recent run times: what one crash can cost"
    )
    executor_spin_s: float = Field(
        0.002, ge=0, le=0.1, description="after a batch, how long the executor process polls "
        "for the next one instead of sleeping, while jobs come back that soon (a client "
        "sending one job at a time); 0 = never poll"
    )

    # Operations
    data_dir: Path = Field(default_factory=_default_data_dir)
    log_format: Literal["console", "json", "logfmt"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_addr: str | None = Field("127.0.0.1:9464", description="host:port; empty = off")
    heartbeat_interval: float = Field(10.0, gt=0, description="seconds between heartbeats")
    calibration_interval_s: float = Field(300.0, gt=0, description="calibration refresh period")

    # Front ends: the orchestrators this node serves (driver/core.py FRONTENDS)
    frontends: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["qpi"],
        description="front ends to serve, comma-separated: qpi, qcos (or module:Class)")
    qcos_endpoint: str = Field("tcp://127.0.0.1:7610",
                               description="QCOS front end: the ROUTER QCOS's driver connects to")
    qcos_events: str = Field("tcp://127.0.0.1:7611",
                             description="QCOS front end: the PUB socket for its events")
    qcos_device_id: str = Field("qpi-node", min_length=1,
                                description="QCOS device id (QCOS's driver names the same)")

    # Embedded orchestrator (local mode)
    local_host: str = "127.0.0.1"
    local_port: int = Field(8090, ge=0, le=65535)

    @field_validator("frontends", mode="before")
    @classmethod
    def _frontends(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            names = list(dict.fromkeys(str(v).strip() for v in value if str(v).strip()))
            if not names:
                raise ValueError("name at least one front end: qpi, qcos")
            for name in names:
                if name not in ("qpi", "qcos") and ":" not in name:
                    raise ValueError(f"unknown front end {name!r}; known: qpi, qcos "
                                     "(or module:Class)")
            return names
        return value

    @field_validator("qcos_endpoint", "qcos_events")
    @classmethod
    def _zmq_endpoint(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"must be a ZeroMQ endpoint (tcp://host:port or ipc://path), "
                             f"got {value!r}")
        return value

    @field_validator("ca_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        cleaned = normalise(value)
        if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
            raise ValueError("must be a SHA-256 fingerprint: 64 hex digits, ':' separators allowed")
        return cleaned

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if not value:
            return None
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be host:port, got {value!r}")
        return value

    @field_validator("orchestrator_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _token_from_file(self) -> Settings:
        if self.access_token is None:
            path = self.access_token_file
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if path is None and creds and (Path(creds) / CREDENTIAL_NAME).is_file():
                path = Path(creds) / CREDENTIAL_NAME
            if path is not None:
                try:
                    token = path.read_text().strip()
                except OSError as exc:
                    raise ValueError(
                        f"access_token_file {str(path)!r} cannot be read: {exc.strerror}"
                    ) from None
                if not token:
                    raise ValueError(f"access_token_file {str(path)!r} is empty")
                self.access_token = SecretStr(token)
        if self.orchestrator_url is None and "qpi" in self.frontends and len(self.frontends) > 1:
            raise ValueError(
                "orchestrator_url is required to serve QPI beside another front end (the "
                "embedded stand-in is for a node that serves QPI alone); set QPI_ADDR, or "
                "drop qpi from frontends")
        if self.orchestrator_url is not None:
            if self.access_token is None and not _token_elsewhere.get():
                raise ValueError(
                    "access_token is required with an orchestrator_url; set QPI_ACCESS_TOKEN "
                    "or access_token_file"
                )
            if self.ca_fingerprint is None and not self.insecure_tcp:
                raise ValueError(
                    "ca_fingerprint is required to pin the orchestrator's root CA; set "
                    "QPI_CA_FINGERPRINT (or insecure_tcp=true for development only)"
                )
        return self

    @property
    def local_mode(self) -> bool:
        """QPI without an orchestrator: the embedded stand-in serves as one. A node that
        serves only other orchestrators (QCOS) starts none."""
        return self.orchestrator_url is None and "qpi" in self.frontends

    def token_file_warning(self) -> str | None:
        """A warning when the token file can be read by other users."""
        path = self.access_token_file
        if path is None or not path.exists():
            return None
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            return f"access_token_file {path} is readable by other users; chmod 600 it"
        return None

    def cleartext_token_warning(self) -> str | None:
        """A warning when the token would cross the network unencrypted: http:// to a
        host that is not this machine."""
        url = self.orchestrator_url
        if url is None or not url.startswith("http://"):
            return None
        host = urlsplit(url).hostname or ""
        if is_loopback(host):
            return None
        return (f"orchestrator_url {url} is http:// to another host: the access token is sent "
                "over the network in clear text, where anyone on the path can read it and "
                "impersonate this driver; use https://")

    def masked(self) -> dict[str, Any]:
        """The effective settings for display, secrets masked."""
        data = self.model_dump(mode="json")
        if data.get("access_token"):
            data["access_token"] = "********"
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return tuple(_sources(settings_cls, init_settings, _config_file.get()).values())


def _sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    config_file: Path | None,
) -> dict[str, PydanticBaseSettingsSource]:
    """Sources by the description a person reads in an error, highest first."""
    sources: dict[str, PydanticBaseSettingsSource] = {
        "flag": init_settings,
        "environment": EnvSettingsSource(settings_cls, case_sensitive=False, env_prefix="QPI_"),
    }
    if config_file is not None:
        sources[f"config file {config_file}"] = TomlConfigSettingsSource(
            settings_cls, toml_file=config_file
        )
    return sources


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """An invalid setting: one message naming the key and where it came from."""


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    token_elsewhere: bool = False,
) -> Settings:
    """Build the settings from flags, environment and an optional TOML file.
    `token_elsewhere`: a missing access token is not an error (it comes from systemd's
    credential at start); the settings then have access_token None."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    elsewhere = _token_elsewhere.set(token_elsewhere)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, flags, config_file)) from None
    except (OSError, ValueError) as exc:  # TOML syntax errors surface as ValueError
        raise ConfigError(f"cannot read configuration: {exc}") from None
    finally:
        _config_file.reset(token)
        _token_elsewhere.reset(elsewhere)


def origins(settings: Settings, config_file: Path | None) -> dict[str, str]:
    """Where each setting that is not a default came from: flag, environment, file."""
    return {key: _origin(key, {}, config_file) for key in sorted(settings.model_fields_set)}


def _explain(exc: ValidationError, flags: Mapping[str, Any], config_file: Path | None) -> str:
    lines = []
    for err in exc.errors():
        if not err["loc"]:
            lines.append("invalid settings: " + err["msg"].removeprefix("Value error, "))
            continue
        key = _field_of(str(err["loc"][0]))
        origin = _origin(key, flags, config_file)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"invalid setting {key!r} (from {origin}): {msg}")
    return "; ".join(lines)


def _field_of(name: str) -> str:
    """The field a validation error names, where it names it by an alias (QPI_ADDR)."""
    if name in Settings.model_fields:
        return name
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and name in alias.choices:
            return field
    return name


def _origin(key: str, flags: Mapping[str, Any], config_file: Path | None) -> str:
    if key in flags:
        return f"flag --{key.replace('_', '-')}"
    env_name = f"QPI_{key.upper()}"
    if any(k.upper() == env_name for k in os.environ):
        return f"environment variable {env_name}"
    for legacy, field in LEGACY_ENV.items():
        if field == key and os.environ.get(legacy):
            return f"environment variable {legacy}"
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeError):
            data = {}
        if key in data:
            return f"config file {config_file}"
    return "defaults and other settings together"
