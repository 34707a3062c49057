"""The envelope of protocol §4 and its two codecs: JSON and msgpack, sniffed on
the way in by the first byte, chosen by negotiation on the way out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from executors.base import iso_utc

WireFormat = Literal["msgpack", "json"]
WIRE_FORMATS: tuple[WireFormat, ...] = ("msgpack", "json")


class EventType:
    JOB_DISPATCH = "JobDispatch"
    JOB_RESULT = "JobResult"
    JOB_CANCEL = "JobCancel"
    JOB_STATUS = "JobStatus"
    RESULT_ACK = "ResultAck"
    QPU_STATE = "QPUState"
    HEARTBEAT = "Heartbeat"


class FrameError(ValueError):
    """A frame that is not a well-formed envelope; logged, never fatal. `job_id` is
    set when a JobDispatch was readable enough to be answered."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


@dataclass(slots=True)
class Envelope:
    type: str
    payload: dict[str, Any]
    driver: str = ""
    id: str = field(default_factory=lambda: "evt_" + os.urandom(12).hex())
    ts: str = field(default_factory=iso_utc)

    def to_map(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "driver": self.driver,
            "type": self.type,
            "ts": self.ts,
            "payload": self.payload,
        }


def sniff(frame: bytes) -> WireFormat:
    """Which codec a frame is in, from its first byte (protocol §4)."""
    if not frame:
        raise FrameError("empty frame")
    first = frame[0]
    if first == 0x7B:  # '{'
        return "json"
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return "msgpack"
    raise FrameError(f"frame starts with byte 0x{first:02x}: neither a JSON nor a msgpack map")


def decode(frame: bytes, max_depth: int = 32) -> Envelope:
    """Decode and check one envelope; raises FrameError on anything malformed."""
    fmt = sniff(frame)
    try:
        if fmt == "json":
            raw = json.loads(frame)
        else:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise FrameError(f"undecodable {fmt} frame: {exc}") from None
    except RecursionError:
        raise FrameError(f"{fmt} frame nested too deeply") from None
    if not isinstance(raw, dict):
        raise FrameError(f"{fmt} frame is not a map")
    if _depth(raw, max_depth) > max_depth:
        payload = raw.get("payload")
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        readable = raw.get("type") == EventType.JOB_DISPATCH and isinstance(job_id, str)
        raise FrameError(f"{fmt} frame nested deeper than {max_depth} levels",
                         job_id if readable else None)
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError("envelope has no 'type'")
    payload = raw.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise FrameError(f"envelope 'payload' of {kind} is a {type(payload).__name__}, not a map")
    return Envelope(
        type=kind,
        payload=payload,
        driver=str(raw.get("driver") or ""),
        id=str(raw.get("id") or ""),
        ts=str(raw.get("ts") or ""),
    )


def encode(envelope: Envelope, fmt: WireFormat) -> bytes:
    data = envelope.to_map()
    if fmt == "msgpack":
        return msgpack.packb(data, use_bin_type=True)
    return json.dumps(data, separators=(",", ":")).encode()


def _depth(value: Any, limit: int) -> int:
    """Nesting depth (a scalar is 1, `{"a": 1}` is 2), stopping early past `limit`
    (JSON/msgpack bound it only loosely). Level by level, looking into containers only:
    a result's counts are hundreds of scalars, and their types are checked in C."""
    level, layer = 1, [value]
    while level <= limit:
        deeper: list[Any] = []
        nonempty = False
        for item in layer:
            if isinstance(item, dict):
                children: Any = item.values()
            elif isinstance(item, list):
                children = item
            else:
                continue
            if not children:
                continue
            nonempty = True
            if any(issubclass(t, (dict, list)) for t in set(map(type, children))):
                deeper.extend(c for c in children if isinstance(c, (dict, list)))
        if not nonempty:
            return level
        level += 1
        layer = deeper
        if not layer:
            return level
    return level
