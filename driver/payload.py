"""How a parsed job crosses from the circuit parser to the executor process: pickle,
with plain circuits in their flat form (executors.flat). Pickling a QuantumCircuit goes
instruction by instruction through Qiskit's reducers (about 0.7 ms for a 100-gate
circuit, as much as parsing it); the flat form costs half that to write and no more to
read, and an executor that takes flat circuits (Aer) reads it without building a
QuantumCircuit at all. A circuit with anything else (parameters, variables, a layout,
bits outside registers) is pickled as it is."""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import TYPE_CHECKING, Any

from executors.base import Experiment, Job
from executors.flat import FlatCircuit, flatten

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(blob: bytes, flat: bool = False) -> Any:
    """What `dumps` wrote. With `flat`, plain circuits come back as FlatCircuit (for
    executors with `takes_flat_circuits`); otherwise as the QuantumCircuit they were."""
    if not flat:
        return pickle.loads(blob)
    return _FlatUnpickler(io.BytesIO(blob)).load()


def as_read(job: Job, flat: bool) -> Job:
    """`job` as `loads(dumps(job), flat)` would give it back, without the pickling: for
    a job parsed where it runs. A job for an executor that takes Qiskit circuits gets a
    copy of each (the parser's cache keeps the originals, which must not be changed)."""
    if not flat:
        return loads(dumps(job))
    experiments = []
    for exp in job.experiments:
        form = flatten(exp.circuit)
        experiments.append(Experiment(form if form is not None else exp.circuit.copy(), exp.shots,
                                      exp.memory, exp.source, exp.parameter_values))
    return dataclasses.replace(job, experiments=tuple(experiments))


def rebuild(*state: Any) -> QuantumCircuit:
    return FlatCircuit(*state).to_circuit()


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj).__name__ == "QuantumCircuit":  # no import: most objects are not one
            circuit = flatten(obj)
            if circuit is not None:
                return rebuild, circuit.state()
        return NotImplemented


class _FlatUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "rebuild":
            return FlatCircuit
        return super().find_class(module, name)
