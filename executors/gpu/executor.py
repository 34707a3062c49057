"""GpuExecutor: runs jobs on one NVIDIA GPU through cuStateVec (or on the CPU through the
NumPy reference backend), with plans and device buffers reused across jobs."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import numpy as np
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
from executors.gpu.lowering import MatrixCache, lower
from executors.gpu.reference import NumpyBackend
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


def _int_option(options: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"gpu executor option {name!r} must be an integer >= {minimum}")
    return value


class GpuExecutor(Executor):
    """State-vector executor on cuStateVec; options:

    precision "single"|"double" (default "double"); fusion_max_qubits (default 5; 0 or
    1 disables fusion); seed (int or None); device_id (default 0); backend
    "custatevec"|"numpy" (default "custatevec"; "numpy" runs the same pipeline on the
    CPU); max_shots (default 1,000,000); max_saved_states (state copies kept while
    branching on mid-circuit measurements, default 4, further limited by free memory).
    """

    name: ClassVar[str] = "gpu"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "precision", "fusion_max_qubits", "seed", "device_id", "backend", "max_shots",
        "max_saved_states"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = self.options
        unknown = set(opts) - {
            "precision",
            "fusion_max_qubits",
            "seed",
            "device_id",
            "backend",
            "max_shots",
            "max_saved_states",
        }
        if unknown:
            raise ValueError(f"unknown gpu executor options: {', '.join(sorted(unknown))}")
        self.precision = str(opts.get("precision", "double"))
        if self.precision not in PRECISIONS:
            raise ValueError(f"gpu executor option 'precision' must be one of {PRECISIONS}")
        self.backend_name = str(opts.get("backend", "custatevec"))
        if self.backend_name not in BACKENDS:
            raise ValueError(f"gpu executor option 'backend' must be one of {BACKENDS}")
        self.fusion_max_qubits = _int_option(
            opts, "fusion_max_qubits", DEFAULT_FUSION_MAX_QUBITS, 0
        )
        if self.fusion_max_qubits > 10:
            raise ValueError("gpu executor option 'fusion_max_qubits' must be at most 10")
        self.device_id = _int_option(opts, "device_id", 0, 0)
        self.max_shots = _int_option(opts, "max_shots", DEFAULT_MAX_SHOTS, 1)
        self.max_saved_states = _int_option(opts, "max_saved_states", DEFAULT_MAX_SAVED_STATES, 0)
        seed = opts.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("gpu executor option 'seed' must be an integer or null")
        self._rng = np.random.default_rng(seed)
        self._backend: Any
        if self.backend_name == "numpy":
            self._backend = NumpyBackend(self.precision)
        else:
            # Imported here so `import executors.gpu` never loads CuPy or cuQuantum.
            from executors.gpu.custatevec_backend import CuStateVecBackend

            self._backend = CuStateVecBackend(self.precision, self.device_id)
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
        if job.meas_level != 2:
            raise JobError(
                ErrorCode.CIRCUIT_INVALID,
                f"meas_level {job.meas_level} is not available from a state-vector "
                "simulator; use meas_level 2 (counts)",
            )
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

    def max_qubits(self) -> int:
        """Largest register whose state and workspace fit the device's total memory."""
        _, total = self._backend.memory()
        n = 1
        while n < 62 and self._backend.required_bytes(n + 1, self.fusion_max_qubits) <= total:
            n += 1
        return n

    def plan_for(self, circuit: QuantumCircuit) -> tuple[Plan, list[np.ndarray], float]:
        """Lower and compile `circuit` (reusing a cached plan of the same structure);
        returns the plan, its bound matrices and the circuit's global phase."""
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
        with self._backend.session():
            self._admit(plan)
            refs = self._backend.upload(matrices)
            execute(plan, refs, self._backend, 1, self._rng, max_saved_states=0)
            state = self._backend.statevector()
        return state * np.exp(1j * phase)

    def _too_big(self, n: int, need: int, free: int, total: int, why: str) -> JobError:
        return JobError(
            ErrorCode.QUOTA_EXCEEDED,
            f"{n} qubits in {self.precision} precision need {why}; at most "
            f"{self.max_qubits()} qubits fit",
            required_bytes=need,
            available_bytes=free,
            total_bytes=total,
            num_qubits=n,
            max_qubits=self.max_qubits(),
            precision=self.precision,
        )

    def _admit(self, plan: Plan) -> int:
        """Check memory before allocating; returns how many extra state copies fit."""
        backend = self._backend
        n = plan.num_qubits
        need = backend.required_bytes(n, plan.max_targets)
        free, total = backend.memory()
        if need > free:
            raise self._too_big(
                n, need, free, total,
                f"{_fmt_bytes(need)} (state {_fmt_bytes(backend.state_bytes(n))} plus "
                f"workspace) but {backend.device_name()} has {_fmt_bytes(free)} free of "
                f"{_fmt_bytes(total)}",
            )
        if not plan.dynamic:
            return 0
        spare = (free - need) // max(backend.state_bytes(n), 1)
        return int(max(0, min(self.max_saved_states, spare)))

    def _run_experiment(self, experiment: Experiment) -> ExperimentResult:
        start = time.perf_counter()
        circuit = experiment.circuit
        shots = experiment.shots
        if shots < 1:
            raise JobError(ErrorCode.CIRCUIT_INVALID, f"shots must be at least 1, got {shots}")
        if shots > self.max_shots:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{shots} shots exceed this executor's limit of {self.max_shots}",
                shots=shots,
                max_shots=self.max_shots,
            )
        n = circuit.num_qubits
        if n > 62 or self._backend.state_bytes(n) > self._backend.memory()[1]:
            # Refuse before lowering: the state alone cannot fit the device.
            free, total = self._backend.memory()
            need = self._backend.state_bytes(n) if n <= 62 else 1 << 62
            raise self._too_big(
                n, need, free, total,
                f"at least {_fmt_bytes(need)} for the state alone; "
                f"{self._backend.device_name()} has {_fmt_bytes(total)} in total",
            )
        plan, matrices, _ = self.plan_for(circuit)
        saved_states = self._admit(plan)
        backend = self._backend if n > 0 else NumpyBackend(self.precision)
        try:
            refs = backend.upload(matrices)
            outcome = execute(plan, refs, backend, shots, self._rng, saved_states)
        except JobError:
            raise
        except MemoryError as exc:  # NumPy, and CuPy's OutOfMemoryError
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED, f"out of memory while simulating {n} qubits: {exc}"
            ) from exc
        except Exception as exc:  # cuStateVec/CUDA errors surface as library exceptions
            if getattr(backend, "is_out_of_memory", lambda e: False)(exc):
                raise JobError(
                    ErrorCode.QUOTA_EXCEEDED, f"device out of memory for {n} qubits: {exc}"
                ) from exc
            raise JobError(
                ErrorCode.JOB_FAILED, f"simulation failed: {type(exc).__name__}: {exc}"
            ) from exc
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
