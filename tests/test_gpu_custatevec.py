"""CPU tests of the cuStateVec backend against a strict NumPy emulation of the bindings
and of CuPy's device memory: workspace sizes depend on every argument their query takes
and are checked at apply, errors are `cuStateVecError` with the library's status codes,
the sampler's workspace is real, and device memory runs out where the numbers say."""

from __future__ import annotations

import ctypes
import enum
import inspect
import sys
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from qiskit import QuantumCircuit
from qiskit.circuit.library import GlobalPhaseGate
from qiskit.quantum_info import Statevector

from executors import ExecutorUnavailable
from executors.base import ErrorCode, JobError
from executors.gpu import custatevec_backend, runner
from executors.gpu.executor import GpuExecutor
from tests.test_gpu_numpy_backend import dynamic_suite, fidelity, random_circuits, run_one

try:  # the real error type and status codes where cuQuantum is installed
    from cuquantum.bindings.custatevec import Status, cuStateVecError
except ImportError:

    class Status(enum.IntEnum):  # type: ignore[no-redef]
        """custatevecStatus_t, as numbered in custatevec.h (cuStateVec 1.15)."""

        SUCCESS = 0
        NOT_INITIALIZED = 1
        ALLOC_FAILED = 2
        INVALID_VALUE = 3
        ARCH_MISMATCH = 4
        EXECUTION_FAILED = 5
        INTERNAL_ERROR = 6
        NOT_SUPPORTED = 7
        INSUFFICIENT_WORKSPACE = 8
        SAMPLER_NOT_PREPROCESSED = 9
        NO_DEVICE_ALLOCATOR = 10
        DEVICE_ALLOCATOR_ERROR = 11

    class cuStateVecError(Exception):  # type: ignore[no-redef]
        """Same constructor, attribute and message shape as the bindings' exception."""

        def __init__(self, status: int) -> None:
            self.status = status
            s = Status(status)
            super().__init__(f"{s.name} ({s.value}): emulated cuStateVec error")

        def __reduce__(self) -> tuple[Any, ...]:
            return (type(self), (self.status,))


# --- emulated device memory (CuPy) --------------------------------------------------------


class EmulatedDevice:
    """Device memory with a nominal capacity: allocations are real host buffers, counted
    against `capacity - used_elsewhere`; over it, CuPy's OutOfMemoryError."""

    def __init__(self, capacity: int = 8 << 30) -> None:
        self.capacity = capacity
        self.used_elsewhere = 2 << 30  # another process's share, as memGetInfo sees it
        self.allocated = 0
        self.allocations = 0
        self.refused = 0
        self.kernels = 0  # CuPy element-wise writes into device arrays
        self.ranges: dict[int, int] = {}  # live allocation start -> end
        self.OutOfMemoryError = type("OutOfMemoryError", (MemoryError,), {})

    def free(self) -> int:
        return self.capacity - self.used_elsewhere - self.allocated

    def empty(self, shape: Any, dtype: Any = np.float64) -> FakeDeviceArray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > self.free():
            self.refused += 1
            raise self.OutOfMemoryError(
                f"Out of memory allocating {nbytes:,} bytes (allocated so far: "
                f"{self.allocated:,} bytes)."
            )
        host = np.empty(shape, dtype=dtype)
        arr = host.view(FakeDeviceArray)
        arr.emulator = self
        start = int(host.ctypes.data)
        self.ranges[start] = start + max(nbytes, 1)
        self.allocated += nbytes
        self.allocations += 1
        weakref.finalize(host, self._release, start, nbytes)
        return arr

    def _release(self, start: int, nbytes: int) -> None:
        self.ranges.pop(start, None)
        self.allocated -= nbytes

    def holds(self, ptr: int, nbytes: int = 1) -> bool:
        return any(a <= ptr and ptr + nbytes <= b for a, b in self.ranges.items())


