"""The aer executor's direct path (flat circuits lowered straight to Aer's own circuit)
against `AerSimulator.run` on the same circuits: with one seed, both must draw the same
samples, so counts, per-shot memory and headers must be identical; what the direct
path does not take must reach the standard path and come out the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.library import UnitaryGate

from bench.parse import corpus
from driver import __version__, payload
from driver.messages import PreparedJob
from driver.processes import run_batch
from executors.aer import AerExecutor
from executors.base import Experiment, Job, JobError, JobResult
from executors.circuits import parse_qasm
from tests.test_qasm3_import import random_circuits

SEED = 1234
PLAIN = [case for case in corpus() if not parse_qasm(case.text).parameters]


def crossed(circuit: QuantumCircuit, shots: int = 300, memory: bool = True,
            flat: bool = True) -> Job:
    """The job as the executor process receives it from the parser."""
    blob = payload.dumps(Job("job", (Experiment(circuit, shots, memory=memory),)))
    job: Job = payload.loads(blob, flat)
    return job


def standard(job: Job) -> JobResult:
    """The same job on a fresh executor, every circuit a QuantumCircuit."""
    return AerExecutor({"seed": SEED}).run(payload.loads(payload.dumps(job)))


def assert_same(a: JobResult, b: JobResult) -> None:
    assert len(a.experiments) == len(b.experiments)
    for x, y in zip(a.experiments, b.experiments, strict=True):
        assert (x.counts, x.memory, x.header, x.shots) == (y.counts, y.memory, y.header, y.shots)


@pytest.mark.parametrize("case", PLAIN, ids=[case.name for case in PLAIN])
def test_corpus_circuits_draw_the_same_samples_on_both_paths(case: object) -> None:
    circuit = parse_qasm(case.text)  # type: ignore[attr-defined]
    job = crossed(circuit)
    direct = AerExecutor({"seed": SEED}).run(job)
    assert_same(direct, standard(job))
    if job.experiments[0].flat is not None:
        assert sum(direct.experiments[0].counts.values()) == 300


def test_what_the_benchmarks_send_takes_the_direct_path() -> None:
    from bench.traffic import bell, qft12, random20

    for circuit in (qft12(3), random20(4, layers=2), bell(5)):
        job = crossed(parse_qasm(_dumps(circuit)))
        result = AerExecutor({"seed": SEED}).run(job)
        assert job.experiments[0].flat is not None, "the circuit was built: standard path"
        assert_same(result, standard(job))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_circuits())
def test_random_circuits_draw_the_same_samples_on_both_paths(qc: QuantumCircuit) -> None:
    job = crossed(qc, shots=64)
    assert_same(AerExecutor({"seed": SEED}).run(job), standard(job))


def test_a_batch_keeps_each_jobs_own_counts_in_order() -> None:
    from bench.traffic import bell, qft12

    circuits = [parse_qasm(_dumps(build(seed))) for seed in range(4) for build in (qft12, bell)]
    prepared = [PreparedJob(job_id=f"j{i}", payload=payload.dumps(
        Job(f"j{i}", (Experiment(c, 500, memory=True),)))) for i, c in enumerate(circuits)]
    outcomes = run_batch(AerExecutor({"seed": SEED}), "aer", __version__, prepared)
    # The same batch through AerSimulator.run: one call, the same seeds in the same order.
    reference = AerExecutor({"seed": SEED}).run_many(
        [payload.loads(job.payload) for job in prepared])
    assert [o.job_id for o in outcomes] == [f"j{i}" for i in range(len(circuits))]
    for outcome, ref in zip(outcomes, reference, strict=True):
        assert isinstance(ref, JobResult)
        got = outcome.result["circuit_results"][0]  # type: ignore[index]
        assert got["counts"] == ref.experiments[0].counts
        assert got["memory"] == ref.experiments[0].memory
        assert got["header"] == ref.experiments[0].header


def _control_state() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1, ctrl_state=0)
    qc.measure([0, 1], [0, 1])
    return qc


def _unitary() -> QuantumCircuit:
    qc = QuantumCircuit(1, 1)
    qc.append(UnitaryGate(np.array([[0, 1], [1, 0]])), [0])
    qc.measure(0, 0)
    return qc


def _if_else() -> QuantumCircuit:
    q, c = QuantumRegister(2, "q"), ClassicalRegister(2, "c")
    qc = QuantumCircuit(q, c)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((c[0], 1)):
        qc.x(1)
    qc.measure(1, 1)
    return qc


def _outside_aers_basis() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.ch(0, 1)  # Aer's assembler has no `ch`: the standard path transpiles it
    qc.measure([0, 1], [0, 1])
    return qc


def _mid_circuit() -> QuantumCircuit:
    qc = QuantumCircuit(QuantumRegister(2, "a"), ClassicalRegister(1, "m"),
                        ClassicalRegister(2, "out"), global_phase=0.7)
    qc.h(0)
    qc.measure(0, 0)
    qc.reset(0)
    qc.cx(1, 0)
    qc.barrier()
    qc.measure([0, 1], [1, 2])
    return qc


@pytest.mark.parametrize("build", [_control_state, _unitary, _if_else, _outside_aers_basis])
def test_what_the_direct_path_does_not_take_runs_the_standard_way(build: object) -> None:
    job = crossed(build())  # type: ignore[operator]
    result = AerExecutor({"seed": SEED}).run(job)
    assert job.experiments[0].flat is None, "the standard path builds the circuit"
    assert_same(result, standard(job))


def test_mid_circuit_measurement_reset_and_several_registers_take_the_direct_path() -> None:
    job = crossed(_mid_circuit())
    result = AerExecutor({"seed": SEED}).run(job)
    assert job.experiments[0].flat is not None
    assert_same(result, standard(job))
    assert result.experiments[0].header["creg_sizes"] == [["m", 1], ["out", 2]]
    assert all(len(key) == 3 for key in result.experiments[0].counts)


def test_a_noisy_twin_builds_every_circuit_for_its_native_form(tmp_path: Path) -> None:
    from tests.test_aer_noise import GOOD, qibocal_file

    path = qibocal_file(tmp_path / "calibration.json", **GOOD)
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    job = crossed(qc)
    result = AerExecutor({"seed": SEED, "noise_calibration": str(path)}).run(job)
    assert job.experiments[0].flat is None
    assert sum(result.experiments[0].counts.values()) == 300


def test_a_circuit_aer_cannot_hold_fails_its_job_with_aers_reason() -> None:
    qc = QuantumCircuit(40, 40)
    qc.h(range(40))
    for q in range(39):
        qc.cx(q, q + 1)
    qc.measure(range(40), range(40))
    job = crossed(qc, shots=10, memory=False)
    with pytest.raises(JobError) as err:
        AerExecutor({"method": "statevector"}).run(job)
    assert err.value.code == "JOB_FAILED"
    assert "memory" in err.value.message.lower() or "qubit" in err.value.message.lower()


def _dumps(circuit: QuantumCircuit) -> str:
    from qiskit import qasm3

    return qasm3.dumps(circuit)


def test_an_aer_whose_internals_changed_runs_every_circuit_the_standard_way() -> None:
    executor = AerExecutor({"seed": SEED})

    def changed(*args: object, **kwargs: object) -> None:
        raise TypeError("generate_aer_config() got an unexpected keyword argument")

    executor._native._config = changed  # type: ignore[union-attr]  # as a later Aer might
    first, second = crossed(_mid_circuit()), crossed(_mid_circuit())
    assert_same(executor.run(first), standard(first))
    assert first.experiments[0].flat is None  # built: the standard path ran it
    executor.run(second)
    assert second.experiments[0].flat is None  # and the direct path stays off


@pytest.mark.parametrize("case", corpus(), ids=[case.name for case in corpus()])
def test_a_job_parsed_where_it_runs_reads_as_one_that_crossed_the_pipe(case: object) -> None:
    """payload.as_read (a job parsed in the executor process, one at a time) gives the
    executor what the parser's pickle would have: the same forms, the same samples."""
    circuit = parse_qasm(case.text)  # type: ignore[attr-defined]
    if circuit.parameters:
        circuit = circuit.assign_parameters([0.25] * circuit.num_parameters)
    job = Job("job", (Experiment(circuit, 200, memory=True),))
    here, piped = payload.as_read(job, flat=True), payload.loads(payload.dumps(job), True)
    assert [e.flat is None for e in here.experiments] == [e.flat is None for e in piped.experiments]
    assert here.experiments[0].circuit is not circuit  # the parser's cached original stays
    assert_same(AerExecutor({"seed": SEED}).run(here), AerExecutor({"seed": SEED}).run(piped))
