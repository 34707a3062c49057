"""From a JobDispatch payload to an executor Job and back to a §5 result map:
validation (pydantic), limits, parsing every circuit before running any."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from executors.base import ErrorCode, Experiment, Job, JobError, JobResult
from executors.circuits import CircuitError, bind, parse_qasm


class CircuitSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    circuit: str = Field(min_length=1)
    shots: int | None = Field(None, gt=0, strict=True)
    parameter_values: list[list[float]] | None = None
    memory: bool | None = None


class JobSpec(BaseModel):
    """The `job` map of a JobDispatch (protocol §5), old single-circuit form included."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    circuits: list[CircuitSpec] = Field(min_length=1)
    shots: int = Field(1024, gt=0, strict=True)
    meas_level: Literal[0, 1, 2] = 2
    meas_return: Literal["single", "avg"] = "single"
    qpu_target: str = ""
    memory: bool = False
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "circuits" not in data:
            single = data.get("qasm") or data.get("circuit")
            if single is not None:
                data = {**data, "circuits": [single]}
        circuits = data.get("circuits")
        if isinstance(circuits, list):
            data = {
                **data,
                "circuits": [{"circuit": c} if isinstance(c, str) else c for c in circuits],
            }
        return data


@dataclass(frozen=True, slots=True)
class Limits:
    max_qubits: int
    max_shots: int
    max_circuits: int
    max_circuit_bytes: int = 1024 * 1024
    job_timeout_s: float = 3600.0  # the node's cap on a job's time (settings.job_timeout_s)


def read_spec(job: Any, limits: Limits) -> JobSpec:
    """Validate the dispatched job map (or JSON text of one); JobError if invalid."""
    if isinstance(job, str | bytes):
        try:
            job = json.loads(job)
        except (ValueError, RecursionError) as exc:
            raise JobError(
                ErrorCode.CIRCUIT_INVALID, f"job payload is not valid JSON: {exc!s:.200}"
            ) from None
    if not isinstance(job, dict):
        raise JobError(
            ErrorCode.CIRCUIT_INVALID, f"job payload must be a map, got {type(job).__name__}"
        )
    try:
        spec = JobSpec.model_validate(job)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise JobError(ErrorCode.CIRCUIT_INVALID, f"invalid job: {problems}") from None
    if len(spec.circuits) > limits.max_circuits:
        raise JobError(
            ErrorCode.QUOTA_EXCEEDED,
            f"job has {len(spec.circuits)} circuits; this node allows {limits.max_circuits}",
            max_circuits=limits.max_circuits,
        )
    for index, entry in enumerate(spec.circuits):
        if len(entry.circuit) > limits.max_circuit_bytes:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"circuit {index} is {len(entry.circuit)} bytes of OpenQASM; this node allows "
                f"{limits.max_circuit_bytes}",
                circuit_index=index,
                max_circuit_bytes=limits.max_circuit_bytes,
            )
    return spec


def prepare(job_id: str, spec: JobSpec, limits: Limits) -> Job:
    """Parse and bind every circuit and check it against the node's limits.

    All circuits are checked before any runs: one bad circuit fails the job.
    """
    experiments: list[Experiment] = []
    for index, entry in enumerate(spec.circuits):
        try:
            circuit = parse_qasm(entry.circuit)
        except CircuitError as exc:
            raise JobError(
                ErrorCode.CIRCUIT_INVALID,
                f"circuit {index}: {exc}",
                circuit_index=index,
                line=exc.line,
                column=exc.column,
            ) from None
        shots = entry.shots or spec.shots
        if circuit.num_qubits > limits.max_qubits:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"circuit {index} uses {circuit.num_qubits} qubits; this node allows "
                f"{limits.max_qubits}",
                circuit_index=index,
                requested_qubits=circuit.num_qubits,
                max_qubits=limits.max_qubits,
            )
        if shots > limits.max_shots:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"circuit {index} asks for {shots} shots; this node allows {limits.max_shots}",
                circuit_index=index,
                requested_shots=shots,
                max_shots=limits.max_shots,
            )
        rows: list[list[float] | None] = [None]
        if entry.parameter_values:
            rows = [*entry.parameter_values]
        if len(experiments) + len(rows) > limits.max_circuits:
            raise JobError(
                ErrorCode.QUOTA_EXCEEDED,
                f"job has more than {limits.max_circuits} experiments (circuits x parameter "
                "rows); split it",
                max_circuits=limits.max_circuits,
            )
        memory = entry.memory if entry.memory is not None else spec.memory
        for row_index, row in enumerate(rows):
            try:
                bound = bind(circuit, row)
            except CircuitError as exc:
                where = f", parameter_values row {row_index}" if row is not None else ""
                raise JobError(
                    ErrorCode.CIRCUIT_INVALID,
                    f"circuit {index}{where}: {exc}",
                    circuit_index=index,
                ) from None
            experiments.append(
                Experiment(
                    circuit=bound,
                    shots=shots,
                    memory=memory,
                    source=entry.circuit,
                    parameter_values=tuple(row or ()),
                )
            )
    return Job(
        job_id=job_id,
        experiments=tuple(experiments),
        meas_level=spec.meas_level,
        meas_return=spec.meas_return,
        timeout_s=min(spec.timeout_s or limits.job_timeout_s, limits.job_timeout_s),
    )


def result_map(result: JobResult, backend: str, version: str) -> dict[str, Any]:
    """The Qiskit-style success map of protocol §5."""
    circuit_results = [exp.to_wire() for exp in result.experiments]
    first = circuit_results[0] if circuit_results else {"shots": 0, "counts": {}}
    return {
        "success": True,
        "backend": backend,
        "shots": first["shots"],
        "counts": first["counts"],
        "circuit_results": circuit_results,
        "execution_time_seconds": result.execution_time_s,
        "driver_version": version,
        **result.extra,
    }
