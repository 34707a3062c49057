"""The `gpu` executor: circuits on one NVIDIA GPU through cuStateVec. Importing this
package loads nothing heavy; CuPy and cuQuantum load only when a GpuExecutor is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from executors.gpu.executor import GpuExecutor


def __getattr__(name: str) -> Any:
    # Resolved on first use so `import executors.gpu` stays free of Qiskit and CUDA.
    if name == "GpuExecutor":
        from executors.gpu.executor import GpuExecutor

        return GpuExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GpuExecutor"]
