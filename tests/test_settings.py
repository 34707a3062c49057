"""Settings precedence (flags > env > TOML > defaults), legacy names, and the
one-line error with exit status 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from driver.settings import ConfigError, load_settings
from tests.conftest import ROOT

FP = "ab" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("QPI_") or key in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(key)


def test_precedence_flags_env_toml_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "d.toml"
    toml.write_text('max_shots = 10\nmax_circuits = 20\nmax_queued_jobs = 30\n'
                    '[executor_options]\nseed = 7\n')
    monkeypatch.setenv("QPI_MAX_CIRCUITS", "21")
    monkeypatch.setenv("QPI_MAX_QUEUED_JOBS", "31")
    s = load_settings({"max_queued_jobs": "32"}, toml)
    assert (s.max_shots, s.max_circuits, s.max_queued_jobs) == (10, 21, 32)
    assert s.executor_options == {"seed": 7}
    assert s.job_timeout_s == 3600.0  # default


def test_legacy_qpi_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QPI_ADDR", "http://orch:8090/")
    monkeypatch.setenv("QPI_ACCESS_TOKEN", "zq-secret-77")
    monkeypatch.setenv("QPI_CA_FINGERPRINT", ":".join([FP[i:i + 2] for i in range(0, 64, 2)]))
    monkeypatch.setenv("QPI_DRIVER_NAME", "qpu-7")
    s = load_settings()
    assert s.orchestrator_url == "http://orch:8090" and not s.local_mode
    assert s.ca_fingerprint == FP and s.driver_name == "qpu-7"
    assert s.access_token is not None and s.access_token.get_secret_value() == "zq-secret-77"
    assert "zq-secret-77" not in repr(s) and s.masked()["access_token"] == "********"
    monkeypatch.setenv("QPI_ORCHESTRATOR_URL", "http://new:1")
    assert load_settings().orchestrator_url == "http://new:1"  # the new name wins
    # A flag beats both; an unprefixed ORCHESTRATOR_URL is nobody's name.
    assert load_settings({"orchestrator_url": "http://flag:2"}).orchestrator_url == "http://flag:2"
    monkeypatch.delenv("QPI_ORCHESTRATOR_URL")
    monkeypatch.delenv("QPI_ADDR")
    monkeypatch.setenv("ORCHESTRATOR_URL", "http://stray:3")
    assert load_settings().orchestrator_url is None


def test_a_bad_legacy_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPI_ADDR", "ftp://orch")
    monkeypatch.setenv("QPI_CA_FINGERPRINT", FP)
    with pytest.raises(ConfigError, match=r"'orchestrator_url' \(from environment variable "
                       r"QPI_ADDR\): must start with http"):
        load_settings()


def test_token_from_file_and_credentials_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    token.chmod(0o644)
    s = load_settings({"orchestrator_url": "http://o", "ca_fingerprint": FP,
                       "access_token_file": str(token)})
    assert s.access_token is not None and s.access_token.get_secret_value() == "from-file"
    assert "readable by other users" in (s.token_file_warning() or "")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "qpi-access-token").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings({"orchestrator_url": "http://o", "ca_fingerprint": FP})
    assert s.access_token is not None and s.access_token.get_secret_value() == "from-systemd"


@pytest.mark.parametrize(("source", "expected"), [
    ("flag", "invalid setting 'max_shots' (from flag --max-shots)"),
    ("env", "invalid setting 'max_shots' (from environment variable QPI_MAX_SHOTS)"),
    ("toml", "invalid setting 'max_shots' (from config file"),
])
def test_errors_name_key_and_source(source: str, expected: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    toml = None
    flags = {}
    if source == "flag":
        flags["max_shots"] = "-1"
    elif source == "env":
        monkeypatch.setenv("QPI_MAX_SHOTS", "lots")
    else:
        toml = tmp_path / "bad.toml"
        toml.write_text("max_shots = 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(flags, toml)
    assert expected in str(info.value)


def test_unknown_toml_key_and_missing_token(tmp_path: Path) -> None:
    toml = tmp_path / "x.toml"
    toml.write_text("max_shotz = 3\n")
    with pytest.raises(ConfigError, match=r"'max_shotz'.*unknown setting"):
        load_settings({}, toml)
    with pytest.raises(ConfigError, match="access_token is required"):
        load_settings({"orchestrator_url": "http://o"})


def test_cli_exits_78_on_invalid_setting(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QPI_METRICS_ADDR": "nowhere"}
    proc = subprocess.run([sys.executable, "-m", "driver", "--executor", "aer"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 78
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "metrics_addr" in proc.stderr and "QPI_METRICS_ADDR" in proc.stderr


def test_unknown_executor_is_a_clear_error(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QPI_METRICS_ADDR": ""}
    proc = subprocess.run([sys.executable, "-m", "driver", "--executor", "nope",
                           "--local-port", "0", "--data-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 69
    assert "unknown executor 'nope'" in proc.stderr


def test_misspelt_executor_option_stops_the_daemon_with_the_name(tmp_path: Path) -> None:
    """A typo in an executor option is an error at start, not a default silently kept."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QPI_METRICS_ADDR": ""}
    proc = subprocess.run([sys.executable, "-m", "driver", "--executor", "aer",
                           "--executor-option", "seeed=3", "--local-port", "0",
                           "--data-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "unknown option(s) 'seeed' for executor 'aer'; it knows: " in out, out