class _Ptr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class FakeDeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy array: `.data.ptr` is its host address; element-wise
    writes are counted as device kernels."""

    emulator: EmulatedDevice | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.emulator = getattr(obj, "emulator", None)

    @property
    def data(self) -> _Ptr:  # type: ignore[override]
        return _Ptr(int(self.ctypes.data))

    def set(self, host: np.ndarray) -> None:  # host-to-device copy, not a kernel
        np.copyto(np.asarray(self), host.reshape(self.shape))

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.emulator is not None:
            self.emulator.kernels += 1
        super().__setitem__(key, value)

    def __imul__(self, other: Any) -> FakeDeviceArray:  # type: ignore[misc]
        if self.emulator is not None:
            self.emulator.kernels += 1
        return super().__imul__(other)


class _Ctx:
    ptr = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Ctx:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


# --- emulated cuStateVec bindings ---------------------------------------------------------


class EmulatedCuStateVec:
    """The subset of cuquantum.bindings.custatevec the backend calls, on host memory, with
    the bindings' signatures and documented semantics (matrix bit j = targets[j],
    abs2sum/sampler bit j = bit_ordering[j], null permutation = diagonal only, collapse
    scales by 1/sqrt(norm)) and the library's checks: an extra workspace smaller than its
    size query says for the same arguments is INSUFFICIENT_WORKSPACE, and so is one that
    is not device memory; 0 targets, 0 index bits or 0 basis bits are INVALID_VALUE.

    The sizes themselves are this emulation's own (the real ones are measured on a GPU),
    chosen to depend on every argument the query takes: the matrix's location, the
    target positions, the control count, the sampler's state size and shot count."""

    MatrixLayout = types.SimpleNamespace(COL=0, ROW=1)
    ComputeType = types.SimpleNamespace(COMPUTE_32F=4, COMPUTE_64F=16)
    StateVectorType = types.SimpleNamespace(ZERO=0)
    SamplerOutput = types.SimpleNamespace(RANDNUM_ORDER=0)

    def __init__(self, device: EmulatedDevice) -> None:
        self.device = device
        self.Status = Status
        self.cuStateVecError = cuStateVecError
        self.calls: Counter[str] = Counter()
        self.samplers: dict[int, dict[str, Any]] = {}
        self.fail: dict[str, int] = {}  # function name -> status to raise once

    # sizes ---------------------------------------------------------------------------

    def matrix_workspace(self, on_device: bool, n_targets: int, n_controls: int) -> int:
        return (1024 * n_targets + (64 << 10) * n_controls) * (2 if on_device else 1)

    @staticmethod
    def diagonal_workspace(targets: list[int], n_controls: int) -> int:
        return 256 * (max(targets) + 1) + (64 << 10) * n_controls

    @staticmethod
    def sampler_workspace(n_index_bits: int, n_max_shots: int) -> int:
        # A real buffer the preprocessing writes: one cumulative sum per 2 amplitudes.
        return 8 * (1 << max(n_index_bits - 1, 0)) + 8 * n_max_shots

    # helpers -------------------------------------------------------------------------

    def _check(self, name: str, ok: bool = True, status: int = Status.INVALID_VALUE) -> None:
        self.calls[name] += 1
        injected = self.fail.pop(name, None)
        if injected is not None:
            raise cuStateVecError(injected)
        if not ok:
            raise cuStateVecError(status)

    def _check_workspace(self, ptr: int, size: int, need: int) -> None:
        if need == 0:
            return
        if size < need or ptr == 0 or not self.device.holds(ptr, need):
            raise cuStateVecError(Status.INSUFFICIENT_WORKSPACE)

    @staticmethod
    def _array(ptr: int, data_type: int, count: int) -> np.ndarray:
        dtype = np.complex64 if data_type == 4 else np.complex128
        raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype)

    @staticmethod
    def _ints(value: Any, count: int) -> list[int]:
        return [] if count == 0 or value == 0 else [int(v) for v in value]

    def _apply(
        self,
        sv: int,
        sv_data_type: int,
        n: int,
        matrix: np.ndarray,
        targets: list[int],
        controls: list[int],
        values: list[int],
    ) -> None:
        state = self._array(sv, sv_data_type, 1 << n)
        idx = np.arange(1 << n)
        keep = np.ones(1 << n, dtype=bool)
        for c, v in zip(controls, values or [1] * len(controls), strict=True):
            keep &= ((idx >> c) & 1) == v
        for t in targets:
            keep &= ((idx >> t) & 1) == 0
        base = idx[keep]
        offsets = np.array(
            [
                sum(((j >> b) & 1) << t for b, t in enumerate(targets))
                for j in range(1 << len(targets))
            ]
        )
        gather = base[:, None] + offsets[None, :]
        state[gather] = state[gather] @ matrix.T

    def _marginal(self, sv: int, sv_data_type: int, n: int, ordering: list[int]) -> np.ndarray:
        probs = np.abs(self._array(sv, sv_data_type, 1 << n)) ** 2
        idx = np.arange(1 << n)
        key = np.zeros(1 << n, dtype=np.int64)
        for j, q in enumerate(ordering):
            key |= ((idx >> q) & 1) << j
        return np.bincount(key, weights=probs, minlength=1 << len(ordering))

    # the bindings ----------------------------------------------------------------------

    def create(self) -> int:
        return 1

    def destroy(self, handle: int) -> None:
        self.calls["destroy"] += 1

    def set_stream(self, handle: int, stream_id: int) -> None:
        return None

    def initialize_state_vector(
        self, handle: int, sv: int, sv_data_type: int, n_index_bits: int, sv_type: int
    ) -> None:
        self._check("initialize_state_vector", n_index_bits > 0)
        state = self._array(sv, sv_data_type, 1 << n_index_bits)
        state[:] = 0
        state[0] = 1

    def apply_matrix_get_workspace_size(
        self,
        handle: int,
        sv_data_type: int,
        n_index_bits: int,
        matrix: int,
        matrix_data_type: int,
        layout: int,
        adjoint: int,
        n_targets: int,
        n_controls: int,
        compute_type: int,
    ) -> int:
        self._check("apply_matrix_get_workspace_size", n_targets > 0 and n_index_bits > 0)
        return self.matrix_workspace(self.device.holds(matrix), n_targets, n_controls)

    def apply_matrix(
        self,
        handle: int,
        sv: int,
        sv_data_type: int,
        n_index_bits: int,
        matrix: int,
        matrix_data_type: int,
        layout: int,
        adjoint: int,
        targets: Any,
        n_targets: int,
        controls: Any,
        control_bit_values: Any,
        n_controls: int,
        compute_type: int,
        extra_workspace: int,
        extra_workspace_size_in_bytes: int,
    ) -> None:
        self._check("apply_matrix", n_targets > 0 and n_index_bits > 0)
        need = self.matrix_workspace(self.device.holds(matrix), n_targets, n_controls)
        self._check_workspace(extra_workspace, extra_workspace_size_in_bytes, need)
        assert matrix_data_type == sv_data_type
        assert compute_type == (4 if sv_data_type == 4 else 16)
        dim = 1 << n_targets
        m = self._array(matrix, matrix_data_type, dim * dim).reshape(dim, dim).astype(complex)
        if layout == self.MatrixLayout.COL:
            m = m.T
        if adjoint:
            m = m.conj().T
        self._apply(
            sv,
            sv_data_type,
            n_index_bits,
            m,
            self._ints(targets, n_targets),
            self._ints(controls, n_controls),
            self._ints(control_bit_values, n_controls),
        )

    def apply_generalized_permutation_matrix_get_workspace_size(
        self,
        handle: int,
        sv_data_type: int,
        n_index_bits: int,
        permutation: Any,
        diagonals: int,
        diagonals_data_type: int,
        targets: Any,
        n_targets: int,
        n_controls: int,
    ) -> int:
        name = "apply_generalized_permutation_matrix_get_workspace_size"
        self._check(name, n_targets > 0 and n_index_bits > 0)
        return self.diagonal_workspace(self._ints(targets, n_targets), n_controls)

    def apply_generalized_permutation_matrix(
        self,
        handle: int,
        sv: int,
        sv_data_type: int,
        n_index_bits: int,
        permutation: Any,
        diagonals: int,
        diagonals_data_type: int,
        adjoint: int,
        targets: Any,
        n_targets: int,
        controls: Any,
        control_bit_values: Any,
        n_controls: int,
        extra_workspace: int,
        extra_workspace_size_in_bytes: int,
    ) -> None:
        self._check("apply_generalized_permutation_matrix", n_targets > 0 and n_index_bits > 0)
        target_list = self._ints(targets, n_targets)
        need = self.diagonal_workspace(target_list, n_controls)
        self._check_workspace(extra_workspace, extra_workspace_size_in_bytes, need)
        assert permutation == 0
        d = self._array(diagonals, diagonals_data_type, 1 << n_targets).astype(complex)
        self._apply(
            sv,
            sv_data_type,
            n_index_bits,
            np.diag(d.conj() if adjoint else d),
            target_list,
            self._ints(controls, n_controls),
            self._ints(control_bit_values, n_controls),
        )

    def abs2sum_array(
        self,
        handle: int,
        sv: int,
        sv_data_type: int,
        n_index_bits: int,
        abs2sum: int,
        bit_ordering: Any,
        bit_ordering_len: int,
        mask_bit_string: Any,
        mask_ordering: Any,
        mask_len: int,
    ) -> None:
        self._check("abs2sum_array", n_index_bits > 0 and mask_len == 0)
        out = np.frombuffer(
            (ctypes.c_double * (1 << bit_ordering_len)).from_address(abs2sum), dtype=np.float64
        )
        out[:] = self._marginal(sv, sv_data_type, n_index_bits, list(bit_ordering))

    def collapse_on_z_basis(
        self,
        handle: int,
        sv: int,
        sv_data_type: int,
        n_index_bits: int,
        parity: int,
        basis_bits: Any,
        n_basis_bits: int,
        norm: float,
    ) -> None:
        self._check("collapse_on_z_basis", n_basis_bits > 0 and parity in (0, 1) and norm > 0)
        state = self._array(sv, sv_data_type, 1 << n_index_bits)
        idx = np.arange(1 << n_index_bits)
        bits = np.zeros(1 << n_index_bits, dtype=np.int64)
        for b in self._ints(basis_bits, n_basis_bits):
            bits ^= (idx >> b) & 1
        state[bits != parity] = 0
        state[bits == parity] *= 1.0 / np.sqrt(norm)

    def sampler_create(
        self, handle: int, sv: int, sv_data_type: int, n_index_bits: int, n_max_shots: int
    ) -> tuple[int, int]:
        self._check("sampler_create", n_index_bits > 0 and n_max_shots > 0)
        sampler = len(self.samplers) + 1 + max(self.samplers, default=0)
        size = self.sampler_workspace(n_index_bits, n_max_shots)
        self.samplers[sampler] = {
            "sv": sv,
            "type": sv_data_type,
            "n": n_index_bits,
            "max_shots": n_max_shots,
            "size": size,
            "cdf": None,
        }
        return sampler, size

    def sampler_preprocess(
        self, handle: int, sampler: int, extra_workspace: int, extra_workspace_size_in_bytes: int
    ) -> None:
        self._check("sampler_preprocess")
        s = self.samplers[sampler]
        self._check_workspace(extra_workspace, extra_workspace_size_in_bytes, s["size"])
        # The cumulative sums live in the caller's workspace, as the library's do.
        half = 1 << max(s["n"] - 1, 0)
        cdf = np.frombuffer((ctypes.c_double * half).from_address(extra_workspace), np.float64)
        probs = np.abs(self._array(s["sv"], s["type"], 1 << s["n"])) ** 2
        cdf[:] = np.cumsum(probs.reshape(half, -1).sum(axis=1))
        s["cdf"] = cdf

    def sampler_sample(
        self,
        handle: int,
        sampler: int,
        bit_strings: int,
        bit_ordering: Any,
        bit_string_len: int,
        randnums: Any,
        n_shots: int,
        output: int,
    ) -> None:
        s = self.samplers[sampler]
        self._check("sampler_sample", n_shots <= s["max_shots"])
        if s["cdf"] is None:
            raise cuStateVecError(Status.SAMPLER_NOT_PREPROCESSED)
        probs = self._marginal(s["sv"], s["type"], s["n"], list(bit_ordering))
        rnd = np.frombuffer((ctypes.c_double * n_shots).from_address(randnums), dtype=np.float64)
        cdf = np.cumsum(probs)
        out = np.frombuffer((ctypes.c_int64 * n_shots).from_address(bit_strings), dtype=np.int64)
        out[:] = np.minimum(np.searchsorted(cdf, rnd * cdf[-1], side="right"), len(probs) - 1)

    def sampler_destroy(self, sampler: int) -> None:
        del self.samplers[sampler]


