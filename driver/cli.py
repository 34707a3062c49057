"""The `qpi-driver` command: run the daemon (flags map one to one onto Settings),
submit a circuit, show a node's status, check a configuration, check or recover the
result store, or run the embedded orchestrator alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from driver import __version__, logs
from driver.exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_SIGPIPE,
    EX_TEMPFAIL,
)
from driver.settings import CREDENTIAL_NAME, ConfigError, Settings, load_settings
from driver.settings import origins as setting_origins

_NOT_FLAGS = {"access_token", "executor_options"}  # secrets never go on a command line


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    for name, info in Settings.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_const", const=True,
                                help=info.description)
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=info.description)
    parser.add_argument("--executor-option", dest="executor_option", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="executor option (repeatable); VALUE is JSON or a plain string")


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {n: getattr(args, n, None) for n in Settings.model_fields if n not in _NOT_FLAGS}
    if args.executor_option:
        options: dict[str, Any] = {}
        for item in args.executor_option:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"invalid setting 'executor_options' (from flag "
                                  f"--executor-option): expected KEY=VALUE, got {item!r}")
            try:
                options[key] = json.loads(raw)
            except ValueError:
                options[key] = raw
        flags["executor_options"] = options
    return load_settings(flags, args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpi-driver", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qpi-driver {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_setting_flags(parser)
    run = sub.add_parser("run", help="run the daemon (the default)")
    _add_setting_flags(run)

    submit = sub.add_parser("submit", help="submit an OpenQASM file and print its counts")
    submit.add_argument("file", type=Path)
    submit.add_argument("--shots", type=int, default=1024)
    submit.add_argument("--url", default="http://127.0.0.1:8090")
    submit.add_argument("--timeout", type=float, default=120.0)
    submit.add_argument("--memory", action="store_true", help="also print per-shot memory")

    status = sub.add_parser("status", help="show the driver nodes an orchestrator knows")
    status.add_argument("--url", default="http://127.0.0.1:8090")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate a file plus the environment; a token the systemd unit "
        "provides as a credential need not be present")
    check.add_argument("file", type=Path, nargs="?")
    check.add_argument("--strict", action="store_true",
                       help="also require the access token (as when run outside systemd)")

    store = sub.add_parser("store", help="result store tools (run them with the daemon "
                           "stopped)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    for name, text in (
        ("check", "check the result store for damage (exit 0 healthy, 65 damaged, 66 none, "
                  "74 unreadable)"),
        ("recover", "salvage the readable rows of a damaged store into a fresh one and keep "
                    "the damaged file beside it (exit 0 done or healthy, 66 none, 75 in use)"),
    ):
        tool = store_sub.add_parser(name, help=text, description=text)
        tool.add_argument("--data-dir", type=Path,
                          help="the daemon's data_dir (default: from the settings)")
        tool.add_argument("--config", dest="store_config", type=Path,
                          help="TOML configuration file to take data_dir from")

    orch = sub.add_parser("orchestrator", help="run the embedded orchestrator alone")
    orch.add_argument("--host", default="127.0.0.1")
    orch.add_argument("--port", type=int, default=8090)
    orch.add_argument("--name", default="local")
    orch.add_argument("--wire-format", choices=["msgpack", "json"], default="msgpack")
    orch.add_argument("--token", help="access token to accept (default: a random one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; output cut short by its reader (`| head`) ends it quietly."""
    try:
        try:
            code = _main(argv)
        except SystemExit:
            sys.stdout.flush()  # --help, --version: written, not yet flushed
            raise
        sys.stdout.flush()  # inside the try: a broken pipe must not surface at exit
        return code
    except BrokenPipeError:
        # Python's own flush at exit would fail again and print; point stdout at nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_SIGPIPE
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    tools: dict[str, Callable[[argparse.Namespace], int]] = {
        "submit": _submit, "status": _status, "store": _store, "orchestrator": _orchestrator,
    }
    if command in tools:
        return tools[command](args)
    try:
        if command == "config":
            return _config_check(args.file, args.strict)
        settings = _settings_from(args)
    except ConfigError as exc:
        print(f"qpi-driver: {exc}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(settings.log_format, settings.log_level)
    if settings.access_token is not None:
        logs.register_secret(settings.access_token.get_secret_value())
    log = logs.get("qpi.driver")
    for warning in (settings.token_file_warning(), settings.cleartext_token_warning()):
        if warning:
            log.warning(warning)
    try:
        return asyncio.run(serve(settings, lambda: _settings_from(args)))
    except KeyboardInterrupt:
        return 130


def _config_check(file: Path | None, strict: bool) -> int:
    """Print the effective settings (JSON, stdout) and, on stderr, where each came from
    and which ones the systemd unit provides at start."""
    settings = load_settings({}, file, token_elsewhere=not strict)
    where = setting_origins(settings, file)
    elsewhere: dict[str, str] = {}
    if where.get("access_token", "").startswith("defaults"):  # read by the validator
        where["access_token"] = (f"access_token_file {settings.access_token_file}"
                                 if settings.access_token_file is not None else
                                 f"credential {CREDENTIAL_NAME} in $CREDENTIALS_DIRECTORY")
    if settings.access_token is None and settings.orchestrator_url is not None:
        where.pop("access_token", None)
        elsewhere["access_token"] = (
            f"not in this shell. The systemd unit passes it as the credential "
            f"{CREDENTIAL_NAME} (LoadCredential=), which the daemon reads from "
            f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} by itself. Run outside systemd, "
            "set QPI_ACCESS_TOKEN or access_token_file (--strict checks for it)")
    if "data_dir" not in where and not os.environ.get("STATE_DIRECTORY"):
        elsewhere["data_dir"] = (
            "not set. Under systemd the daemon uses $STATE_DIRECTORY (the unit's "
            f"StateDirectory=, /var/lib/qpi-driver); in this shell it is {settings.data_dir}")
    groups: dict[str, list[str]] = {}
    for key, origin in where.items():
        if key not in elsewhere:
            groups.setdefault(origin, []).append(key)
    lines = [f"qpi-driver config check: {file or 'the environment'} is valid"]
    lines += [f"  from {origin}: {', '.join(keys)}" for origin, keys in groups.items()]
    if elsewhere:
        lines.append("  provided at start, not checked here:")
        lines += [f"    {key}: {text}" for key, text in elsewhere.items()]
    lines += [f"warning: {w}" for w in (settings.token_file_warning(),
                                         settings.cleartext_token_warning()) if w]
    # The report first: it must survive a reader that stops early (`| head`).
    print("\n".join(lines), file=sys.stderr, flush=True)
    print(json.dumps(settings.masked(), indent=2))
    return 0


