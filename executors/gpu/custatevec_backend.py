"""cuStateVec + CuPy backend (`backend.Backend`): one handle, stream, state buffer,
workspace and matrix arena per executor, grown as needed and reused across jobs. Imported
only when a GpuExecutor is constructed with backend="custatevec"."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from executors import ExecutorUnavailable
from executors.gpu.backend import Footprint, Pass

INSTALL_HINT = "pip install 'qpi-driver[gpu]'"
# cudaDataType_t values (C ABI constants), used if cuquantum does not export the enum.
_CUDA_C_32F = 4
_CUDA_C_64F = 5
# Headroom kept free beyond state, matrices and workspace: the library context's own
# workspace, cuBLAS handles, CUDA context growth and allocator rounding.
MARGIN_BYTES = 256 << 20
# The sampler's workspace is known only from sampler_create, which needs a state buffer;
# until one size has been seen, admission assumes this fraction of the state.
SAMPLER_ESTIMATE_FRACTION = 64
# cuStateVec statuses that mean memory ran out (custatevec.h, custatevecStatus_t).
_OUT_OF_MEMORY_STATUSES = ("ALLOC_FAILED", "INSUFFICIENT_WORKSPACE", "DEVICE_ALLOCATOR_ERROR")
_PAULI_X = np.array([[0, 1], [1, 0]])


def probe(device_id: int) -> tuple[Any, Any, Any]:
    """Import CuPy and cuStateVec and check the device; ExecutorUnavailable says which
    part is missing and how to fix it."""
    hint_extra = (
        f"install the extra with {INSTALL_HINT} (CUDA 13 wheels cupy-cuda13x and "
        "cuquantum-python-cu13; scripts/fetch_gpu_wheels.sh downloads them for an offline "
        "install), or run this executor on the CPU with the option backend='numpy'"
    )
    try:
        import cupy
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"the gpu executor needs CuPy and cuQuantum, but CuPy is not installed ({exc}); "
            + hint_extra
        ) from exc
    try:
        import cuquantum
        from cuquantum.bindings import custatevec
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"the gpu executor needs CuPy and cuQuantum, but cuQuantum (cuStateVec) is not "
            f"installed ({exc}); " + hint_extra
        ) from exc
    hint_device = (
        "the gpu executor needs an NVIDIA GPU with a driver that supports CUDA 13: check "
        "`nvidia-smi`, the driver version and CUDA_VISIBLE_DEVICES, or run on the CPU with "
        "the option backend='numpy'"
    )
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        raise ExecutorUnavailable(f"no CUDA device is visible ({exc}); {hint_device}") from exc
    if count == 0:
        raise ExecutorUnavailable(f"no CUDA device is visible; {hint_device}")
    if device_id >= count:
        raise ExecutorUnavailable(
            f"device_id {device_id} is not visible: this process sees {count} CUDA "
            f"device(s), numbered from 0 (check CUDA_VISIBLE_DEVICES)"
        )
    return cupy, custatevec, getattr(cuquantum, "cudaDataType", None)


class CuStateVecBackend:
    """State vector on one GPU, updated in place through cuStateVec."""

    name = "custatevec"

    def __init__(self, precision: str, device_id: int) -> None:
        cp, cusv, data_type = probe(device_id)
        self._cp = cp
        self._cusv = cusv
        self.precision = precision
        single = precision == "single"
        self.dtype = np.dtype(np.complex64 if single else np.complex128)
        if data_type is not None:
            self._sv_type = int(data_type.CUDA_C_32F if single else data_type.CUDA_C_64F)
        else:
            self._sv_type = _CUDA_C_32F if single else _CUDA_C_64F
        compute = cusv.ComputeType
        self._compute = int(compute.COMPUTE_32F if single else compute.COMPUTE_64F)
        self._layout = int(cusv.MatrixLayout.ROW)
        self._error_type: type[BaseException] | None = getattr(cusv, "cuStateVecError", None)
        status = getattr(cusv, "Status", None)
        self._oom_statuses = {
            int(getattr(status, name)) for name in _OUT_OF_MEMORY_STATUSES if hasattr(status, name)
        }
        self.device_id = device_id
        self._device = cp.cuda.Device(device_id)
        try:
            with self._device:
                self._stream = cp.cuda.Stream(non_blocking=True)
                self._handle = int(cusv.create())
                cusv.set_stream(self._handle, self._stream.ptr)
                props = cp.cuda.runtime.getDeviceProperties(device_id)
        except Exception as exc:  # library not loadable (e.g. cuBLAS missing), device error
            raise ExecutorUnavailable(
                f"cuStateVec could not start on CUDA device {device_id} ({exc}); check that "
                f"the CUDA 13 runtime libraries are installed ({INSTALL_HINT} pulls them in) "
                "and that the driver supports CUDA 13"
            ) from exc
        raw_name = props.get("name", b"cuda")
        self._name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        self._total = int(props.get("totalGlobalMem", 0))
        self.num_qubits = 0
        self._sv: Any = None
        self._workspace: Any = None
        self._arena: Any = None
        self._saved_pool: list[Any] = []
        # Workspace sizes by every argument the size query takes (see _query_*): a size
        # queried for other target positions or another matrix location is not reused.
        self._ws_sizes: dict[tuple[Any, ...], int] = {}
        self._sampler_ws: dict[tuple[int, int], int] = {}
        self._host_probes: dict[tuple[int, bool], np.ndarray] = {}
        self._x_host = np.ascontiguousarray(_PAULI_X, dtype=self.dtype)
        self._closed = False

    # --- lifetime -----------------------------------------------------------------------

    def device_name(self) -> str:
        return f"{self._name} (cuda:{self.device_id})"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Make this backend's device and stream current (run() may come from any thread)."""
        with self._device, self._stream:
            try:
                yield
            finally:
                self._stream.synchronize()

    def held_bytes(self) -> int:
        held = 0
        for buf in (self._sv, self._workspace, self._arena, *self._saved_pool):
            if buf is not None:
                held += int(buf.nbytes)
        return held

    def memory(self) -> tuple[int, int]:
        """(free, total) device bytes; free counts what this backend holds and could
        release or reuse, and blocks cached by CuPy's pool."""
        with self._device:
            free, total = self._cp.cuda.runtime.memGetInfo()
            pooled = self._cp.get_default_memory_pool().free_bytes()
        return int(free) + int(pooled) + self.held_bytes(), int(total)

    def state_bytes(self, num_qubits: int) -> int:
        return (1 << num_qubits) * self.dtype.itemsize

    def statevector_host_bytes(self, num_qubits: int) -> int:
        # asnumpy copies in the state's own precision; single is then widened to double.
        widened = 0 if self.dtype == np.complex128 else 16
        return (1 << num_qubits) * (self.dtype.itemsize + widened)

    def required_bytes(
        self, footprint: Footprint, refs: Sequence[Any] | None = None
    ) -> Mapping[str, int]:
        """State, matrix arena, the largest workspace any pass or the sampler asks for
        (they share one buffer) and a fixed margin. Without `refs` the matrix
        workspace is queried for host matrices, an estimate until the plan is uploaded."""
        n = footprint.num_qubits
        workspace = 0
        if n > 0:
            with self._device:
                for shape in footprint.passes:
                    workspace = max(workspace, self._pass_workspace(n, shape, refs))
                if footprint.sampler_shots:
                    workspace = max(workspace, self._sampler_workspace(n, footprint.sampler_shots))
        return {
            "state": self.state_bytes(n),
            "matrices": footprint.matrix_elements * self.dtype.itemsize,
            "workspace": workspace,
            "margin": MARGIN_BYTES,
        }

    def out_of_memory(self, exc: BaseException) -> bool:
        if isinstance(exc, (MemoryError, self._cp.cuda.memory.OutOfMemoryError)):
            return True
        if self._error_type is not None and isinstance(exc, self._error_type):
            return int(getattr(exc, "status", -1)) in self._oom_statuses
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._device:
            self._stream.synchronize()
            self._cusv.destroy(self._handle)
            self._sv = self._workspace = self._arena = None
            self._saved_pool.clear()
            self._cp.get_default_memory_pool().free_all_blocks()

    # --- buffers ------------------------------------------------------------------------

    def _free_cached(self) -> None:
        self._cp.get_default_memory_pool().free_all_blocks()

    def _state(self) -> Any:
        return self._sv[: 1 << self.num_qubits]

    def _ensure_state(self, size: int) -> None:
        if self._saved_pool and self._saved_pool[0].size != size:
            self._saved_pool.clear()
        if self._sv is not None and self._sv.size >= size:
            return
        # Drop the old buffer (and cached blocks) before growing so both never coexist.
        self._sv = None
        self._saved_pool.clear()
        self._free_cached()
        self._sv = self._cp.empty(size, dtype=self.dtype)

    def _ensure_workspace(self, nbytes: int) -> tuple[int, int]:
        if nbytes <= 0:
            return 0, 0
        if self._workspace is None or self._workspace.nbytes < nbytes:
            self._workspace = None
            self._workspace = self._cp.empty(nbytes, dtype=np.uint8)
        return int(self._workspace.data.ptr), int(self._workspace.nbytes)

    def _host_probe(self, n_targets: int, diagonal: bool) -> np.ndarray:
        key = (n_targets, diagonal)
        probe_matrix = self._host_probes.get(key)
        if probe_matrix is None:
            dim = 1 << n_targets
            shape = (dim,) if diagonal else (dim, dim)
            probe_matrix = self._host_probes[key] = np.zeros(shape, dtype=self.dtype)
        return probe_matrix

    def _pass_workspace(self, n: int, shape: Pass, refs: Sequence[Any] | None) -> int:
        if not shape.targets:
            return 0  # never reaches cuStateVec (lowering folds 0-target gates)
        if refs is not None and shape.block >= 0:
            ref, on_device = int(refs[shape.block]), True
        else:
            ref, on_device = (
                int(self._host_probe(len(shape.targets), shape.diagonal).ctypes.data),
                False,
            )
        if shape.diagonal:
            return self._query_diagonal(n, ref, on_device, shape.targets, shape.n_controls)
        return self._query_matrix(n, ref, on_device, len(shape.targets), shape.n_controls)

    def _query_matrix(
        self, n: int, matrix: int, on_device: bool, n_targets: int, n_controls: int
    ) -> int:
        # The query takes the matrix pointer (host or device), the target and control
        # counts; data type, layout and compute type are fixed per backend.
        key = ("matrix", n, on_device, n_targets, n_controls)
        size = self._ws_sizes.get(key)
        if size is None:
            size = self._ws_sizes[key] = int(
                self._cusv.apply_matrix_get_workspace_size(
                    self._handle,
                    self._sv_type,
                    n,
                    matrix,
                    self._sv_type,
                    self._layout,
                    0,
                    n_targets,
                    n_controls,
                    self._compute,
                )
            )
        return size

    def _query_diagonal(
        self, n: int, diagonals: int, on_device: bool, targets: Sequence[int], n_controls: int
    ) -> int:
        # This query takes the target positions themselves, not only their count.
        key = ("diagonal", n, on_device, tuple(targets), n_controls)
        size = self._ws_sizes.get(key)
        if size is None:
            size = self._ws_sizes[key] = int(
                self._cusv.apply_generalized_permutation_matrix_get_workspace_size(
                    self._handle,
                    self._sv_type,
                    n,
                    0,
                    diagonals,
                    self._sv_type,
                    list(targets),
                    len(targets),
                    n_controls,
                )
            )
        return size

    def _sampler_workspace(self, n: int, shots: int) -> int:
        known = self._sampler_ws.get((n, shots))
        if known is not None:
            return known
        if self._sv is not None and self._sv.size >= 1 << n:
            # sampler_create only sizes its workspace; our own buffer is a valid state.
            sampler, size = self._cusv.sampler_create(
                self._handle, int(self._sv.data.ptr), self._sv_type, n, shots
            )
            self._cusv.sampler_destroy(sampler)
            self._sampler_ws[(n, shots)] = int(size)
            return int(size)
        return self.state_bytes(n) // SAMPLER_ESTIMATE_FRACTION

    # --- state --------------------------------------------------------------------------

    def reset_state(self, num_qubits: int) -> None:
        if num_qubits < 1:
            # cuStateVec's header does not define nIndexBits = 0; the executor runs
            # 0-qubit circuits on the host.
            raise ValueError("the cuStateVec backend needs at least one qubit")
        self._ensure_state(1 << num_qubits)
        self.num_qubits = num_qubits
        self._cusv.initialize_state_vector(
            self._handle,
            int(self._sv.data.ptr),
            self._sv_type,
            num_qubits,
            int(self._cusv.StateVectorType.ZERO),
        )

    def upload(self, matrices: Sequence[np.ndarray]) -> list[Any]:
        """Copy every matrix of a plan to the device in one transfer; refs are device
        pointers. A sweep reuses the arena and only rewrites its contents."""
        sizes = [int(m.size) for m in matrices]
        total = max(sum(sizes), 1)
        host = np.empty(total, dtype=self.dtype)
        offsets = []
        offset = 0
        for m, size in zip(matrices, sizes, strict=True):
            host[offset : offset + size] = np.asarray(m).reshape(-1)
            offsets.append(offset)
            offset += size
        if self._arena is None or self._arena.size < total:
            self._arena = None
            self._arena = self._cp.empty(total, dtype=self.dtype)
        self._arena[:total].set(host)
        base = int(self._arena.data.ptr)
        return [base + off * self.dtype.itemsize for off in offsets]

    @staticmethod
    def _check_targets(targets: Sequence[int]) -> None:
        if not targets:
            # The header neither allows nor forbids nTargets = 0; lowering folds a
            # 0-target gate into the global phase (or a diagonal on its controls).
            raise ValueError("a pass without target qubits reached the cuStateVec backend")

    def _apply_dense(
        self,
        matrix: int,
        on_device: bool,
        targets: Sequence[int],
        controls: Sequence[int],
        ctrl_values: Sequence[int],
    ) -> None:
        self._check_targets(targets)
        n = self.num_qubits
        size = self._query_matrix(n, matrix, on_device, len(targets), len(controls))
        ws_ptr, ws_size = self._ensure_workspace(size)
        self._cusv.apply_matrix(
            self._handle,
            int(self._sv.data.ptr),
            self._sv_type,
            n,
            matrix,
            self._sv_type,
            self._layout,
            0,
            list(targets),
            len(targets),
            list(controls) if controls else 0,
            list(ctrl_values) if controls else 0,
            len(controls),
            self._compute,
            ws_ptr,
            ws_size,
        )

    def apply_matrix(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None:
        self._apply_dense(int(ref), True, targets, controls, ctrl_values)

    def apply_diagonal(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None:
        self._check_targets(targets)
        n = self.num_qubits
        target_list = list(targets)
        size = self._query_diagonal(n, int(ref), True, target_list, len(controls))
        ws_ptr, ws_size = self._ensure_workspace(size)
        # A null permutation makes the generalized permutation matrix a pure diagonal.
        self._cusv.apply_generalized_permutation_matrix(
            self._handle,
            int(self._sv.data.ptr),
            self._sv_type,
            n,
            0,
            int(ref),
            self._sv_type,
            0,
            target_list,
            len(target_list),
            list(controls) if controls else 0,
            list(ctrl_values) if controls else 0,
            len(controls),
            ws_ptr,
            ws_size,
        )

    def probabilities(self, qubits: Sequence[int]) -> np.ndarray:
        out = np.zeros(1 << len(qubits), dtype=np.float64)
        self._cusv.abs2sum_array(
            self._handle,
            int(self._sv.data.ptr),
            self._sv_type,
            self.num_qubits,
            out.ctypes.data,
            list(qubits),
            len(qubits),
            0,
            0,
            0,
        )
        self._stream.synchronize()
        return out

    def qubit_probabilities(self, qubit: int) -> tuple[float, float]:
        p = self.probabilities([qubit])
        return float(p[0]), float(p[1])

    def collapse(self, qubit: int, outcome: int, probability: float) -> None:
        """Zero the other outcome and renormalise in one pass; cuStateVec scales the kept
        amplitudes by 1/sqrt(norm), norm being the outcome's probability."""
        self._cusv.collapse_on_z_basis(
            self._handle,
            int(self._sv.data.ptr),
            self._sv_type,
            self.num_qubits,
            int(outcome),
            [qubit],
            1,
            float(probability),
        )

    def reset(self, qubit: int, outcome: int, probability: float) -> None:
        self.collapse(qubit, outcome, probability)
        if outcome:  # |1> after the collapse: an X brings it to |0>
            self._apply_dense(int(self._x_host.ctypes.data), False, [qubit], (), ())

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator) -> np.ndarray:
        """All shots in one sampler pass over the state (cuStateVec's sampler)."""
        cusv = self._cusv
        sampler, ws_bytes = cusv.sampler_create(
            self._handle, int(self._sv.data.ptr), self._sv_type, self.num_qubits, shots
        )
        try:
            self._sampler_ws[(self.num_qubits, shots)] = int(ws_bytes)
            ws_ptr, ws_size = self._ensure_workspace(int(ws_bytes))
            cusv.sampler_preprocess(self._handle, sampler, ws_ptr, ws_size)
            out = np.empty(shots, dtype=np.int64)
            randnums = rng.random(shots)
            cusv.sampler_sample(
                self._handle,
                sampler,
                out.ctypes.data,
                list(qubits),
                len(qubits),
                randnums.ctypes.data,
                shots,
                int(cusv.SamplerOutput.RANDNUM_ORDER),
            )
            self._stream.synchronize()
        finally:
            cusv.sampler_destroy(sampler)
        return out

    def save(self) -> Any:
        state = self._state()
        buf = self._saved_pool.pop() if self._saved_pool else self._cp.empty_like(state)
        self._cp.copyto(buf, state)
        return buf

    def restore(self, saved: Any) -> None:
        self._cp.copyto(self._state(), saved)

    def release(self, saved: Any) -> None:
        self._saved_pool.append(saved)

    def statevector(self) -> np.ndarray:
        host = self._cp.asnumpy(self._state(), stream=self._stream)
        self._stream.synchronize()
        return np.asarray(host, dtype=np.complex128)


__all__ = ["INSTALL_HINT", "MARGIN_BYTES", "CuStateVecBackend", "probe"]
