"""The `aer` executor: Qiskit Aer on the CPU, one simulator reused across jobs,
small queued jobs run together in one Aer call."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import structlog
from pydantic import NonNegativeInt, PositiveInt

from executors.aer_native import NativeRunner, Raw
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
    OptionError,
    circuit_header,
)
from executors.calibration import CalibrationFileError

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

log = structlog.get_logger("qpi.executor.aer")

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
    takes_flat_circuits = True
    OPTION_TYPES: ClassVar[Mapping[str, Any]] = {
        "method": str, "seed": NonNegativeInt, "precision": Literal["double", "single"],
        "max_qubits": PositiveInt, "max_shots": PositiveInt,
        "max_parallel_threads": NonNegativeInt, "noise_calibration": str,
    }  # fmt: skip

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        from qiskit_aer import AerError, AerSimulator

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
            try:
                self._noise = NoiseProfile.load(str(opts["noise_calibration"]))
            except CalibrationFileError as exc:
                raise OptionError(f"option 'noise_calibration' of executor 'aer': {exc}") from None
            sim_options["noise_model"] = self._noise.model
        try:
            self._sim = AerSimulator(**sim_options)
        except AerError as exc:  # the types were checked: a method Aer does not have
            raise OptionError(f"option 'method' of executor 'aer': {exc}") from None
        self._runnable = frozenset(self._sim.target.operation_names) | _ALWAYS_RUNNABLE
        default_qubits = (self._noise.figures.num_qubits if self._noise is not None
                          else self._sim.configuration().n_qubits)
        self._max_qubits = int(opts.get("max_qubits", default_qubits))
        self._max_shots = int(opts.get("max_shots", 1_000_000))
        # A noisy twin runs each circuit in its QPU's native form: the standard path.
        self._native = NativeRunner.for_simulator(self._sim) if self._noise is None else None

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
            lowered = [self._lower(exp) for _, _, exp in members]
            direct = [(m, a) for m, a in zip(members, lowered, strict=True) if a is not None]
            rest = [m for m, a in zip(members, lowered, strict=True) if a is None]
            if direct:
                flats = [exp.flat for (_, _, exp), _ in direct]
                raws = self._run_native([a for _, a in direct], flats, shots, memory)
                if raws is None:  # this Aer's internals differ: the standard path from now on
                    rest = members
                else:
                    for ((j, e, _), _), flat, raw in zip(direct, flats, raws, strict=True):
                        assert flat is not None
                        slots[j][e] = _experiment_result(circuit_header(flat),
                                                         flat.num_clbits, shots, memory, raw)
            if rest:
                circuits = [self._runnable_form(exp.circuit) for _, _, exp in rest]
                raws = self._execute(circuits, shots, memory)
                for (j, e, exp), raw in zip(rest, raws, strict=True):
                    circuit = exp.circuit
                    slots[j][e] = _experiment_result(circuit_header(circuit), circuit.num_clbits,
                                                     shots, memory, raw)
        elapsed = time.perf_counter() - started
        return [
            JobResult(
                experiments=[r for r in row if r is not None],
                execution_time_s=elapsed,
                extra={"method": str(self._sim.options.method)},
            )
            for row in slots
        ]

    def _lower(self, exp: Experiment) -> Any | None:
        """Aer's own circuit for a plain circuit that crossed flat, or None: then the
        standard path (`AerSimulator.run`) runs it."""
        flat = exp.flat
        if self._native is None or flat is None:
            return None
        return self._native.lower(flat)

    def _runnable_form(self, circuit: QuantumCircuit) -> QuantumCircuit:
        if self._noise is not None:  # a twin runs what the QPU would, SWAPs included
            return self._noise.native_form(circuit)
        ops = _operations(circuit)
        mistaken = {name for name, op in ops.items()
                    if name in self._runnable and _defined_in_program(op)}
        if mistaken:  # expanded by their definitions; transpile() would keep them
            circuit = circuit.decompose(gates_to_decompose=sorted(mistaken))
            ops = _operations(circuit)
        # transpile() costs 100-200 ms; Aer runs standard gates as they are.
        if all(name in self._runnable for name in ops):
            return circuit
        from qiskit import transpile

        return transpile(circuit, self._sim, optimization_level=0)

    def _run_options(self, widths: Sequence[int], shots: int, memory: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"shots": shots, "memory": memory}
        if self._threads_unset and max(widths) < _SMALL_QUBITS and len(widths) > 1:
            # A batch of small circuits runs side by side, one per core, rather than one
            # after another on a core each splits no further. The executor process keeps
            # Aer's idle threads' spin short, so they give the cores back to the daemon
            # and the parser between batches. A lone circuit keeps Aer's default.
            options["max_parallel_experiments"] = 0
        return options

    def _run_native(self, circuits: list[Any], flats: list[Any], shots: int,
                    memory: bool) -> list[Raw] | None:
        """The direct path's results; None where it could not call Aer as it expects (an
        Aer whose internals changed), and then it is off for good."""
        assert self._native is not None
        options = self._run_options([f.num_qubits for f in flats], shots, memory)
        try:
            return self._native.run(circuits, flats, options)
        except JobError:
            raise
        except (AttributeError, TypeError) as exc:
            log.warning("Aer's direct path is off: this qiskit-aer does not take it",
                        error=f"{type(exc).__name__}: {exc}")
            self._native = None
            return None
        except Exception as exc:  # the controller raises RuntimeError, ValueError, ...
            raise JobError(ErrorCode.JOB_FAILED, f"Aer could not run the job: {exc}") from exc

    def _execute(self, circuits: list[QuantumCircuit], shots: int, memory: bool) -> list[Raw]:
        options = self._run_options([c.num_qubits for c in circuits], shots, memory)
        try:
            result = self._sim.run(circuits, **options).result()
        except Exception as exc:  # Aer raises AerError, ValueError, RuntimeError, ...
            raise JobError(ErrorCode.JOB_FAILED, f"Aer could not run the job: {exc}") from exc
        out = []
        for exp in result.results:
            if not exp.success:
                raise JobError(ErrorCode.JOB_FAILED, f"Aer failed an experiment: {exp.status}")
            raw = exp.data
            out.append(Raw(getattr(raw, "counts", None) or {}, getattr(raw, "memory", None),
                           float(getattr(exp, "time_taken", 0.0) or 0.0)))
        return out


def _operations(circuit: QuantumCircuit) -> dict[str, Any]:
    """One operation per name."""
    return {instruction.operation.name: instruction.operation for instruction in circuit.data}


def _defined_in_program(op: Any) -> bool:
    """A gate the OpenQASM program defined itself. Its name can be one Aer reads as its
    own instruction: qasm3.dumps writes a UnitaryGate as `gate unitary ...`, which Aer
    would take for a matrix it lacks."""
    from qiskit.circuit import Gate

    return type(op) is Gate and op.definition is not None


def _experiment_result(header: dict[str, Any], width: int, shots: int, memory: bool,
                       raw: Raw) -> ExperimentResult:
    bits = _bits_of_width(width)
    counts = {bits[key]: n for key, n in raw.counts.items()}
    mem = [bits[key] for key in raw.memory] if memory and raw.memory is not None else None
    return ExperimentResult(counts=counts, shots=shots, header=header, memory=mem,
                            time_taken=raw.time_taken)


class _Bits(dict[str, str]):
    """Aer's hex keys as Qiskit bit strings of one width, each worked out once: the next
    job's counts have mostly the same keys. At most LIMIT kept per width, and four widths
    at a time: 64k strings in all, as the lru_cache this replaced."""

    LIMIT = 1 << 14

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __missing__(self, hex_key: str) -> str:
        bits = format(int(hex_key, 16), f"0{self.width}b") if self.width else ""
        if len(self) < self.LIMIT:
            self[hex_key] = bits
        return bits


@lru_cache(maxsize=4)
def _bits_of_width(width: int) -> _Bits:
    return _Bits(width)
