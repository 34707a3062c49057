"""The one interface between the gpu executor's pipeline and a state-vector backend
(cuStateVec on a GPU, NumPy on the CPU), and the footprint admission is computed from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Pass:
    """The shape of one state pass, as far as its workspace depends on it."""

    targets: tuple[int, ...]
    n_controls: int
    diagonal: bool
    block: int = -1  # index of a plan block of this shape (its uploaded matrix); -1: none


@dataclass(frozen=True, slots=True)
class Footprint:
    """Everything about a plan that decides how much memory running it takes."""

    num_qubits: int
    passes: tuple[Pass, ...]  # distinct pass shapes
    matrix_elements: int  # complex entries uploaded for the plan (the matrix arena)
    sampler_shots: int  # shots drawn through the backend's sampler; 0 when not used


class Backend(Protocol):
    """What the runner and the executor call on a backend. `ref`s are whatever `upload`
    returned for a matrix (a device pointer, or a host array)."""

    name: str
    precision: str
    dtype: np.dtype[Any]
    num_qubits: int

    # --- device and memory --------------------------------------------------------
    def device_name(self) -> str: ...
    def memory(self) -> tuple[int, int]:
        """(free, total) bytes; free includes what this backend holds and would reuse."""
        ...

    def state_bytes(self, num_qubits: int) -> int: ...
    def statevector_host_bytes(self, num_qubits: int) -> int:
        """Host memory `statevector()` needs for a state of `num_qubits`."""
        ...

    def required_bytes(
        self, footprint: Footprint, refs: Sequence[Any] | None = None
    ) -> Mapping[str, int]:
        """Bytes running `footprint` needs, by part (state, workspace, ...). With the
        uploaded `refs`, workspace sizes are queried for exactly those matrices."""
        ...

    def out_of_memory(self, exc: BaseException) -> bool:
        """True when `exc` means the device (or host) ran out of memory."""
        ...

    def session(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...

    # --- state --------------------------------------------------------------------
    def reset_state(self, num_qubits: int) -> None: ...
    def upload(self, matrices: Sequence[np.ndarray]) -> list[Any]: ...
    def apply_matrix(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None: ...
    def apply_diagonal(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None: ...
    def qubit_probabilities(self, qubit: int) -> tuple[float, float]: ...
    def collapse(self, qubit: int, outcome: int, probability: float) -> None: ...
    def reset(self, qubit: int, outcome: int, probability: float) -> None: ...
    def probabilities(self, qubits: Sequence[int]) -> np.ndarray: ...
    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator) -> np.ndarray: ...
    def save(self) -> Any: ...
    def restore(self, saved: Any) -> None: ...
    def release(self, saved: Any) -> None: ...
    def statevector(self) -> np.ndarray: ...


__all__ = ["Backend", "Footprint", "Pass"]