def fake_cuda_modules(emulated: EmulatedCuStateVec, device_count: int = 1) -> dict[str, Any]:
    device = emulated.device
    cupy = types.ModuleType("cupy")

    def get_device_count() -> int:
        if device_count < 0:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return device_count

    pool = types.SimpleNamespace(free_bytes=lambda: 0, free_all_blocks=lambda: None)
    cupy.empty = device.empty  # type: ignore[attr-defined]
    cupy.empty_like = lambda a: device.empty(a.shape, a.dtype)  # type: ignore[attr-defined]
    cupy.copyto = lambda dst, src: np.copyto(np.asarray(dst), src)  # type: ignore[attr-defined]
    cupy.multiply = np.multiply  # type: ignore[attr-defined]
    cupy.asnumpy = lambda a, stream=None: np.array(a)  # type: ignore[attr-defined]
    cupy.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Device=_Ctx,
        Stream=_Ctx,
        runtime=types.SimpleNamespace(
            getDeviceCount=get_device_count,
            memGetInfo=lambda: (device.free(), device.capacity),
            getDeviceProperties=lambda i: {"name": b"Emulated GPU", "totalGlobalMem": 8 << 30},
        ),
        memory=types.SimpleNamespace(OutOfMemoryError=device.OutOfMemoryError),
    )
    cuquantum = types.ModuleType("cuquantum")
    bindings = types.ModuleType("cuquantum.bindings")
    bindings.custatevec = emulated  # type: ignore[attr-defined]
    cuquantum.bindings = bindings  # type: ignore[attr-defined]
    cuquantum.cudaDataType = types.SimpleNamespace(CUDA_C_32F=4, CUDA_C_64F=5)  # type: ignore[attr-defined]
    return {
        "cupy": cupy,
        "cuquantum": cuquantum,
        "cuquantum.bindings": bindings,
        "cuquantum.bindings.custatevec": emulated,
    }


