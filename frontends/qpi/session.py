"""One connection to the orchestrator: its registration reply and the two NNG
sockets (protocol §3). A new instance per connect; `detached` fires when either
pipe drops, and the daemon then registers again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pynng

from frontends.qpi.nng import AsyncSocket, SocketClosed, tls_client, url
from frontends.qpi.registration import Registration

SOCKET_BUFFER = 64  # messages


class OrchestratorSession:
    def __init__(self, registration: Registration, max_frame_bytes: int) -> None:
        self.registration = registration
        self._max_frame_bytes = max_frame_bytes
        self._pull: AsyncSocket | None = None
        self._push: AsyncSocket | None = None
        self.detached = asyncio.Event()

    @property
    def host(self) -> str:
        return self.registration.nng_host

    async def open(self) -> None:
        r = self.registration
        tls = r.ca_pem is not None
        kwargs: dict[str, Any] = {}
        if r.ca_pem is not None:
            kwargs["tls_config"] = tls_client(r.nng_host, r.ca_pem)
        # Socket buffers: without them every send and receive waits on a hand-off to an
        # NNG thread (~80 us, the event loop blocked). Frames read ahead fare as those in
        # the kernel's buffers would if the connection drops. A sent result is marked
        # delivered once sent, so a buffered send is only safe where results are kept
        # until acknowledged (one left in the buffer when the socket closes is resent).
        pull = pynng.Pull0(recv_max_size=self._max_frame_bytes, recv_buffer_size=SOCKET_BUFFER,
                           **kwargs)
        push = pynng.Push0(**kwargs)
        if r.acks:
            push.send_buffer_size = SOCKET_BUFFER
        self._pull, self._push = AsyncSocket(pull), AsyncSocket(push)
        for sock in (self._pull, self._push):
            sock.on_pipes(lambda _pipe: None, lambda _pipe: self.detached.set())
        try:
            # dial(block=True) fails fast on refusal or a TLS failure; it runs the
            # handshake, so keep it off the loop.
            await asyncio.to_thread(pull.dial, url(r.nng_host, r.nng_in_port, tls), block=True)
            await asyncio.to_thread(push.dial, url(r.nng_host, r.nng_out_port, tls), block=True)
        except BaseException:
            self.close()
            raise

    async def frames(self) -> AsyncIterator[bytes]:
        """Inbound frames until the socket closes."""
        assert self._pull is not None
        while True:
            try:
                yield await self._pull.recv()
            except SocketClosed:
                return

    async def send(self, frame: bytes) -> None:
        assert self._push is not None
        await self._push.send(frame)

    def close(self) -> None:
        for sock in (self._pull, self._push):
            if sock is not None:
                sock.close()
        self.detached.set()
