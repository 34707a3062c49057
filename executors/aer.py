"""The `aer` executor: Qiskit Aer on the CPU, one simulator reused across jobs,
small queued jobs run together in one Aer call."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from executors.aer_noise import NoiseProfile
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

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

# Below Aer's statevector_parallel_threshold a circuit gains nothing from threads.
_SMALL_QUBITS = 14

# Instructions Aer runs without help but leaves out of its target.
_ALWAYS_RUNNABLE = frozenset({"barrier", "measure", "reset", "delay"})


class AerExecutor(Executor):
    """Options: `method` (Aer simulation method, default "automatic"), `seed`
    (fixes the sampler for reproducible counts), `precision` ("double"/"single"),
    `max_qubits`, `max_shots`, `max_parallel_threads`, `noise_calibration` (a
    calibration snapshot or qibocal calibration.json: Aer then runs as a noisy digital
    twin of that QPU, on its native gates and coupling map, with at most its qubits)."""

    name = "aer"
    OPTIONS = frozenset({"method", "seed", "precision", "max_qubits", "max_shots",
                         "max_parallel_threads", "noise_calibration"})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        from qiskit_aer import AerSimulator

        opts = self.options
        sim_options: dict[str, Any] = {
            "method": str(opts.get("method", "automatic")),
            "precision": str(opts.get("precision", "double")),
        }
        if opts.get("seed") is not None:
            sim_options["seed_simulator"] = int(opts["seed"])
        self._threads_unset = opts.get("max_parallel_threads") is None
        if not self._threads_unset:
            sim_options["max_parallel_threads"] = int(opts["max_parallel_threads"])
        self._noise: NoiseProfile | None = None
        if opts.get("noise_calibration"):
            self._noise = NoiseProfile.load(str(opts["noise_calibration"]))
            sim_options["noise_model"] = self._noise.model
        self._sim = AerSimulator(**sim_options)
        self._runnable = frozenset(self._sim.target.operation_names) | _ALWAYS_RUNNABLE
        default_qubits = (self._noise.figures.num_qubits if self._noise is not None
                          else self._sim.configuration().n_qubits)
        self._max_qubits = int(opts.get("max_qubits", default_qubits))
        self._max_shots = int(opts.get("max_shots", 1_000_000))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            max_qubits=self._max_qubits,
            max_shots=self._max_shots,
            basis_gates=tuple(sorted(self._runnable)),
            precision=str(self._sim.options.precision),
            device="cpu",
            meas_levels=(2,),  # a simulator has bits, not IQ points or traces
            extra={"method": str(self._sim.options.method),
                   **({"noise": self._noise.calibration()} if self._noise is not None else {})},
        )

    def calibration(self) -> dict[str, Any] | None:
        """With `noise_calibration`: the figures the noise model was built from, reread
        (and the model rebuilt) when the file changes; a file that stops parsing keeps
        the last good model and says why under `errors`."""
        if self._noise is None:
            return None
        if self._noise.refresh():
            self._sim.set_options(noise_model=self._noise.model)
        return self._noise.calibration()

    def run(self, job: Job) -> JobResult:
        return self._run_jobs([job])[0]

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult | JobError]:
        try:
            return list(self._run_jobs(jobs))
        except JobError:
            if len(jobs) == 1:
                raise
        # One bad job spoils a shared Aer call: run them apart so only it fails.
        return super().run_many(jobs)

    def _run_jobs(self, jobs: Sequence[Job]) -> list[JobResult]:
        # Aer takes one shot count per call: group every experiment of every job by it.
        groups: dict[tuple[int, bool], list[tuple[int, int, Experiment]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for e, exp in enumerate(job.experiments):
                want_memory = exp.memory and job.meas_return == "single"
                groups[(exp.shots, want_memory)].append((j, e, exp))
        slots: list[list[ExperimentResult | None]] = [[None] * len(j.experiments) for j in jobs]
        started = time.perf_counter()
        for (shots, memory), members in groups.items():
            circuits = [self._runnable_form(exp.circuit) for _, _, exp in members]
            results = self._execute(circuits, shots, memory)
            for (j, e, exp), data in zip(members, results, strict=True):
                slots[j][e] = _experiment_result(exp.circuit, shots, memory, data)
        elapsed = time.perf_counter() - started
        return [
            JobResult(
                experiments=[r for r in row if r is not None],
                execution_time_s=elapsed,
                extra={"method": str(self._sim.options.method)},
            )
            for row in slots
        ]

    def _runnable_form(self, circuit: QuantumCircuit) -> QuantumCircuit:
        if self._noise is not None:  # a twin runs what the QPU would, SWAPs included
            return self._noise.native_form(circuit)
        # transpile() costs 100-200 ms; Aer runs standard gates as they are.
        if all(name in self._runnable for name in circuit.count_ops()):
            return circuit
        from qiskit import transpile

        return transpile(circuit, self._sim, optimization_level=0)

    def _execute(self, circuits: list[QuantumCircuit], shots: int, memory: bool) -> list[Any]:
        run_options: dict[str, Any] = {}
        small = max(c.num_qubits for c in circuits) < _SMALL_QUBITS
        if self._threads_unset and small and len(circuits) > 1:
            # A batch of small circuits runs side by side, one per core, rather than one
            # after another on a core each splits no further. The executor process sets
            # OMP_WAIT_POLICY=PASSIVE: Aer's idle threads sleep instead of spinning on
            # cores the daemon and the parser need. A lone circuit keeps Aer's default.
            run_options["max_parallel_experiments"] = 0
        try:
            result = self._sim.run(circuits, shots=shots, memory=memory, **run_options).result()
        except Exception as exc:  # Aer raises AerError, ValueError, RuntimeError, ...
            raise JobError(ErrorCode.JOB_FAILED, f"Aer could not run the job: {exc}") from exc
        out = []
        for exp in result.results:
            if not exp.success:
                raise JobError(ErrorCode.JOB_FAILED, f"Aer failed an experiment: {exp.status}")
            out.append(exp)
        return out


def _experiment_result(
    circuit: QuantumCircuit, shots: int, memory: bool, data: Any
) -> ExperimentResult:
    width = circuit.num_clbits
    raw = data.data
    counts_hex: dict[str, int] = getattr(raw, "counts", None) or {}
    counts = {_bits(key, width): int(n) for key, n in counts_hex.items()}
    mem = [_bits(key, width) for key in raw.memory] if memory and hasattr(raw, "memory") else None
    return ExperimentResult(
        counts=counts,
        shots=shots,
        header=circuit_header(circuit),
        memory=mem,
        time_taken=float(getattr(data, "time_taken", 0.0) or 0.0),
    )


@lru_cache(maxsize=1 << 16)  # a job's counts have up to 2^width keys; the next job's are alike
def _bits(hex_key: str, width: int) -> str:
    return format(int(hex_key, 16), f"0{width}b") if width else ""
