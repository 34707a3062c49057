"""The executor process's inbox on its own: it polls the pipe for the next job instead of
sleeping only while jobs come back soon after each answer, and only for so long."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

import driver.processes as processes
from driver.messages import RunBatch, Stop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pipe:
    """A connection whose next message arrives after `delays[i]` seconds of the clock
    (counted from when the inbox starts waiting for it); it notes how often it was
    polled and whether each receive would have had to sleep."""

    def __init__(self, clock: Clock, delays: list[float]) -> None:
        self.clock = clock
        self.messages: deque[Any] = deque(RunBatch([]) for _ in delays)
        self.messages.append(Stop())
        self.delays = deque(delays)
        self.polls: list[int] = []
        self.slept: list[bool] = []
        self._due: float | None = None

    def _arrives(self) -> float:
        if self._due is None:
            self._due = self.clock.now + (self.delays[0] if self.delays else 0.0)
        return self._due

    def poll(self) -> bool:
        self.polls[-1] += 1
        due = self._arrives()
        if self.clock.now < due:
            self.clock.now = min(due, self.clock.now + 0.0001)  # time passes as it polls
        return self.clock.now >= due

    def recv(self) -> Any:
        due = self._arrives()
        self.slept.append(self.clock.now < due)
        self.clock.now = max(self.clock.now, due)
        self._due = None
        if self.delays:
            self.delays.popleft()
        return self.messages.popleft()


def run(monkeypatch: pytest.MonkeyPatch, spin_s: float, delays: list[float]) -> Pipe:
    """The executor's loop over its inbox: each message answered at once."""
    clock = Clock()
    monkeypatch.setattr(processes.time, "monotonic", clock)
    pipe = Pipe(clock, delays)
    inbox = processes._Inbox(pipe, spin_s)  # type: ignore[arg-type]
    pipe.polls.append(0)
    for _ in inbox:
        inbox.answered()
        pipe.polls.append(0)
    return pipe


def test_jobs_that_come_back_soon_are_polled_for(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = run(monkeypatch, 0.002, [5.0, 0.001, 0.001, 0.001])
    # The first wait (after start-up) and the one after it sleep; once a job came back
    # within 2 ms of an answer, the next is polled for and read without sleeping.
    assert pipe.slept[:2] == [True, True]
    assert pipe.slept[2:4] == [False, False]
    assert pipe.polls[0] == pipe.polls[1] == 0
    assert all(n > 0 for n in pipe.polls[2:4])


def test_a_client_that_comes_back_late_is_waited_for_asleep(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = run(monkeypatch, 0.002, [0.0, 0.001, 0.5, 0.001, 0.001])
    # Waiting for the 0.5 s gap's job, the inbox polls 2 ms, then sleeps; that job came
    # late, so the wait after it sleeps without polling; then it polls again.
    assert pipe.slept == [False, True, True, True, False, False]
    assert pipe.polls[1] == 0 and pipe.polls[2] > 0 and pipe.polls[3] == 0
    assert pipe.polls[4] > 0
    # Polling stops at its bound: 2 ms of polls of 0.1 ms each, not the whole gap.
    assert pipe.polls[2] <= 21


def test_spin_zero_never_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = run(monkeypatch, 0.0, [0.0, 0.0, 0.0, 0.0])
    assert sum(pipe.polls) == 0