def install(mp: pytest.MonkeyPatch, emu: EmulatedCuStateVec, device_count: int = 1) -> None:
    for name, module in fake_cuda_modules(emu, device_count).items():
        mp.setitem(sys.modules, name, module)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCuStateVec]:
    emu = EmulatedCuStateVec(EmulatedDevice())
    install(monkeypatch, emu)
    yield emu


def statevector_close(ex: GpuExecutor, qc: QuantumCircuit, tol: float = 1e-10) -> bool:
    return bool(np.allclose(ex.statevector(qc), Statevector(qc).data, atol=tol))


# --- availability -------------------------------------------------------------------------


def test_no_device_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, EmulatedCuStateVec(EmulatedDevice()), device_count=-1)
    with pytest.raises(ExecutorUnavailable) as err:
        GpuExecutor({})
    assert "no CUDA device is visible" in str(err.value)
    assert "nvidia-smi" in str(err.value)
    install(monkeypatch, EmulatedCuStateVec(EmulatedDevice()), device_count=1)
    with pytest.raises(ExecutorUnavailable) as err:
        GpuExecutor({"device_id": 3})
    assert "device_id 3" in str(err.value)


# --- plumbing -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(random_circuits(max_qubits=6, max_gates=20))
def test_custatevec_backend_plumbing_on_emulated_library(qc: QuantumCircuit) -> None:
    emu = EmulatedCuStateVec(EmulatedDevice())
    with pytest.MonkeyPatch.context() as mp:
        install(mp, emu)
        for precision, tol in (("double", 1e-10), ("single", 1e-5)):
            ex = GpuExecutor({"precision": precision, "fusion_max_qubits": 3})
            assert ex.capabilities().device == "Emulated GPU (cuda:0)"
            assert fidelity(ex.statevector(qc), Statevector(qc).data) >= 1 - tol
            ex.close()