def _store(args: argparse.Namespace) -> int:
    from driver import store_repair

    data_dir = args.data_dir
    if data_dir is None:
        try:
            data_dir = load_settings({}, args.store_config, token_elsewhere=True).data_dir
        except ConfigError as exc:
            print(f"qpi-driver store: {exc}; or give --data-dir", file=sys.stderr)
            return EX_CONFIG
    path = Path(data_dir) / store_repair.STORE_NAME
    if args.store_command == "check":
        report = store_repair.check(path)
        print(report.summary())
        return {"ok": 0, "missing": EX_NOINPUT, "unreadable": EX_IOERR}.get(
            report.state, EX_DATAERR)
    try:
        recovered = store_repair.recover(path)
    except store_repair.StoreInUse as exc:
        print(f"qpi-driver store recover: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except store_repair.RecoverFailed as exc:
        print(f"qpi-driver store recover: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    print(recovered.summary())
    return EX_NOINPUT if recovered.before.state == "missing" else 0


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Run the daemon; in local mode, with the embedded orchestrator beside it. `reload`
    rebuilds the settings from the same flags, environment and file (SIGHUP)."""
    from driver.service import Driver
    from frontends.qpi.orchestrator import LocalOrchestrator

    orchestrator = None
    if settings.local_mode:
        orchestrator = LocalOrchestrator(
            host=settings.local_host,
            port=settings.local_port,
            driver_name=settings.driver_name if "driver_name" in settings.model_fields_set
            else settings.executor,
            wire_format=settings.wire_format,
        )
        try:
            await orchestrator.start()
        except OSError as exc:
            print(f"qpi-driver: cannot start the embedded orchestrator on "
                  f"{settings.local_host}:{settings.local_port}: {exc.strerror}; pick another "
                  "port with --local-port", file=sys.stderr)
            return EX_CONFIG
        settings = settings.model_copy(update={
            "orchestrator_url": orchestrator.url,
            "access_token": SecretStr(orchestrator.token),
            "ca_fingerprint": orchestrator.ca_fingerprint,
        })
        logs.register_secret(orchestrator.token)
        print(
            f"qpi-driver {__version__}: embedded orchestrator (development stand-in) on "
            f"{orchestrator.url}, QPU {orchestrator.driver_name!r}, executor "
            f"{settings.executor!r}\n"
            f"  submit:  qpi-driver submit examples/bell.qasm --shots 1024 --url "
            f"{orchestrator.url}\n"
            f"  qiskit:  QPIClient({orchestrator.url!r}).get_backend({orchestrator.driver_name!r})",
            file=sys.stderr,
            flush=True,
        )
    try:
        return await Driver(settings, reload).run()
    finally:
        if orchestrator is not None:
            await orchestrator.stop()


def _orchestrator(args: argparse.Namespace) -> int:
    logs.configure()
    return asyncio.run(_orchestrator_alone(args))


async def _orchestrator_alone(args: argparse.Namespace) -> int:
    from frontends.qpi.orchestrator import LocalOrchestrator

    orchestrator = LocalOrchestrator(host=args.host, port=args.port, driver_name=args.name,
                                     wire_format=args.wire_format, token=args.token)
    await orchestrator.start()
    print(json.dumps({"QPI_ADDR": orchestrator.url, "QPI_ACCESS_TOKEN": orchestrator.token,
                      "QPI_CA_FINGERPRINT": orchestrator.ca_fingerprint}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await orchestrator.stop()
    return 0


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _submit(args: argparse.Namespace) -> int:
    try:
        source = args.file.read_text()
    except OSError as exc:
        print(f"qpi-driver submit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    base = args.url.rstrip("/")
    try:
        job = _http("POST", f"{base}/api/jobs", {
            "circuits": [{"circuit": source}], "shots": args.shots, "memory": args.memory,
        })
        job_id = job.get("id") or job.get("job_id")
        deadline = time.monotonic() + args.timeout
        while job.get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                print(f"qpi-driver submit: job {job_id} not finished after {args.timeout}s",
                      file=sys.stderr)
                return EX_TEMPFAIL
            time.sleep(0.05)
            job = _http("GET", f"{base}/api/jobs/{job_id}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"qpi-driver submit: cannot reach {base} ({exc}); is the daemon running?",
              file=sys.stderr)
        return 69
    results = job.get("results") or {}
    if job["status"] != "completed":
        print(f"job {job_id} {job['status']}: [{results.get('error_code')}] "
              f"{results.get('error')}", file=sys.stderr)
        return 1
    print(f"job {job_id} completed on {results.get('backend')} in "
          f"{results.get('execution_time_seconds', 0):.4f} s")
    for i, exp in enumerate(results.get("circuit_results", [])):
        print(histogram(exp["counts"], exp["shots"], title=f"circuit {i}: {exp['shots']} shots"))
        if args.memory and exp.get("memory"):
            print("memory:", " ".join(exp["memory"][:32]), "..." if len(exp["memory"]) > 32 else "")
    return 0


def histogram(counts: dict[str, int], shots: int, title: str = "", width: int = 40,
              top: int = 16) -> str:
    lines = [title] if title else []
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    peak = max(counts.values(), default=1)
    for key, n in ranked[:top]:
        bar = "#" * max(1, round(width * n / peak))
        lines.append(f"  {key}  {n:>8}  {100 * n / max(shots, 1):5.1f}%  {bar}")
    if len(ranked) > top:
        lines.append(f"  ... {len(ranked) - top} more outcomes")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    try:
        qpus = _http("GET", args.url.rstrip("/") + "/api/qpus")
    except (urllib.error.URLError, OSError) as exc:
        print(f"qpi-driver status: cannot reach {args.url} ({exc})", file=sys.stderr)
        return 69
    if not qpus:
        print(f"qpi-driver status: no QPU has registered with {args.url} yet (a driver that "
              "is starting registers once its executor is ready)", file=sys.stderr)
    for qpu in qpus:
        print(f"{qpu.get('name')}: {qpu.get('status')} executor={qpu.get('executor_type')} "
              f"qubits={qpu.get('num_qubits')}")
        beat = qpu.get("last_heartbeat")
        if beat:
            for key in ("status", "queue_depth", "running_job", "uptime_s", "version"):
                print(f"  {key}: {beat.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
