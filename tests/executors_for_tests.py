"""Executors the tests load by import string (`--executor tests.executors_for_tests:...`):
Aer with an execution log, and faults triggered by markers in the circuit text."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from executors.aer import AerExecutor
from executors.base import Capabilities, Job, JobError, JobResult


class CountingExecutor(AerExecutor):
    """Aer that appends every job it starts to `count_file` (one line per execution),
    writes its process id to `count_file` + ".pid" when it starts, and misbehaves on
    request: `// segfault`, `// exit`, `// hang`, `// sleep S`, `// until PATH` (runs
    until the file PATH exists: a job that lasts exactly as long as a test wants)."""

    name = "counting"
    OPTIONS = frozenset({"count_file"})  # beside Aer's typed options, which it inherits

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        path = self.options.get("count_file")
        if path:
            # Tests kill the executor process; the daemon has other children (a parser),
            # so the executor says which one it is. Replaced whole: never read half written.
            partial = f"{path}.pid.partial"
            with open(partial, "w") as out:
                out.write(str(os.getpid()))
            os.replace(partial, f"{path}.pid")

    def capabilities(self) -> Capabilities:
        """Aer's, naming the worker process: a restarted worker's differ."""
        caps = super().capabilities()
        return dataclasses.replace(caps, extra={**caps.extra, "worker_pid": os.getpid()})

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult | JobError]:
        path = self.options.get("count_file")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, "".join(f"{job.job_id}\n" for job in jobs).encode())
            finally:
                os.close(fd)
        for job in jobs:
            for exp in job.experiments:
                self._misbehave(exp.source)
        return super().run_many(jobs)

    @staticmethod
    def _misbehave(source: str) -> None:
        if "// segfault" in source:
            ctypes.string_at(0)  # a real SIGSEGV, as a vendor library would cause
        if "// exit" in source:
            os._exit(3)
        if "// hang" in source:
            time.sleep(3600)
        marker = source.find("// until ")
        if marker >= 0:
            release = source[marker + 9 :].split()[0]
            while not os.path.exists(release):
                time.sleep(0.01)
        marker = source.find("// sleep ")
        if marker >= 0:
            time.sleep(float(source[marker + 9 :].split()[0]))