def test_dynamic_circuits_match_the_numpy_backend(emulated: EmulatedCuStateVec) -> None:
    for index, qc in enumerate(dynamic_suite()[:4]):
        gpu = run_one(GpuExecutor({"seed": 8, "max_saved_states": index % 2}), qc, 2000)
        cpu = run_one(
            GpuExecutor({"backend": "numpy", "seed": 8, "max_saved_states": index % 2}), qc, 2000
        )
        # Same seed, same draws, same probabilities up to rounding: identical counts.
        assert gpu.counts == cpu.counts
    # The suite has dense gates, diagonal gates (cp, rz in the teleport), measurements.
    assert emulated.calls["apply_matrix"] > 0
    assert emulated.calls["apply_generalized_permutation_matrix"] > 0
    assert emulated.calls["collapse_on_z_basis"] > 0


def test_wide_measurements_use_the_sampler_with_its_workspace(
    emulated: EmulatedCuStateVec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "MAX_MARGINAL_QUBITS", 0)
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.x(2)
    qc.measure([0, 1, 2], [2, 0, 1])
    res = run_one(GpuExecutor({"seed": 2}), qc, 1000, memory=True)
    assert emulated.calls["sampler_preprocess"] == 1 and emulated.calls["sampler_sample"] == 1
    assert set(res.counts) == {"010", "111"}
    assert Counter(res.memory) == Counter(res.counts)
    assert not emulated.samplers  # destroyed


