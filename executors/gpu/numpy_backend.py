"""NumPy state-vector kernels and the NumPy backend: the same interface as the cuStateVec
backend (`backend.Backend`), so lowering, fusion and measurement run and are tested on
the CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from executors.gpu.backend import Footprint

# The state is kept as a tensor of shape (2,)*n (C order), so qubit q lives on axis
# n-1-q; kernels also accept trailing batch axes (fusion multiplies matrices this way).


def _axis(num_qubits: int, qubit: int) -> int:
    return num_qubits - 1 - qubit


def _control_index(
    ndim: int, num_qubits: int, controls: Sequence[int], ctrl_values: Sequence[int]
) -> tuple[Any, ...]:
    index: list[Any] = [slice(None)] * ndim
    for qubit, value in zip(controls, ctrl_values, strict=True):
        index[_axis(num_qubits, qubit)] = int(value)
    return tuple(index)


def _target_axes(num_qubits: int, targets: Sequence[int], controls: Sequence[int]) -> list[int]:
    # Axes of the targets once the control axes have been sliced away.
    out = []
    for t in targets:
        axis = _axis(num_qubits, t)
        out.append(axis - sum(1 for c in controls if _axis(num_qubits, c) < axis))
    return out


def _dense_on_axes(tensor: np.ndarray, matrix: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    k = len(axes)
    m = matrix.reshape((2,) * (2 * k))
    # Row/column axis a of the reshaped matrix is target k-1-a (matrix bit j = target j).
    contracted = [axes[k - 1 - a] for a in range(k)]
    out = np.tensordot(m, tensor, axes=(list(range(k, 2 * k)), contracted))
    return np.moveaxis(out, list(range(k)), contracted)


def apply_dense(
    tensor: np.ndarray,
    num_qubits: int,
    matrix: np.ndarray,
    targets: Sequence[int],
    controls: Sequence[int] = (),
    ctrl_values: Sequence[int] = (),
) -> np.ndarray:
    """Apply a 2^k x 2^k matrix on `targets` where the controls match; returns the
    updated tensor (a new array when uncontrolled, `tensor` itself otherwise)."""
    if not controls:
        return _dense_on_axes(tensor, matrix, [_axis(num_qubits, t) for t in targets])
    index = _control_index(tensor.ndim, num_qubits, controls, ctrl_values)
    sub = tensor[index]
    tensor[index] = _dense_on_axes(sub, matrix, _target_axes(num_qubits, targets, controls))
    return tensor


def apply_diagonal(
    tensor: np.ndarray,
    num_qubits: int,
    diagonal: np.ndarray,
    targets: Sequence[int],
    controls: Sequence[int] = (),
    ctrl_values: Sequence[int] = (),
) -> np.ndarray:
    """Multiply in place by a diagonal on `targets` where the controls match."""
    k = len(targets)
    if controls:
        index = _control_index(tensor.ndim, num_qubits, controls, ctrl_values)
        view = tensor[index]
        axes = _target_axes(num_qubits, targets, controls)
    else:
        view = tensor
        axes = [_axis(num_qubits, t) for t in targets]
    d = diagonal.reshape((2,) * k)
    d_axes = [axes[k - 1 - a] for a in range(k)]  # tensor axis of each axis of d
    order = np.argsort(d_axes)
    shape = [1] * view.ndim
    for axis in d_axes:
        shape[axis] = 2
    view *= d.transpose(order).reshape(shape)
    return tensor


def marginal_probabilities(probs: np.ndarray, num_qubits: int, qubits: Sequence[int]) -> np.ndarray:
    """Sum |amp|^2 over all but `qubits`; bit j of the result index is qubits[j]."""
    keep = [_axis(num_qubits, q) for q in reversed(qubits)]
    rest = [a for a in range(num_qubits) if a not in keep]
    out = probs.transpose(keep + rest).reshape(1 << len(qubits), -1).sum(axis=1)
    return np.asarray(out, dtype=np.float64)


def sample_from(probs: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `shots` indices from an (unnormalised) distribution by inverse CDF, the way
    cuStateVec's sampler does: one sorted pass over the cumulative sum."""
    cdf = np.cumsum(probs, dtype=np.float64)
    total = cdf[-1]
    draws = rng.random(shots) * total
    out = np.searchsorted(cdf, draws, side="right")
    return np.minimum(out, len(probs) - 1).astype(np.int64)


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of this host's memory, as the kernel reports them; an
    OSError where it cannot be read (no figure is made up for it)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("MemAvailable", "MemTotal"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if len(fields) == 2:
        return fields["MemAvailable"], fields["MemTotal"]
    try:
        page = int(os.sysconf("SC_PAGE_SIZE"))
        return (int(os.sysconf("SC_AVPHYS_PAGES")) * page,
                int(os.sysconf("SC_PHYS_PAGES")) * page)
    except (ValueError, OSError, AttributeError) as exc:
        raise OSError(f"cannot read this host's memory (/proc/meminfo, sysconf): {exc}") from None


def available_host_memory() -> int:
    return host_memory()[0]


class NumpyBackend:
    """CPU state-vector backend; implements `backend.Backend`."""

    name = "numpy"
    # tensordot allocates a result the size of the state, so a gate needs ~3 states.
    TEMPORARY_STATES = 2

    def __init__(self, precision: str = "double") -> None:
        self.precision = precision
        self.dtype = np.dtype(np.complex64 if precision == "single" else np.complex128)
        self.num_qubits = 0
        self._psi = np.ones((), dtype=self.dtype)

    # --- lifetime -----------------------------------------------------------------

    def device_name(self) -> str:
        return "cpu (numpy)"

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes this backend can use: the host's available memory (plus
        the state it holds already) and the host's total."""
        available, total = host_memory()
        return available + self.held_bytes(), total

    def held_bytes(self) -> int:
        return int(self._psi.nbytes)

    def state_bytes(self, num_qubits: int) -> int:
        return (1 << num_qubits) * self.dtype.itemsize

    def required_bytes(
        self, footprint: Footprint, refs: Sequence[Any] | None = None
    ) -> Mapping[str, int]:
        state = self.state_bytes(footprint.num_qubits)
        return {
            "state": state,
            "temporaries": state * self.TEMPORARY_STATES,
            "matrices": footprint.matrix_elements * self.dtype.itemsize,
        }

    def statevector_host_bytes(self, num_qubits: int) -> int:
        # The state is already on the host; only a single-precision one is widened.
        return 0 if self.dtype == np.complex128 else (1 << num_qubits) * 16

    def out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError)

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        self._psi = np.ones((), dtype=self.dtype)
        self.num_qubits = 0

    # --- state ----------------------------------------------------------------------

    def reset_state(self, num_qubits: int) -> None:
        self.num_qubits = num_qubits
        psi = np.zeros((2,) * num_qubits, dtype=self.dtype)
        psi[(0,) * num_qubits] = 1
        self._psi = psi

    def upload(self, matrices: Sequence[np.ndarray]) -> list[Any]:
        return [np.ascontiguousarray(m, dtype=self.dtype) for m in matrices]

    def apply_matrix(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None:
        self._psi = apply_dense(self._psi, self.num_qubits, ref, targets, controls, ctrl_values)

    def apply_diagonal(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None:
        apply_diagonal(self._psi, self.num_qubits, ref, targets, controls, ctrl_values)

    def _slices(self, qubit: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        axis = _axis(self.num_qubits, qubit)
        zero: list[Any] = [slice(None)] * self.num_qubits
        one: list[Any] = [slice(None)] * self.num_qubits
        zero[axis], one[axis] = 0, 1
        return tuple(zero), tuple(one)

    def qubit_probabilities(self, qubit: int) -> tuple[float, float]:
        zero, one = self._slices(qubit)
        p0 = float(np.vdot(self._psi[zero], self._psi[zero]).real)
        p1 = float(np.vdot(self._psi[one], self._psi[one]).real)
        return p0, p1

    def collapse(self, qubit: int, outcome: int, probability: float) -> None:
        zero, one = self._slices(qubit)
        keep, drop = (one, zero) if outcome else (zero, one)
        self._psi[drop] = 0
        self._psi[keep] *= 1.0 / np.sqrt(probability)

    def reset(self, qubit: int, outcome: int, probability: float) -> None:
        """Collapse onto `outcome`, then move the qubit to |0>."""
        zero, one = self._slices(qubit)
        scale = 1.0 / np.sqrt(probability)
        if outcome:
            self._psi[zero] = self._psi[one] * scale
        else:
            self._psi[zero] *= scale
        self._psi[one] = 0

    def probabilities(self, qubits: Sequence[int]) -> np.ndarray:
        probs = np.abs(self._psi) ** 2
        return marginal_probabilities(probs, self.num_qubits, qubits)

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator) -> np.ndarray:
        return sample_from(self.probabilities(qubits), shots, rng)

    def save(self) -> Any:
        return self._psi.copy()

    def restore(self, saved: Any) -> None:
        # A saved state may be restored more than once (the shared prefix), so copy it.
        self._psi = saved.copy()

    def release(self, saved: Any) -> None:
        del saved

    def statevector(self) -> np.ndarray:
        return np.asarray(self._psi, dtype=np.complex128).reshape(-1)


__all__ = [
    "NumpyBackend",
    "apply_dense",
    "apply_diagonal",
    "available_host_memory",
    "host_memory",
    "marginal_probabilities",
    "sample_from",
]
