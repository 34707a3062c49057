"""Executors by name: built-ins as lazy import strings, third parties through the
`qpi_driver.executors` entry-point group. Nothing heavy is imported until chosen."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from executors.base import (
    Capabilities,
    ErrorCode,
    Executor,
    Experiment,
    ExperimentResult,
    Job,
    JobError,
    JobResult,
    OptionError,
)

ENTRY_POINT_GROUP = "qpi_driver.executors"

BUILTIN: dict[str, str] = {
    "aer": "executors.aer:AerExecutor",
    "gpu": "executors.gpu:GpuExecutor",
    "qibolab": "executors.qibolab:QibolabExecutor",
    "oqc": "executors.oqc:OqcExecutor",
}


class ExecutorUnavailable(Exception):
    """The named executor cannot be loaded here; the message says how to fix it."""


def available() -> dict[str, str]:
    """Every executor name this installation knows, with where it comes from."""
    names = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep.value)
    return names


def load(name: str) -> type[Executor]:
    """Import and return the executor class registered under `name`, or named
    directly by an import string `package.module:Class`."""
    target = available().get(name) or (name if ":" in name else None)
    if target is None:
        known = ", ".join(sorted(available()))
        raise ExecutorUnavailable(f"unknown executor {name!r}; installed executors: {known}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"executor {name!r} could not be imported ({exc}); "
            f"install its extra, e.g. pip install 'qpi-driver[{name}]'"
        ) from exc
    cls: Any = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ExecutorUnavailable(f"{target} is not an executors.base.Executor subclass")
    return cls


def create(name: str, options: dict[str, Any] | None = None) -> Executor:
    """Load and construct the executor `name` with its options."""
    return load(name)(options)


__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Capabilities",
    "ErrorCode",
    "Executor",
    "ExecutorUnavailable",
    "Experiment",
    "ExperimentResult",
    "Job",
    "JobError",
    "JobResult",
    "OptionError",
    "available",
    "create",
    "load",
]