def test_capabilities_and_admission_use_device_memory(emulated: EmulatedCuStateVec) -> None:
    ex = GpuExecutor({"precision": "double"})
    caps = ex.capabilities()
    assert caps.memory_bytes == 8 << 30 and caps.meas_levels == (2,)
    assert caps.max_qubits == 28  # 4 GiB state + workspace + margin fit 8 GiB; 29 does not
    assert caps.extra["free_memory_bytes"] == emulated.device.free()
    qc = QuantumCircuit(29, 1)
    qc.measure(0, 0)
    with pytest.raises(JobError) as err:
        run_one(ex, qc, 1)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    assert err.value.details["required_bytes"] > err.value.details["available_bytes"]
    assert emulated.device.allocations == 0  # refused before any device allocation


# --- issue 12, item 1: workspace by every argument of its query ---------------------------


def test_diagonal_workspace_is_queried_for_the_target_positions(
    emulated: EmulatedCuStateVec,
) -> None:
    ex = GpuExecutor({"fusion_max_qubits": 1})
    first = QuantumCircuit(6)
    first.rz(0.3, 0)
    second = QuantumCircuit(6)
    second.rz(0.3, 5)  # same target count, a larger workspace
    assert statevector_close(ex, first)
    assert statevector_close(ex, second)  # was INSUFFICIENT_WORKSPACE
    assert emulated.calls["apply_generalized_permutation_matrix"] == 2


def test_matrix_workspace_is_queried_for_the_device_matrix(
    emulated: EmulatedCuStateVec,
) -> None:
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.ry(0.4, 1)
    qc.cx(1, 2)  # a controlled pass: its workspace counts its control
    ex = GpuExecutor({"fusion_max_qubits": 1})
    assert statevector_close(ex, qc)  # the apply uses device matrices from the arena


def test_reset_on_device_reuses_no_stale_workspace(emulated: EmulatedCuStateVec) -> None:
    # A reset to |0> after outcome 1 applies a host X: its own query, by location.
    qc = QuantumCircuit(2, 2)
    qc.x(0)
    qc.reset(0)
    qc.h(1)
    qc.measure([0, 1], [0, 1])
    counts = run_one(GpuExecutor({"seed": 4}), qc, 400).counts
    assert set(counts) <= {"00", "10"} and sum(counts.values()) == 400


# --- item 2: out of memory from cuStateVec is QUOTA_EXCEEDED with the numbers ---------------


@pytest.mark.parametrize("status", [Status.ALLOC_FAILED, Status.INSUFFICIENT_WORKSPACE])
def test_custatevec_out_of_memory_is_quota_exceeded(
    emulated: EmulatedCuStateVec, status: int
) -> None:
    qc = QuantumCircuit(4, 1)
    qc.h(range(4))
    qc.measure(0, 0)
    emulated.fail["apply_matrix"] = status
    with pytest.raises(JobError) as err:
        run_one(GpuExecutor({"fusion_max_qubits": 1}), qc, 10)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    details = err.value.details
    assert details["num_qubits"] == 4 and details["required_bytes"] > 0
    assert details["available_bytes"] > 0 and details["total_bytes"] == 8 << 30
    assert Status(status).name in err.value.message


