"""Fuzz the live daemon's inbound side (protocol §4-6) with hypothesis: random bytes,
envelopes with random payload trees and mutated JobDispatch frames, in both codecs,
interleaved with probe jobs. One daemon takes every frame. It must stay up and keep
its session, answer every dispatch whose job_id can be read (valid or not), keep
answering the probes correctly, and not grow without bound."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import EventType
from tests.circuits import BELL, SWEEP_QASM3
from tests.conftest import Daemon, daemon_env, start_daemon, wait_for

BATCHES = 200
FRAMES_PER_BATCH = 50  # 10,000 fuzz frames in all, plus the probes
MAX_RSS_GROWTH_KB = 150 * 1024
MAX_JOB_ID = 256  # the daemon's documented cap on a usable job_id (service._on_dispatch)

GHZ3 = """OPENQASM 3.0;
include "stdgates.inc";
qubit[3] q;
bit[3] c;
h q[0];
cx q[0], q[1];
cx q[1], q[2];
c = measure q;
"""
NAN, INF = math.nan, math.inf

# -- an oracle independent of frontends.qpi.wire: can a job_id be read from this frame? ---------


def readable_job_id(frame: bytes) -> str | None:
    """The job_id of a JobDispatch frame, when a reader of protocol §4 can get one.

    Sniff the first byte, decode with the standard codec and its default settings,
    then look up payload.job_id. An id that is not valid Unicode (a lone surrogate,
    which JSON escapes allow) cannot be written back in msgpack, so it does not count.
    """
    if not frame:
        return None
    first = frame[0]
    try:
        if first == 0x7B:
            raw = json.loads(frame)
        elif 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
            raw = msgpack.unpackb(frame, raw=False)
        else:
            return None
    except Exception:  # whatever stops the codec makes the frame unreadable
        return None
    if not isinstance(raw, dict) or raw.get("type") != EventType.JOB_DISPATCH:
        return None
    payload = raw.get("payload")
    job_id = payload.get("job_id") if isinstance(payload, dict) else None
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= MAX_JOB_ID:
        return None
    try:
        job_id.encode()
    except UnicodeEncodeError:
        return None
    return job_id


# -- encoding -------------------------------------------------------------------------------


def encode(obj: Any, codec: str) -> bytes:
    """msgpack or JSON; what msgpack cannot carry (ints past 64 bits, lone surrogates)
    goes as JSON, which can."""
    if codec == "msgpack":
        try:
            return bytes(msgpack.packb(obj, use_bin_type=True))
        except (OverflowError, ValueError, TypeError):
            pass
    # JSON has no bytes; NaN and Infinity go out as the tokens Python's json reads back.
    return json.dumps(obj, default=lambda b: b.hex()).encode()


def envelope(type_: Any, payload: Any) -> dict[str, Any]:
    return {"id": "evt_fuzz", "driver": "fuzz", "type": type_, "ts": "2026-01-01T00:00:00Z",
            "payload": payload}


def nest(value: Any, depth: int, in_maps: bool) -> Any:
    for _ in range(depth):
        value = {"k": value} if in_maps else [value]
    return value


# -- strategies -----------------------------------------------------------------------------

texts = st.text(max_size=24) | st.sampled_from(
    ["", "\ud800", "a\udfffb", "\x00", "x" * (MAX_JOB_ID + 1), "y" * 5000, "JobDispatch"])
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts
           | st.binary(max_size=16))
trees = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=16,
)
bad_numbers = st.sampled_from(
    [0, -1, 2**63, 2**64 + 5, 10**30, 1.5, NAN, INF, -INF, True, "10", None, [], {}]
) | st.integers() | st.floats()
event_types = st.sampled_from(
    [EventType.JOB_DISPATCH, EventType.JOB_CANCEL, EventType.QPU_STATE, EventType.RESULT_ACK,
     EventType.JOB_RESULT, EventType.HEARTBEAT, EventType.JOB_STATUS, "Bogus", ""]
) | texts | scalars
circuit_entries = st.sampled_from([
    BELL,
    GHZ3,
    {"circuit": BELL, "shots": 7},
    {"circuit": BELL, "memory": True},
    {"circuit": SWEEP_QASM3, "parameter_values": [[0.1], [2.0]]},
])
bad_parameter_values = st.sampled_from([
    [[NAN]], [[INF]], [[-INF]], [["a"]], [[]], [[1e308, -1e308]], [[0.1]] * 20, "x", [0.5],
    [[None]], [[True]], [[2**70]],
]) | trees
bad_circuits = st.sampled_from([
    [], "not a list", [1], [{"circuit": 5}], [{}], [{"circuit": ""}], None,
    [{"circuit": BELL, "shots": -1}], [{"circuit": BELL, "shots": 1.5}],
    ["OPENQASM 2.0;\nqreg q[2];\nbogus q[0];\n"], ["OPENQASM 3.0;\nqubit[9] q;\n"],
    [BELL + "// " + "y" * 200_000 + "\n"], [BELL] * 40,
]) | trees
MUTATIONS = ["none", "none", "job_id", "shots", "circuits", "parameter_values", "field", "deep",
             "long", "payload_string", "payload_type", "envelope"]
FIELDS = ["meas_level", "meas_return", "memory", "qpu_target", "qasm", "circuit", "shots"]
BYTE_MUTATIONS = ["none", "none", "none", "flip", "truncate", "insert", "splice"]


_job_numbers = itertools.count()


@st.composite
def dispatches(draw: st.DrawFn) -> bytes:
    """A valid JobDispatch, then maybe one map-level and one byte-level mutation."""
    # Hypothesis likes to repeat simple values; a counter keeps most jobs distinct, so
    # they run rather than being answered from the store.
    job_id: Any = f"fz-{next(_job_numbers)}"
    job: Any = {"circuits": [draw(circuit_entries)], "shots": draw(st.integers(1, 100))}
    env = envelope(EventType.JOB_DISPATCH, {"job_id": job_id, "payload": job})
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "job_id":
        env["payload"]["job_id"] = draw(st.sampled_from(
            ["", "x" * MAX_JOB_ID, "x" * (MAX_JOB_ID + 1), "\ud800", 7, 2**80, None, NAN,
             b"bytes-id", ["fz"], {"id": "fz"}]) | scalars)
    elif kind == "shots":
        job["shots"] = draw(bad_numbers)
    elif kind == "circuits":
        job["circuits"] = draw(bad_circuits)
    elif kind == "parameter_values":
        job["circuits"] = [{"circuit": SWEEP_QASM3, "parameter_values": draw(bad_parameter_values)}]
    elif kind == "field":
        job[draw(st.sampled_from(FIELDS))] = draw(trees)
    elif kind == "deep":
        depth, in_maps = draw(st.integers(20, 120)), draw(st.booleans())
        where = draw(st.sampled_from(["circuits", "parameter_values", "extra"]))
        if where == "parameter_values":
            job["circuits"] = [{"circuit": SWEEP_QASM3,
                                "parameter_values": nest([[0.5]], depth, in_maps)}]
        else:
            job[where] = nest(job.get(where, 1), depth, in_maps)
    elif kind == "long":
        job[draw(st.sampled_from(["qpu_target", "padding"]))] = "z" * draw(
            st.integers(1000, 300_000))
    elif kind == "payload_string":
        env["payload"]["payload"] = draw(st.sampled_from([
            json.dumps(job), json.dumps(job)[:-3], "[" * 3000 + "]" * 3000,
            '{"circuits": ' + "[" * 3000 + "]" * 3000 + "}", "", "null", "1e999"]))
    elif kind == "payload_type":
        env["payload"]["payload"] = draw(trees)
    elif kind == "envelope":
        env[draw(st.sampled_from(["type", "payload", "id", "driver", "ts"]))] = draw(trees)
    frame = encode(env, draw(st.sampled_from(["msgpack", "json"])))
    kind = draw(st.sampled_from(BYTE_MUTATIONS))

    def at(size: int) -> int:
        # Positions as fractions: what is drawn must not depend on the frame's length,
        # which the job number changes from run to run (hypothesis replays draws).
        return draw(st.integers(0, 2**16 - 1)) * size // 2**16

    if kind == "flip":
        buf = bytearray(frame)
        for _ in range(draw(st.integers(1, 8))):
            buf[at(len(buf))] ^= 1 << draw(st.integers(0, 7))
        frame = bytes(buf)
    elif kind == "truncate":
        frame = frame[: at(len(frame))]
    elif kind == "insert":
        i = at(len(frame) + 1)
        frame = frame[:i] + draw(st.binary(min_size=1, max_size=16)) + frame[i:]
    elif kind == "splice":
        i, j = sorted((at(len(frame) + 1), at(len(frame) + 1)))
        frame = frame[:j] + frame[i:j] + frame[j:]
    return frame


@st.composite
def random_envelopes(draw: st.DrawFn) -> bytes:
    """Well-formed envelopes of any type with random payload trees."""
    type_ = draw(event_types)
    shape = draw(st.sampled_from(["tree", "job_id", "state"]))
    if shape == "job_id":  # a readable id (often) on top of a payload that is not a job
        payload: Any = {"job_id": draw(texts), "payload": draw(trees)}
    elif shape == "state":
        payload = {"state": draw(st.sampled_from(["online", "disabled", "maintenance", 5]))}
    else:
        payload = draw(st.dictionaries(texts, trees, max_size=5) | trees)
    return encode(envelope(type_, payload), draw(st.sampled_from(["msgpack", "json"])))


sniffable_garbage = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([b"{", b"\x80", b"\x81", b"\x85", b"\x8f", b"\xde", b"\xdf", b'{"type"',
                     b""]),
    st.binary(max_size=256),
)
# Mostly dispatches, which reach the deepest code; hypothesis favours early branches.
frames = st.one_of(dispatches(), random_envelopes(), dispatches(), sniffable_garbage,
                   st.binary(min_size=1, max_size=512), dispatches())


# -- the test -------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Answers:
    """JobResults the daemon sent, by job_id, read incrementally from the orchestrator."""

    def __init__(self, orch: LocalOrchestrator) -> None:
        self._orch = orch
        self._seen = 0
        self.by_id: dict[str, dict[str, Any]] = {}

    def update(self) -> None:
        events = self._orch.events
        for env in events[self._seen:]:
            if env.type == EventType.JOB_RESULT:
                self.by_id.setdefault(str(env.payload.get("job_id")), env.payload["results"])
        self._seen = len(events)

    def missing(self, job_ids: set[str]) -> set[str]:
        self.update()
        return {j for j in job_ids if j not in self.by_id}


def probe(job_id: str, job: dict[str, Any], codec: str) -> bytes:
    return encode(envelope(EventType.JOB_DISPATCH, {"job_id": job_id, "payload": job}), codec)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_fuzzed_frames_never_stop_the_daemon_and_readable_jobs_are_answered(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    orch = LocalOrchestrator(port=0, driver_name="fuzz", wire_format="msgpack")
    await orch.start()
    d: Daemon = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_MAX_QUBITS="5",
                                                   QPI_MAX_SHOTS="100"))
    answers = Answers(orch)
    expected: dict[str, bytes] = {}  # readable job_id -> a frame carrying it: each needs an answer
    sent = [0]
    batches = [0]

    def on_loop(coro_fn: Callable[[], Any], timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(), loop).result(timeout)

    async def send_batch(batch: list[bytes], n: int) -> None:
        for frame in batch:
            await orch.send_raw(frame)
        # The probes follow the fuzz on the same socket, so the daemon sees them after it;
        # a fuzzed QPUState may have disabled the QPU, so enable it first.
        codec = "json" if n % 2 else "msgpack"
        await orch.send_raw(encode(envelope(EventType.QPU_STATE, {"state": "online"}), codec))
        ok, bad = f"probe-ok-{n}", f"probe-bad-{n}"
        await orch.send_raw(probe(ok, {"circuits": [BELL], "shots": 10}, codec))
        await orch.send_raw(probe(bad, {"circuits": ["OPENQASM 2.0;\nqreg q[2];\nnope;\n"]},
                                  codec))
        await wait_for(lambda: not answers.missing({ok, bad}) or d.proc.poll() is not None
                       or orch.connects > 1,
                       timeout=120, what=f"answers to the probes of batch {n}")
        assert d.proc.poll() is None, d.output()[-5000:]
        # No frame may break the session: a dead receive or send loop means a re-register,
        # and whatever the old pipe still held is gone.
        assert orch.connects == 1, f"batch {n} made the daemon reconnect: {batch[:50]!r:.3000}"
        good = answers.by_id[ok]
        assert good.get("success") is True and sum(good["counts"].values()) == 10, (n, good)
        assert answers.by_id[bad].get("error_code") == "CIRCUIT_INVALID", (n, answers.by_id[bad])

    @settings(max_examples=BATCHES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        batch = [data.draw(frames) for _ in range(FRAMES_PER_BATCH)]
        for frame in batch:
            job_id = readable_job_id(frame)
            if job_id is not None:
                expected.setdefault(job_id, frame)
        batches[0] += 1
        on_loop(lambda: send_batch(batch, batches[0]))
        sent[0] += len(batch)

    seed = int(os.environ.get("FUZZ_SEED") or time.time_ns() % 1_000_000)
    print(f"fuzz seed {seed} (rerun with FUZZ_SEED={seed})")
    fuzz = hypothesis_seed(seed)(fuzz)
    try:
        await wait_for(lambda: orch.online or d.proc.poll() is not None, timeout=90,
                       what="the daemon to connect")
        assert d.proc.poll() is None, d.output()
        await send_batch([], 0)  # warm: executor, codecs, store
        rss_before = rss_kb(d.proc.pid)
        started = time.monotonic()
        await asyncio.to_thread(fuzz)
        try:
            await wait_for(lambda: not answers.missing(set(expected)) or d.proc.poll() is not None,
                           timeout=120, what="answers to every readable fuzzed job")
        except AssertionError as exc:
            missing = sorted(answers.missing(set(expected)))
            raise AssertionError(f"{exc}: {len(missing)} unanswered, e.g. "
                                 f"{[(j, expected[j][:300]) for j in missing[:5]]}") from None
        rss_after = rss_kb(d.proc.pid)
        log = d.output()
        print(f"{sent[0]} fuzz frames in {batches[0]} batches, {time.monotonic() - started:.1f} "
              f"s; {len(expected)} readable job_ids; daemon RSS {rss_before // 1024} -> "
              f"{rss_after // 1024} MB; {log.count('malformed frame dropped')} malformed, "
              f"{log.count('event handler failed')} handler failures, "
              f"{log.count('executor restarted')} executor restarts")
        assert sent[0] >= BATCHES * FRAMES_PER_BATCH
        assert d.proc.poll() is None, log[-5000:]
        assert rss_after - rss_before < MAX_RSS_GROWTH_KB, (rss_before, rss_after)
        assert orch.connects == 1, orch.connects
    finally:
        code = d.stop(timeout=60)
        await orch.stop()
    assert code == 0, f"daemon exited {code}:\n{d.output()[-5000:]}"


# -- what the fuzzing found, one frame each ---------------------------------------------------

HOSTILE = {
    # pynng's Socket.recv raises RuntimeError on a zero-length message.
    "empty frame": (b"", None, set()),
    # A QUOTA_EXCEEDED answer echoing requested_shots that msgpack cannot pack.
    "shots past 64 bits": (
        encode(envelope(EventType.JOB_DISPATCH, {"job_id": "h-shots", "payload": {
            "circuits": [BELL], "shots": 2**64 + 5}}), "json"),
        "h-shots", {"QUOTA_EXCEEDED", "CIRCUIT_INVALID"}),
    # Qiskit refuses to bind NaN with a RuntimeError in the worker, not a CircuitError.
    "NaN parameter": (
        encode(envelope(EventType.JOB_DISPATCH, {"job_id": "h-nan", "payload": {
            "circuits": [{"circuit": SWEEP_QASM3, "parameter_values": [[NAN]]}], "shots": 10}}),
            "json"),
        "h-nan", {"CIRCUIT_INVALID", "JOB_FAILED"}),
    # The job as JSON text (protocol §5) nested past the recursion limit.
    "deep job text": (
        encode(envelope(EventType.JOB_DISPATCH, {"job_id": "h-text",
                                                  "payload": "[" * 5000 + "]" * 5000}), "json"),
        "h-text", {"CIRCUIT_INVALID"}),
    # A readable job_id beside a job nested deeper than the daemon's frame depth cap.
    "deep job map": (
        encode(envelope(EventType.JOB_DISPATCH, {"job_id": "h-deep", "payload": {
            "circuits": [{"circuit": SWEEP_QASM3, "parameter_values": nest([[0.5]], 40, False)}],
            "shots": 10}}), "msgpack"),
        "h-deep", {"CIRCUIT_INVALID", "QUOTA_EXCEEDED"}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_frame_is_answered_or_dropped_and_nothing_else_suffers(
    tmp_path: Path, case: str
) -> None:
    frame, job_id, codes = HOSTILE[case]
    orch = LocalOrchestrator(port=0, driver_name="hostile", wire_format="msgpack")
    await orch.start()
    d = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_MAX_QUBITS="5",
                                          QPI_MAX_SHOTS="100", QPI_DRAIN_TIMEOUT_S="5"))
    answers = Answers(orch)
    try:
        await wait_for(lambda: orch.online or d.proc.poll() is not None, timeout=90,
                       what="the daemon to connect")
        await orch.send_raw(frame)
        # A valid job right behind it, likely in the same batch: it must not pay for it.
        await orch.send_raw(probe("h-neighbour", {"circuits": [BELL], "shots": 10}, "msgpack"))
        await wait_for(lambda: not answers.missing({"h-neighbour"}) or orch.connects > 1,
                       timeout=60, what="an answer to the job behind the hostile frame")
        assert orch.connects == 1, "the frame broke the session: the daemon registered again"
        assert answers.by_id["h-neighbour"].get("success") is True, answers.by_id["h-neighbour"]
        if job_id is not None:
            await wait_for(lambda: not answers.missing({job_id}), timeout=30,
                           what=f"an answer to {job_id} (protocol §6: its job_id can be read)")
            assert answers.by_id[job_id].get("error_code") in codes, answers.by_id[job_id]
        later = orch.submit({"circuits": [BELL], "shots": 10})
        await orch.result(later.id, timeout=60)
        assert later.status == "completed", later.results
    finally:
        code = d.stop(timeout=60)
        await orch.stop()
    assert code == 0, f"daemon exited {code}:\n{d.output()[-5000:]}"
