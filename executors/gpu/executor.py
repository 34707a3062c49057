"""GpuExecutor: runs jobs on one NVIDIA GPU through cuStateVec (or on the CPU through the
NumPy backend), with plans and device buffers reused across jobs."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt
from qiskit.circuit import QuantumCircuit
from qiskit.circuit.library import get_standard_gate_name_mapping

from executors.base import (
    Capabilities,
    ErrorCode,
    Executor,
    Experiment,
    ExperimentResult,
    Job,
    JobError,
    JobResult,
    circuit_header,
)
from executors.gpu.backend import Backend, Footprint, Pass
from executors.gpu.lowering import MatrixCache, lower
from executors.gpu.numpy_backend import NumpyBackend, available_host_memory
from executors.gpu.runner import Plan, compile_plan, execute, to_counts

PRECISIONS = ("single", "double")
BACKENDS = ("custatevec", "numpy")
DEFAULT_FUSION_MAX_QUBITS = 5
DEFAULT_MAX_SHOTS = 1_000_000
DEFAULT_MAX_SAVED_STATES = 4
_PLAN_CACHE_SIZE = 64
_BASIS = tuple(
    sorted(
        set(get_standard_gate_name_mapping())
        | {"unitary", "measure", "reset", "barrier", "delay"}
        | {"if_else", "while_loop", "for_loop", "switch_case", "box"}
    )
)


def _fmt_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


class GpuExecutor(Executor):
    """State-vector executor on cuStateVec; options:

    precision "single"|"double" (default "double"); fusion_max_qubits (default 5; 0 or
    1 disables fusion); seed (int or None); device_id (default 0); backend
    "custatevec"|"numpy" (default "custatevec"; "numpy" runs the same pipeline on the
    CPU); max_shots (default 1,000,000); max_saved_states (state copies kept while
    branching on mid-circuit measurements, default 4, further limited by free memory).
    """

    name: ClassVar[str] = "gpu"
    OPTION_TYPES: ClassVar[Mapping[str, Any]] = {
        "precision": Literal["single", "double"], "backend": Literal["custatevec", "numpy"],
        "fusion_max_qubits": Annotated[int, Field(ge=0, le=10)],
        "seed": int, "device_id": NonNegativeInt, "max_shots": PositiveInt,
        "max_saved_states": NonNegativeInt,
    }  # fmt: skip

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)  # refuses unknown option names and bad values
        opts = self.options
        self.precision: str = opts.get("precision", "double")
        self.backend_name: str = opts.get("backend", "custatevec")
        self.fusion_max_qubits: int = opts.get("fusion_max_qubits", DEFAULT_FUSION_MAX_QUBITS)
        self.device_id: int = opts.get("device_id", 0)
        self.max_shots: int = opts.get("max_shots", DEFAULT_MAX_SHOTS)
        self.max_saved_states: int = opts.get("max_saved_states", DEFAULT_MAX_SAVED_STATES)
        self._rng = np.random.default_rng(opts.get("seed"))
        self._backend: Backend
        if self.backend_name == "numpy":
            self._backend = NumpyBackend(self.precision)
        else:
            # Imported here so `import executors.gpu` never loads CuPy or cuQuantum.
            from executors.gpu.custatevec_backend import CuStateVecBackend

            self._backend = CuStateVecBackend(self.precision, self.device_id)
        # 0-qubit circuits run on the host: cuStateVec does not define a 0-bit state.
        self._host = NumpyBackend(self.precision)
        self._matrices = MatrixCache()
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self.stats: dict[str, int] = {
            "experiments": 0,
            "plans_compiled": 0,
            "plan_cache_hits": 0,
            "branches": 0,
            "replays": 0,
        }

    # --- contract ---------------------------------------------------------------------

    def run(self, job: Job) -> JobResult:
        # meas_level is checked by the daemon against Capabilities.meas_levels.
        start = time.perf_counter()
        results = []
        with self._backend.session():
            for experiment in job.experiments:
                results.append(self._run_experiment(experiment))
        return JobResult(
            results,
            execution_time_s=time.perf_counter() - start,
            extra={
                "backend": self.backend_name,
                "device": self._backend.device_name(),
                "precision": self.precision,
            },
        )

    def capabilities(self) -> Capabilities:
        free, total = self._backend.memory()
        return Capabilities(
            max_qubits=self.max_qubits(),
            max_shots=self.max_shots,
            basis_gates=_BASIS,
            precision=self.precision,
            device=self._backend.device_name(),
            memory_bytes=total,
            meas_levels=(2,),
            extra={
                "backend": self.backend_name,
                "device_id": self.device_id,
                "free_memory_bytes": free,
                "fusion_max_qubits": self.fusion_max_qubits,
                "dynamic_circuits": True,
            },
        )

    def close(self) -> None:
        self._plans.clear()
        self._backend.close()

    # --- helpers ----------------------------------------------------------------------

    def _nominal(self, n: int) -> Footprint:
        # A register of n qubits with one pass of the widest fused block.
        width = min(max(self.fusion_max_qubits, 1), n)
        return Footprint(n, (Pass(tuple(range(width)), 0, False),), 0, 0)

    def max_qubits(self) -> int:
        """Largest register whose state, workspace and margin fit the device's total
        memory (a plan's own matrices and sampler are checked per job)."""
        _, total = self._backend.memory()
        n = min(62, max(1, int(math.log2(max(total // self._backend.dtype.itemsize, 2)))))
        while n > 1 and sum(self._backend.required_bytes(self._nominal(n)).values()) > total:
            n -= 1
        return n

    def plan_for(self, circuit: QuantumCircuit) -> tuple[Plan, list[np.ndarray], float]:
        """Lower and compile `circuit` (the parsed circuit: nothing here reads text),
        reusing a cached plan of the same structure; returns the plan, its bound
        matrices and the circuit's global phase."""
        program = lower(circuit, self._matrices)
        key = (program.structure, self.fusion_max_qubits)
        plan = self._plans.get(key)
        if plan is None:
            plan = compile_plan(program, self.fusion_max_qubits)
            self.stats["plans_compiled"] += 1
            self._plans[key] = plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self.stats["plan_cache_hits"] += 1
            self._plans.move_to_end(key)
        return plan, plan.bind(program.gates()), program.global_phase

    def _backend_for(self, num_qubits: int) -> Backend:
        return self._backend if num_qubits > 0 else self._host

    def statevector(self, circuit: QuantumCircuit) -> np.ndarray:
        """Final state of a circuit without mid-circuit measurement, reset or control flow
        (terminal measurements are ignored), global phase included."""
        plan, matrices, phase = self.plan_for(circuit)
        if plan.dynamic:
            raise JobError(
                ErrorCode.CIRCUIT_INVALID,
                "statevector needs a circuit without mid-circuit measurement, reset or "
                "classical control",
            )
        backend = self._backend_for(plan.num_qubits)
        self._check_host_memory(backend, plan.num_qubits)
        with backend.session(), self._device_errors(backend, plan.footprint(1)):
            refs, _ = self._admit_and_upload(backend, plan, matrices, 1)
            execute(plan, refs, backend, 1, self._rng, max_saved_states=0)
            state = backend.statevector()
        return state * np.exp(1j * phase)

    def _check_host_memory(self, backend: Backend, n: int) -> None:
        need = backend.statevector_host_bytes(n)
        free = available_host_memory()
        if need > free:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"the {n}-qubit state vector needs {_fmt_bytes(need)} of host memory to be "
                f"returned, but only {_fmt_bytes(free)} is available; sample it instead, or "
                "free host memory",
                required_bytes=need,
                available_bytes=free,
                num_qubits=n,
            )

    def _too_big(
        self, backend: Backend, n: int, parts: Mapping[str, int], why: str | None = None
    ) -> JobError:
        free, total = backend.memory()
        need = sum(parts.values())
        detail = ", ".join(f"{name} {_fmt_bytes(size)}" for name, size in parts.items() if size)
        reason = why or (
            f"{_fmt_bytes(need)} ({detail}) but {backend.device_name()} has "
            f"{_fmt_bytes(free)} free of {_fmt_bytes(total)}"
        )
        return JobError(
            ErrorCode.QUOTA_EXCEEDED,
            f"{n} qubits in {self.precision} precision need {reason}; at most "
            f"{self.max_qubits()} qubits fit",
            required_bytes=need,
            available_bytes=free,
            total_bytes=total,
            num_qubits=n,
            max_qubits=self.max_qubits(),
            precision=self.precision,
            required_by_part=dict(parts),
        )

    def _admit(self, backend: Backend, footprint: Footprint, refs: Sequence[Any] | None) -> int:
        """Refuse before allocating what does not fit; returns the spare bytes."""
        parts = backend.required_bytes(footprint, refs)
        free, _ = backend.memory()
        if sum(parts.values()) > free:
            raise self._too_big(backend, footprint.num_qubits, parts)
        return free - sum(parts.values())

    def _admit_and_upload(
        self, backend: Backend, plan: Plan, matrices: list[np.ndarray], shots: int
    ) -> tuple[list[Any], int]:
        """Admission, twice: an estimate before anything is allocated, then with the
        uploaded matrices, whose device location the workspace queries take. Returns
        the matrix refs and the bytes to spare."""
        footprint = plan.footprint(shots)
        self._admit(backend, footprint, None)
        refs = backend.upload(matrices)
        return refs, self._admit(backend, footprint, refs)

    @contextmanager
    def _device_errors(self, backend: Backend, footprint: Footprint) -> Iterator[None]:
        """Out-of-memory from NumPy, CuPy or cuStateVec becomes QUOTA_EXCEEDED with the
        figures; any other library error JOB_FAILED."""
        try:
            yield
        except JobError:
            raise
        except Exception as exc:  # cuStateVec/CUDA errors surface as library exceptions
            if backend.out_of_memory(exc):
                n = footprint.num_qubits
                why = (
                    f"more memory than {backend.device_name()} could give while simulating "
                    f"({type(exc).__name__}: {exc})"
                )
                raise self._too_big(backend, n, backend.required_bytes(footprint), why) from exc
            raise JobError(
                ErrorCode.JOB_FAILED, f"simulation failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _check_shots(self, shots: int) -> None:
        if shots < 1:
            raise JobError(ErrorCode.CIRCUIT_INVALID, f"shots must be at least 1, got {shots}")
        if shots > self.max_shots:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{shots} shots exceed this executor's limit of {self.max_shots}",
                shots=shots,
                max_shots=self.max_shots,
            )

    def _check_state_fits(self, n: int) -> None:
        # Refuse before lowering: the state alone cannot fit the device.
        backend = self._backend
        total = backend.memory()[1]
        if n <= 62 and backend.state_bytes(n) <= total:
            return
        need = backend.state_bytes(n) if n <= 62 else 1 << 62
        raise self._too_big(
            backend,
            n,
            {"state": need},
            f"at least {_fmt_bytes(need)} for the state alone; {backend.device_name()} has "
            f"{_fmt_bytes(total)} in total",
        )

    def _saved_states(self, plan: Plan, backend: Backend, spare_bytes: int) -> int:
        # State copies for branching, as many as the spare memory and the option allow.
        if not plan.dynamic:
            return 0
        copies = spare_bytes // max(backend.state_bytes(plan.num_qubits), 1)
        return int(max(0, min(self.max_saved_states, copies)))

    def _run_experiment(self, experiment: Experiment) -> ExperimentResult:
        start = time.perf_counter()
        circuit = experiment.circuit  # parsed and bound by the daemon; never re-parsed
        shots = experiment.shots
        self._check_shots(shots)
        n = circuit.num_qubits
        self._check_state_fits(n)
        plan, matrices, _ = self.plan_for(circuit)
        backend = self._backend_for(n)
        with self._device_errors(backend, plan.footprint(shots)):
            refs, spare = self._admit_and_upload(backend, plan, matrices, shots)
            saved = self._saved_states(plan, backend, spare)
            outcome = execute(plan, refs, backend, shots, self._rng, saved)
        counts, memory = to_counts(plan, outcome, self._rng, experiment.memory)
        self.stats["experiments"] += 1
        self.stats["branches"] += outcome.branches
        self.stats["replays"] += outcome.replays
        return ExperimentResult(
            counts=counts,
            shots=shots,
            header=circuit_header(circuit),
            memory=memory,
            time_taken=time.perf_counter() - start,
        )


__all__ = ["BACKENDS", "PRECISIONS", "GpuExecutor"]