def test_other_custatevec_errors_are_job_failed(emulated: EmulatedCuStateVec) -> None:
    qc = QuantumCircuit(2, 1)
    qc.h(0)
    qc.measure(0, 0)
    emulated.fail["apply_matrix"] = Status.EXECUTION_FAILED
    with pytest.raises(JobError) as err:
        run_one(GpuExecutor({}), qc, 10)
    assert err.value.code == ErrorCode.JOB_FAILED
    assert "EXECUTION_FAILED" in err.value.message


def test_cupy_out_of_memory_mid_run_is_quota_exceeded(emulated: EmulatedCuStateVec) -> None:
    ex = GpuExecutor({"seed": 1})
    qc = QuantumCircuit(8, 1)
    qc.h(range(8))
    qc.measure(0, 0)
    emulated.device.used_elsewhere = emulated.device.capacity  # everything gone mid-job
    original = ex._admit
    ex._admit = lambda *args: 0  # type: ignore[method-assign]  # let it past admission
    try:
        with pytest.raises(JobError) as err:
            run_one(ex, qc, 10)
    finally:
        ex._admit = original  # type: ignore[method-assign]
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    assert err.value.details["required_bytes"] > err.value.details["available_bytes"]


# --- item 3: admission counts the arena, controlled workspace and the sampler ---------------


def tight(emu: EmulatedCuStateVec, free: int) -> None:
    # Free as the backend sees it: the device's free bytes plus what the backend holds.
    emu.device.used_elsewhere = emu.device.capacity - free


def old_estimate(n: int, itemsize: int = 16) -> int:
    # What admission counted before: state, one uncontrolled workspace, margin, state/64.
    state = (1 << n) * itemsize
    return state + 2048 * 10 + custatevec_backend.MARGIN_BYTES + state // 64


