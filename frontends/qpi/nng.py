"""pynng sockets driven by the asyncio loop: non-blocking calls woken by the
socket's pollable fds (cheaper per message than pynng's own arecv/asend)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pynng


class SocketClosed(Exception):
    """The socket was closed while waiting on it."""


def tls_client(host: str, ca_pem: str) -> pynng.TLSConfig:
    return pynng.TLSConfig(
        pynng.TLSConfig.MODE_CLIENT,
        server_name=host,
        ca_string=ca_pem,
        auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED,
    )


def tls_server(cert_pem: str, key_pem: str) -> pynng.TLSConfig:
    return pynng.TLSConfig(
        pynng.TLSConfig.MODE_SERVER, own_cert_string=cert_pem, own_key_string=key_pem
    )


def url(host: str, port: int, tls: bool) -> str:
    return f"{'tls+tcp' if tls else 'tcp'}://{host}:{port}"


def bound_port(listener: pynng.Listener) -> int:
    return int(str(listener.local_address).rpartition(":")[2])


class AsyncSocket:
    """A pynng socket with `await recv()` / `await send()` on the running loop.

    Pipe attach/detach callbacks arrive on NNG threads; they are handed to the
    loop so callers see them as ordinary loop callbacks.
    """

    def __init__(self, sock: pynng.Socket, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._recv_fd: int | None = None
        self._send_fd: int | None = None
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    def on_pipes(
        self, attached: Callable[[pynng.Pipe], None], detached: Callable[[pynng.Pipe], None]
    ) -> None:
        loop = self._loop

        def _attached(pipe: pynng.Pipe) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(attached, pipe)

        def _detached(pipe: pynng.Pipe) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(detached, pipe)

        self.sock.add_post_pipe_connect_cb(_attached)
        self.sock.add_post_pipe_remove_cb(_detached)

    async def recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv_msg(block=False).bytes  # recv() fails on b""
            except pynng.TryAgain:
                pass
            except pynng.Closed:
                raise SocketClosed from None
            if self._recv_fd is None:
                self._recv_fd = self.sock.recv_fd
            await self._readable(self._recv_fd)

    async def send(self, frame: bytes) -> None:
        while True:
            try:
                self.sock.send(frame, block=False)
                return
            except pynng.TryAgain:
                pass
            except pynng.Closed:
                raise SocketClosed from None
            if self._send_fd is None:
                self._send_fd = self.sock.send_fd
            await self._readable(self._send_fd)

    async def _readable(self, fd: int) -> None:
        if self._closed:
            raise SocketClosed
        waiter: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_reader(fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if not self._loop.is_closed() and not self._closed:
                self._loop.remove_reader(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._recv_fd, self._send_fd):
            if fd is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(SocketClosed())
        self.sock.close()
