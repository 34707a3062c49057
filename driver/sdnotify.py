"""A dependency-free sd_notify(3) client: tells systemd when the daemon is ready, what
it is doing, that its event loop is alive (watchdog) and that it is stopping."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else 0
    except ValueError:
        return None
    return number if number > 0 else None


class Notifier:
    """Sends state changes to `$NOTIFY_SOCKET`; every call is a no-op when it is unset,
    so the daemon calls it unconditionally whether or not systemd started it."""

    def __init__(
        self,
        notify_socket: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = self._parse_address(notify_socket)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once, as systemd sets them."""
        return cls(
            notify_socket=environ.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(environ.get("WATCHDOG_PID")),
        )

    @staticmethod
    def _parse_address(value: str | None) -> str | None:
        if not value:
            return None
        if value.startswith("@"):  # Linux abstract namespace: a leading NUL, no file
            return "\0" + value[1:]
        if value.startswith("/"):
            return value
        return None  # vsock: and other transports are not used for a host daemon

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # -- messages -----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: `systemctl start` returns, dependants start."""
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """A one-line status that `systemctl status` shows."""
        return self.notify(*self._status(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (drain); systemd shows the unit as deactivating from now on."""
        return self.notify("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; follow it with `ready()` once the new settings are in use.
        systemd requires MONOTONIC_USEC beside RELOADING=1 to order the two."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}",
                           *self._status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start or stop timeout fires; lets a long
        first registration or a drain that waits for a running job finish instead of being
        killed, while a daemon that hangs still runs out of time."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """A keep-alive ping; systemd kills and restarts the service when they stop coming."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec=, as sd_watchdog_enabled(3) advises),
        or None when no watchdog is asked of this process."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None  # the watchdog is meant for another process (we are a child)
        return self._watchdog_usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping from the event loop until cancelled. Pinging from the loop rather than a
        thread is the point: a loop stuck in blocking code stops the pings, and systemd
        then restarts a daemon that could no longer have served anything."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    # -- transport ----------------------------------------------------------------------

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields as one datagram; False when it could not be delivered.
        Never raises: a missing systemd must not take the daemon down."""
        if self._address is None or not fields:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must not block the event loop; the next ping retries.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # One datagram field per line: a newline in the text would start a bogus field.
        return ("STATUS=" + " ".join(text.splitlines()),)