def test_admission_counts_the_matrix_arena(emulated: EmulatedCuStateVec) -> None:
    n = 10
    qc = QuantumCircuit(n, 1)
    for layer in range(3):
        for q in range(n):
            qc.ry(0.1 * (q + layer), q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    qc.measure(0, 0)
    ex = GpuExecutor({"fusion_max_qubits": 10})
    tight(emulated, old_estimate(n) + (1 << 20))  # the fused 2^20-entry matrix is 16 MiB
    with pytest.raises(JobError) as err:
        run_one(ex, qc, 10)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    parts = err.value.details["required_by_part"]
    assert parts["matrices"] >= (1 << 20) * 16
    assert emulated.calls["initialize_state_vector"] == 0  # refused before the state
    assert emulated.device.refused == 0  # ... and before any allocation failed


def test_admission_counts_workspace_of_controlled_passes(emulated: EmulatedCuStateVec) -> None:
    n = 6
    qc = QuantumCircuit(n, 1)
    qc.h(0)
    qc.mcx(list(range(5)), 5)  # 1 target, 5 controls: 5 x 64 KiB x 2 in the emulation
    qc.measure(0, 0)
    ex = GpuExecutor({"fusion_max_qubits": 1})
    tight(emulated, old_estimate(n) + (64 << 10))
    with pytest.raises(JobError) as err:
        run_one(ex, qc, 10)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    assert err.value.details["required_by_part"]["workspace"] >= 5 * (64 << 10)
    assert emulated.calls["initialize_state_vector"] == 0 and emulated.device.refused == 0


def test_admission_counts_the_sampler_workspace(
    emulated: EmulatedCuStateVec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "MAX_MARGINAL_QUBITS", 0)
    n = 16
    qc = QuantumCircuit(n, n)
    qc.h(range(n))
    qc.measure(range(n), range(n))
    ex = GpuExecutor({"seed": 1, "fusion_max_qubits": 1})
    run_one(ex, qc, 100)  # learns the sampler's real workspace for (16 qubits, 100 shots)
    sampler = EmulatedCuStateVec.sampler_workspace(n, 100)
    applied = emulated.calls["apply_matrix"]
    state = (1 << n) * 16
    # Room for what admission counted before (state/64 covered "the sampler"), not more.
    tight(emulated, state + custatevec_backend.MARGIN_BYTES + state // 64 + (32 << 10))
    assert sampler > state // 64 + (32 << 10)
    with pytest.raises(JobError) as err:
        run_one(ex, qc, 100)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    assert err.value.details["required_by_part"]["workspace"] >= sampler
    assert emulated.calls["apply_matrix"] == applied  # refused before the first pass


def test_statevector_checks_host_memory_first(
    emulated: EmulatedCuStateVec, monkeypatch: pytest.MonkeyPatch
) -> None:
    import executors.gpu.executor as executor_module

    qc = QuantumCircuit(12)
    qc.h(0)
    monkeypatch.setattr(executor_module, "available_host_memory", lambda: 1 << 15, raising=False)
    with pytest.raises(JobError) as err:
        GpuExecutor({}).statevector(qc)
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    assert err.value.details["required_bytes"] == (1 << 12) * 16
    assert "host memory" in err.value.message
    assert emulated.calls["initialize_state_vector"] == 0


# --- item 4: nothing with zero targets or zero index bits reaches cuStateVec --------------


def test_global_phase_gates_never_reach_the_library(emulated: EmulatedCuStateVec) -> None:
    qc = QuantumCircuit(3)
    qc.h([0, 1, 2])
    qc.append(GlobalPhaseGate(0.7), [])
    qc.append(GlobalPhaseGate(0.3).control(2, ctrl_state=1), [0, 2])  # a phase on |c=01>
    qc.global_phase = 0.2
    for k in (0, 3):
        assert statevector_close(GpuExecutor({"fusion_max_qubits": k}), qc)


def test_zero_qubit_circuits_run_on_the_host(emulated: EmulatedCuStateVec) -> None:
    qc = QuantumCircuit(0, 2)
    qc.global_phase = 0.5
    ex = GpuExecutor({"seed": 0})
    assert np.allclose(ex.statevector(qc), [np.exp(0.5j)])
    assert run_one(ex, qc, 5).counts == {"00": 5}
    assert emulated.calls["initialize_state_vector"] == 0


# --- item 5: a mid-circuit measurement is one abs2sum and one collapse ---------------------


def test_mid_circuit_measurement_collapses_in_the_library(emulated: EmulatedCuStateVec) -> None:
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure(0, 0)
    qc.h(0)
    qc.reset(1)
    qc.measure([0, 1, 2], [0, 1, 2])
    probe = emulated.device.empty(4, np.complex128)
    probe[:2] = 0  # a CuPy-side pass over device memory, as the old collapse made
    probe.reshape(2, 2)[:, 1] *= 2
    assert emulated.device.kernels >= 2  # (an augmented item assignment counts twice)
    emulated.device.kernels = 0
    ex = GpuExecutor({"seed": 5, "max_saved_states": 4})
    counts = run_one(ex, qc, 1000).counts
    assert set(counts) <= {"000", "001", "010", "011"}  # clbit 1 is the reset qubit: 0
    assert all(key[1] == "0" for key in counts)
    events = emulated.calls["collapse_on_z_basis"]
    # One collapse per measure/reset per branch, and no CuPy pass over the state for it.
    assert events >= 2 and emulated.calls["abs2sum_array"] >= events
    assert emulated.device.kernels == 0


# --- the emulation against the real bindings, where they are installed --------------------


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("cuquantum") is None,
    reason="cuquantum not installed: cannot compare the emulation's signatures",
)
def test_emulation_signatures_match_cuquantum() -> None:  # pragma: no cover - needs the extra
    from cuquantum.bindings import custatevec

    emu = EmulatedCuStateVec(EmulatedDevice())
    names: list[str] = [
        "apply_matrix",
        "apply_matrix_get_workspace_size",
        "apply_generalized_permutation_matrix",
        "apply_generalized_permutation_matrix_get_workspace_size",
        "abs2sum_array",
        "collapse_on_z_basis",
        "initialize_state_vector",
        "sampler_create",
        "sampler_preprocess",
        "sampler_sample",
        "sampler_destroy",
    ]
    for name in names:
        real = list(inspect.signature(getattr(custatevec, name)).parameters)
        fake_fn: Callable[..., Any] = getattr(emu, name)
        assert real == list(inspect.signature(fake_fn).parameters), name
    for status in ("ALLOC_FAILED", "INSUFFICIENT_WORKSPACE", "INVALID_VALUE"):
        assert int(getattr(custatevec.Status, status)) == int(getattr(Status, status))
