"""The `qibolab` executor: real quantum hardware (or qibolab's emulator) behind the
driver, through qibolab's open-source, vendor-neutral control stack.

The platform is loaded and its instruments connected once, when the executor is
built in the worker process. Per job: each circuit is transpiled to the platform's
native gates and coupling map, compiled to a pulse sequence by qibolab's compiler,
played with the requested shots, and its readout turned into Qiskit bitstrings. An
instrument link that drops turns the node `degraded`; `health()` reconnects.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

import qibolab
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from qibolab import AcquisitionType, AveragingMode, Parameters, Platform, create_platform
from qibolab.backend import QibolabBackend

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
from executors.qibolab.calibration import (
    CALIBRATION_FILE,
    PARAMETERS_FILE,
    CalibrationFiles,
    gate_errors,
    snapshot,
)
from executors.qibolab.translate import (
    NativeCircuit,
    bitstrings,
    iq_memory,
    native_gate_set,
    to_native,
)

BUNDLED_PLATFORMS = Path(__file__).resolve().parent / "platforms"
PLATFORMS_ENV = "QIBOLAB_PLATFORMS"  # qibolab's own search path variable

# An instrument driver reports a lost link as an OSError (ConnectionError, TimeoutError,
# socket and serial errors); anything else is a problem with the job, not the link.
LINK_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError)

# QuTiP warns at import that it cannot plot; the daemon never plots.
warnings.filterwarnings("ignore", message="matplotlib not found")


# qibolab's instruments that simulate a device instead of driving one.
SIMULATING_INSTRUMENTS = frozenset({"EmulatorController", "DummyInstrument"})

class QibolabExecutor(Executor):
    """Options: `platform` (required: a platform folder, a name found in
    $QIBOLAB_PLATFORMS or among the bundled ones, e.g. `emulated_2q`, or `dummy`),
    `calibration_file` (a qibocal calibration.json; default: the platform folder's),
    `max_shots` (default 100000), `max_sequence_ns` (longest pulse sequence accepted),
    `optimization_level` (Qiskit transpiler, default 1), `seed_transpiler` (default 7)."""

    name = "qibolab"
    OPTION_TYPES: ClassVar[Mapping[str, Any]] = {
        "platform": str, "calibration_file": str, "max_shots": PositiveInt,
        "max_sequence_ns": PositiveFloat,
        "optimization_level": Annotated[int, Field(ge=0, le=3)],
        "seed_transpiler": NonNegativeInt,
    }  # fmt: skip

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = self.options
        spec = opts.get("platform")
        if not spec:
            raise OptionError(
                "the qibolab executor needs the option 'platform': a platform folder, a name "
                f"in ${PLATFORMS_ENV}, one of {', '.join(bundled_platforms())}, or 'dummy'"
            )
        self._platform, folder = load_platform(str(spec))
        calibration_file = opts.get("calibration_file")
        self._files = CalibrationFiles(
            folder / PARAMETERS_FILE if folder else None,
            Path(calibration_file) if calibration_file else
            (folder / CALIBRATION_FILE if folder else None),
        )
        self._loaded_at = time.time()
        self._max_shots = int(opts.get("max_shots", 100_000))
        max_ns = opts.get("max_sequence_ns")
        self._max_sequence_ns = float(max_ns) if max_ns is not None else None
        self._optimization_level = int(opts.get("optimization_level", 1))
        self._seed = int(opts.get("seed_transpiler", 7))
        self._measured: dict[str, Any] | None = None
        self._calibration: dict[str, Any] = {}
        self._reload_figures(parameters=False)
        # qibolab's gate-to-pulse compiler, as its qibo backend sets it up (public API).
        self._compiler = QibolabBackend(self._platform).compiler
        self._acquisition_qubit = {
            q.acquisition: i for i, q in enumerate(self._platform.qubits.values())
        }
        self._fault: str | None = None
        try:
            self._platform.connect()
        except Exception as exc:  # start degraded and retry in health(), as after a drop
            self._fault = f"cannot connect to the instruments of {self._platform.name}: {exc}"

    # -- contract ------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        gate_set = self._gate_set
        platform = self._platform
        timing = {
            "gate_durations_ns": {
                str(wire): gate_set.single.get(i, {}) for i, wire in enumerate(gate_set.wires)
            },
            "two_qubit_durations_ns": {
                f"{gate_set.wires[a]}-{gate_set.wires[b]}": g
                for (a, b), g in gate_set.pairs.items()
            },
            "relaxation_time_ns": platform.settings.relaxation_time,
            "sampling_rate_gsps": platform.sampling_rate,
            "max_sequence_ns": self._max_sequence_ns,
        }
        return Capabilities(
            max_qubits=platform.nqubits,
            max_shots=self._max_shots,
            basis_gates=(*gate_set.basis_gates, "barrier", "delay", "measure"),
            precision="hardware",
            device="qpu",
            # Bits, or IQ points per shot or averaged; raw traces (0) are not read out.
            meas_levels=(1, 2),
            extra={
                "platform": platform.name,
                "qubits": [str(q) for q in gate_set.wires],
                "coupling_map": gate_set.coupling_map,
                "native_gates": {
                    "single_qubit": sorted({g for s in gate_set.single.values() for g in s}),
                    "two_qubit": {k: v["natives"]
                                  for k, v in self._calibration.get("pairs", {}).items()},
                },
                "timing": timing,
                "instruments": {k: type(v).__name__ for k, v in platform.instruments.items()},
                # Hardware only when a real controller plays the pulses: qibolab's
                # emulator and dummy instruments simulate (QCOS's `simulated`).
                "simulated": any(type(v).__name__ in SIMULATING_INSTRUMENTS
                                 for v in platform.instruments.values()),
                "qibolab_version": qibolab.__version__,
            },
        )

    def calibration(self) -> dict[str, Any] | None:
        self._reload_if_changed()
        return dict(self._calibration)

    def health(self) -> str | None:
        if self._fault is not None:
            self._reconnect()
        return self._fault

    def close(self) -> None:
        with contextlib.suppress(Exception):  # nothing left to save at shutdown
            self._platform.disconnect()

    def run(self, job: Job) -> JobResult:
        self._reload_if_changed()
        if self._fault is not None and not self._reconnect():
            raise JobError(ErrorCode.JOB_FAILED,
                           f"{self._fault}; the job was not run, the node keeps retrying "
                           "the connection and reports itself degraded until then")
        # Everything is compiled before anything plays: a bad circuit costs no QPU time.
        compiled = [self._compile(i, exp) for i, exp in enumerate(job.experiments)]
        results: list[ExperimentResult | None] = [None] * len(compiled)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, exp in enumerate(job.experiments):
            groups[exp.shots].append(i)
        started = time.perf_counter()
        for shots, members in groups.items():
            played = [i for i in members if compiled[i][0].measure is not None]
            elapsed, readout = self._play([compiled[i][1] for i in played], shots, job)
            for i in members:
                native, sequence, measurement = compiled[i]
                samples = {}
                if native.measure is not None:
                    for channel, acquisition in measurement.acquisitions:
                        samples[self._acquisition_qubit[channel]] = readout[acquisition.id]
                results[i] = self._result(job, job.experiments[i], native, sequence, samples,
                                          elapsed if i in played else 0.0)
        return JobResult(
            experiments=[r for r in results if r is not None],
            execution_time_s=time.perf_counter() - started,
            extra={"platform": self._platform.name, "qibolab_version": qibolab.__version__},
        )

    # -- one job ---------------------------------------------------------------------

    def _compile(self, index: int, exp: Experiment) -> tuple[NativeCircuit, Any, Any]:
        native = to_native(exp.circuit, self._gate_set, self._target, self._seed,
                           self._optimization_level)
        try:
            sequence, measurements = self._compiler.compile(native.circuit, self._platform)
        except (KeyError, RuntimeError, ValueError, NotImplementedError) as exc:
            raise JobError(ErrorCode.JOB_FAILED,
                           f"circuit {index}: qibolab cannot compile it to pulses on platform "
                           f"{self._platform.name}: {exc}", circuit_index=index) from exc
        if self._max_sequence_ns is not None and sequence.duration > self._max_sequence_ns:
            raise JobError(ErrorCode.QUOTA_EXCEEDED,
                           f"circuit {index} compiles to a {sequence.duration:.0f} ns pulse "
                           f"sequence; this node accepts at most {self._max_sequence_ns:.0f} ns",
                           circuit_index=index)
        measurement = measurements.get(native.measure) if native.measure is not None else None
        return native, sequence, measurement

    def _play(self, sequences: list[Any], shots: int, job: Job) -> tuple[float, dict[Any, Any]]:
        if not sequences:
            return 0.0, {}
        classify = job.meas_level == 2
        options = {
            "nshots": shots,
            "acquisition_type": (AcquisitionType.DISCRIMINATION if classify
                                 else AcquisitionType.INTEGRATION),
            "averaging_mode": (AveragingMode.CYCLIC
                               if not classify and job.meas_return == "avg"
                               else AveragingMode.SINGLESHOT),
        }
        started = time.perf_counter()
        try:
            readout = self._platform.execute(sequences, **options)
        except LINK_ERRORS as exc:
            self._fault = (f"lost the connection to the instruments of "
                           f"{self._platform.name}: {type(exc).__name__}: {exc}")
            raise JobError(ErrorCode.JOB_FAILED,
                           f"{self._fault}; this job's results are lost, resubmit it once the "
                           "node reports itself healthy again") from exc
        except Exception as exc:  # a driver or qibolab refusing the sequence
            raise JobError(ErrorCode.JOB_FAILED,
                           f"qibolab could not play the pulse sequence on "
                           f"{self._platform.name}: {type(exc).__name__}: {exc}") from exc
        return time.perf_counter() - started, readout

    def _result(self, job: Job, exp: Experiment, native: NativeCircuit, sequence: Any,
                samples: dict[int, Any], elapsed: float) -> ExperimentResult:
        wires = self._gate_set.wires
        extra: dict[str, Any] = {
            "sequence_duration_ns": float(sequence.duration),
            "physical_qubits": {str(c): str(wires[q])
                                for q, cs in native.clbits.items() for c in cs},
        }
        header = circuit_header(exp.circuit)
        if job.meas_level == 1:
            average = job.meas_return == "avg"
            extra.update(meas_level=1, meas_return=job.meas_return,
                         memory=iq_memory(native, samples, exp.shots, average))
            return ExperimentResult(counts={}, shots=exp.shots, header=header,
                                    time_taken=elapsed, extra=extra)
        memory = bitstrings(native, samples, exp.shots)
        want_memory = exp.memory and job.meas_return == "single"
        return ExperimentResult(
            counts=dict(Counter(memory)),
            shots=exp.shots,
            header=header,
            memory=memory if want_memory else None,
            time_taken=elapsed,
            extra=extra,
        )

    # -- connection and calibration --------------------------------------------------

    def _reconnect(self) -> bool:
        platform = self._platform
        with contextlib.suppress(Exception):  # the link is already broken
            platform.disconnect()
        platform.is_connected = False
        try:
            platform.connect()
        except Exception as exc:
            self._fault = f"cannot reconnect to the instruments of {platform.name}: {exc}"
            return False
        self._fault = None
        return True

    def _reload_if_changed(self) -> None:
        changed = self._files.changed()
        if changed:
            self._reload_figures(parameters="parameters" in changed)

    def _reload_figures(self, parameters: bool) -> None:
        """Reread calibration.json and, when asked, parameters.json into the live
        platform; a file that does not parse keeps the last good figures and is named
        in the snapshot's `errors`."""
        errors = []
        files = self._files
        if parameters and files.parameters is not None:
            try:
                fresh = Parameters.model_validate_json(files.parameters.read_text())
            except (OSError, ValueError) as exc:
                errors.append(f"{files.parameters} not reloaded: {exc}")
            else:
                self._platform.parameters = fresh
        try:
            self._measured = files.read_calibration()
        except ValueError as exc:
            errors.append(str(exc))
        snap = snapshot(self._platform, files, self._measured, errors, self._loaded_at)
        self._calibration = snap
        self._gate_set = native_gate_set(self._platform, gate_errors(snap))
        self._target = self._gate_set.target()


def bundled_platforms() -> list[str]:
    return sorted(p.name for p in BUNDLED_PLATFORMS.iterdir() if (p / "platform.py").exists())


def load_platform(spec: str) -> tuple[Platform, Path | None]:
    """A platform by folder, by name ($QIBOLAB_PLATFORMS first, then the bundled
    ones), or qibolab's random `dummy`; with the folder its files live in."""
    with _keep_signal_handlers():
        if spec == "dummy":
            return create_platform("dummy"), None
        folder = _find_platform(spec)
        module = _load_module(folder / "platform.py")
        made = module.create()
        platform = made if isinstance(made, Platform) else Platform.load(folder, **vars(made))
    return platform, folder


def _find_platform(spec: str) -> Path:
    path = Path(spec).expanduser()
    if (path / "platform.py").is_file():
        return path.resolve()
    search = [Path(p) for p in os.environ.get(PLATFORMS_ENV, "").split(os.pathsep) if p]
    for root in [*search, BUNDLED_PLATFORMS]:
        if (root / spec / "platform.py").is_file():
            return (root / spec).resolve()
    raise OptionError(
        f"no qibolab platform {spec!r}: not a folder holding platform.py, not in "
        f"${PLATFORMS_ENV} ({os.environ.get(PLATFORMS_ENV) or 'unset'}), and not bundled "
        f"({', '.join(bundled_platforms())}); 'dummy' is qibolab's random test platform"
    )


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"qpi_platform_{path.parent.name}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load platform definition {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """qibolab's Platform takes over SIGTERM and SIGINT; the daemon decides when its
    executor stops, so put the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
