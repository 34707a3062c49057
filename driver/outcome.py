"""What a job came to, decided once where it happens and carried typed from the
executor process through the store and the outbox to the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from executors.base import ErrorCode, JobError


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's answer: `result` (the protocol §5 success map) or `error`, never both."""

    job_id: str
    result: dict[str, Any] | None = None
    error: JobError | None = None

    @classmethod
    def succeeded(cls, job_id: str, result: dict[str, Any]) -> Outcome:
        return cls(job_id, result=result)

    @classmethod
    def failed(cls, job_id: str, error: JobError) -> Outcome:
        return cls(job_id, error=error)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """The metrics' outcome label: "ok" or the error code."""
        return "ok" if self.error is None else self.error.code

    def to_wire(self) -> dict[str, Any]:
        if self.error is not None:
            return self.error.to_result()
        assert self.result is not None
        return self.result

    @classmethod
    def from_wire(cls, job_id: str, wire: dict[str, Any]) -> Outcome:
        """Read a stored answer back: the one place a map is classified by its keys."""
        if "error" not in wire:
            return cls(job_id, result=wire)
        details = {k: v for k, v in wire.items() if k not in ("error", "error_code")}
        code = str(wire.get("error_code") or ErrorCode.JOB_FAILED)
        return cls(job_id, error=JobError(code, str(wire["error"]), **details))

    def experiments(self) -> list[dict[str, Any]]:
        return list((self.result or {}).get("circuit_results") or [])
