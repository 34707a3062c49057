"""Codecs: sniffing by first byte, round trips, and rejection of malformed frames."""

from __future__ import annotations

import json

import msgpack
import pytest

from frontends.qpi.wire import Envelope, FrameError, decode, encode, sniff


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_round_trip(fmt: str) -> None:
    env = Envelope("JobResult", {"job_id": "j", "results": {"counts": {"00": 3}}}, driver="d")
    back = decode(encode(env, fmt))  # type: ignore[arg-type]
    assert back.to_map() == env.to_map()
    assert sniff(encode(env, fmt)) == fmt  # type: ignore[arg-type]


def test_msgpack_map_headers() -> None:
    small = msgpack.packb({"type": "X"})
    big = msgpack.packb({str(i): i for i in range(20)} | {"type": "X"})
    assert small[0] in range(0x80, 0x90) and big[0] == 0xDE
    assert decode(big).type == "X"


@pytest.mark.parametrize("frame", [
    b"", b"\x00abc", b"[1,2]", b"{bad json", msgpack.packb([1, 2]), b"\x81\xa1",
    json.dumps({"payload": {}}).encode(), json.dumps({"type": "X", "payload": [1]}).encode(),
    msgpack.packb({"type": "X", "payload": "str"}),
    json.dumps({"type": "X", "payload": {"a": _nested(40)}}).encode(),
])
def test_malformed_frames_raise_frame_error(frame: bytes) -> None:
    with pytest.raises(FrameError):
        decode(frame)
